"""Choosing the int4 kernel and the int4/bf16 crossover by measurement
(layers/quantization/kernel_timing.py): the rules over given timings, and a real measurement."""

from __future__ import annotations

import torch

from lmserve.layers import q4_kernel
from lmserve.layers.quantization import int4_kernel, kernel_timing
from lmserve.layers.quantization.kernel_timing import ROWS, KernelTimings


def test_the_faster_kernel_at_one_row_and_the_rows_int4_beats_bf16_at_every_count_up_to():
    assert ROWS == (1, 2, 4, 8, 16, 32)
    zen4 = KernelTimings({"bf16": (20, 22, 18, 22, 30, 50), "vnni": (8, 9, 12, 22, 40, 80),
                          "torch": (7.4, 9, 13, 23, 41, 82)})
    assert zen4.int4_kernel() == "torch" and zen4.int4_max_rows() == 4  # 22 = 22 at 8 rows: not faster
    amx = KernelTimings({"bf16": (110, 110, 112, 111, 115, 140), "vnni": (78, 112, 184, 345, 644, 1300),
                         "torch": (69, 83, 114, 220, 427, 850)})
    assert amx.int4_kernel() == "torch" and amx.int4_max_rows() == 2
    # the tiled VNNI kernel on an AMX Xeon (2026-12-05): ahead of bf16 up to 16 rows
    tiled = KernelTimings({"bf16": (223, 221, 226, 220, 216, 240), "vnni": (67, 64, 69, 84, 148, 280),
                           "torch": (71, 87, 124, 237, 447, 900)})
    assert tiled.int4_kernel() == "vnni" and tiled.int4_max_rows() == 16
    busy = KernelTimings({"bf16": (9000, 5000, 10000, 9000, 10000, 9000), "vnni": (93, 106, 174, 306, 619, 1200)})
    assert busy.int4_kernel() == "vnni" and busy.int4_max_rows() == 32
    assert KernelTimings({"bf16": (5, 5, 5, 5, 5, 5), "torch": (6, 6, 6, 6, 6, 6)}).int4_max_rows() == 0


def test_a_real_measurement_decides_the_packing_per_shape(monkeypatch):
    measured = kernel_timing.timings()
    assert set(measured.seconds) >= {"bf16", "torch"}
    assert all(len(t) == len(ROWS) and min(t) > 0 for t in measured.seconds.values())
    grid = int4_kernel.Int4Grid(torch.randint(0, 16, (32, 64), dtype=torch.uint8), torch.full((32, 2), 0.1),
                                torch.zeros(32, 2))
    packed = int4_kernel.pack(grid)
    chosen = kernel_timing.use_vnni(32, 64)
    assert (packed.scales_zeros.dtype == torch.float16) == chosen  # the VNNI layout iff chosen for this shape
    assert chosen == (q4_kernel.available() and kernel_timing._faster_kernel(32, 64, torch.get_num_threads()) == "vnni")
    monkeypatch.setenv(kernel_timing.ENV, "torch")  # forced: no VNNI, whatever was measured
    assert not kernel_timing.use_vnni(32, 64)
    assert int4_kernel.pack(grid).scales_zeros.dtype == torch.bfloat16
