"""Which int4 kernel this machine runs faster for each weight shape, and up to how many rows an
int4 product beats the dense bf16 one: measured once per process (and shape), on synthetic
weights, the first time it is asked.

Why measure: the winners differ from machine to machine (and the project's machines differ from
day to day), and from shape to shape. On a 2-core Xeon with AMX, quiet, torch's int4 kernel was
1.2x faster than ours on SmolLM2's 576-wide products and ours 1.6x faster on 2048 x 1024; int4
beat bf16 up to 4 rows there (2 under load), as on a 2-core Zen 4 (docs/benchmarks.md, "Threads
and kernels by measurement"). A constant chosen on one machine is wrong on another, so the
serving default and the int4 packing ask this module instead. (Those were the row-by-row VNNI
kernel's numbers; the tiled one of 2026-12-05 beat both others on the AMX Xeon at every row count
up to 16, and bf16 there from 32 rows on.)

What is timed: products of an [n, k] weight at a few row counts, each pass cycling through
distinct copies of the weight that together hold `STREAM_BYTES`, so that, as in a model's forward,
every product reads its weight from beyond the core's L2 (with 4 copies, as until 2026-12-05, the
weights stayed in a 2-4 MiB L2: the VNNI kernel won the per-shape timing on SmolLM2's products yet
lost 1.45x to torch's over the model's 120 distinct weights). A candidate's time is its best of
`PASSES` passes, taken in turns with the other candidates (a neighbour's interference only ever
adds time), with torch's current thread count. About a second, once per process.
`LMSERVE_INT4_KERNEL=vnni|torch` skips the kernel measurement (benchmarks, A/B runs).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

import torch

from lmserve.layers import q4_kernel

log = logging.getLogger("lmserve.engine")

SHAPE = (2048, 1024)  # n, k of the synthetic weight: a mid-sized projection
STREAM_BYTES = 32 << 20  # weight bytes each pass reads: well past an L2
MAX_COPIES = 128
ROWS = (1, 2, 4, 8, 16, 32)  # decode batches: where the tiled VNNI kernel can beat bf16
PASSES = 5
KERNELS = ("vnni", "torch")
ENV = "LMSERVE_INT4_KERNEL"


@dataclass(frozen=True)
class KernelTimings:
    """Seconds per product at each row count in ROWS, per candidate ("bf16", "vnni", "torch")."""

    seconds: dict[str, tuple[float, ...]]

    def int4_kernel(self) -> str:
        """The faster int4 kernel at one row (decode at batch 1, where int4 pays most)."""
        timed = [k for k in KERNELS if k in self.seconds]
        return min(timed, key=lambda k: self.seconds[k][0])

    def int4_max_rows(self) -> int:
        """The most rows for which the int4 kernel beats bf16 at every row count up to it (0: not
        even at one row)."""
        int4, dense = self.seconds[self.int4_kernel()], self.seconds["bf16"]
        best = 0
        for rows, quantized, bf16 in zip(ROWS, int4, dense):
            if quantized >= bf16:
                break
            best = rows
        return best

    def describe(self) -> str:
        return "; ".join(f"{name} " + "/".join(f"{s * 1e6:.0f}" for s in times) + " us"
                         for name, times in self.seconds.items()) + f" at rows {'/'.join(map(str, ROWS))}"


def _copies(weight_bytes: int) -> int:
    """How many distinct copies of a weight one pass cycles through (STREAM_BYTES in all)."""
    return max(2, min(MAX_COPIES, STREAM_BYTES // max(weight_bytes, 1)))


def _pass_time(products: list, x: torch.Tensor) -> float:
    """Seconds per product over one pass through every copy."""
    started = time.perf_counter()
    for product in products:
        product(x)
    return (time.perf_counter() - started) / len(products)


def _synthetic_grid(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and group scales of an [n, k] int4 grid: any values do, the kernels' time does not
    depend on them."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return codes, torch.full((n, k // q4_kernel.BLOCK), 0.01)


def _int4_products(codes: torch.Tensor, scale: torch.Tensor, kernels) -> dict[str, list]:
    """kernel -> its products, one per weight copy. The copies hold the same values in separate
    memory: packing once and cloning is most of the set-up cost saved."""
    out = {}
    for kernel in kernels:
        qweight, sz = q4_kernel.pack_int4(codes, scale, torch.zeros_like(scale), vnni=kernel == "vnni")
        copies = _copies(qweight.numel() + sz.numel() * sz.element_size())
        out[kernel] = [functools.partial(_int4, qweight=qweight.clone(), scales_zeros=sz.clone())
                       for _ in range(copies)]
    return out


def _candidates(forced: str | None) -> dict[str, list]:
    """name -> the products (one per weight copy) it runs: bf16 and the int4 kernels."""
    from lmserve.layers.quantization.int4_kernel import KERNEL_DTYPE

    codes, scale = _synthetic_grid(*SHAPE)
    dense = (codes.to(KERNEL_DTYPE) - 8) * 0.01
    copies = _copies(dense.numel() * dense.element_size())
    if torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(dense, 1)
        out: dict[str, list] = {"bf16": [_packed_bf16(packed.clone()) for _ in range(copies)]}
    else:
        out = {"bf16": [functools.partial(torch.nn.functional.linear, weight=dense.clone()) for _ in range(copies)]}
    kernels = [k for k in KERNELS if forced in (None, k) and (k != "vnni" or q4_kernel.available())]
    out.update(_int4_products(codes, scale, kernels))
    return out


def _sweep(candidates: dict[str, list], inputs: list[torch.Tensor]) -> dict[str, tuple[float, ...]]:
    """Each candidate's best pass per input over `PASSES` rounds, the candidates' passes taking
    turns: this box's speed drifts by a third from one second to the next (a neighbour, the
    host), and passes back to back would hand a slow spell to one candidate alone. The first
    round absorbs one-time set-up (oneDNN's kernel generation: ~12 ms for the first bf16 call on
    an AMX Xeon)."""
    best = {name: [float("inf")] * len(inputs) for name in candidates}
    with torch.no_grad():
        for _ in range(PASSES):
            for i, x in enumerate(inputs):
                for name, products in candidates.items():
                    best[name][i] = min(best[name][i], _pass_time(products, x))
    return {name: tuple(times) for name, times in best.items()}


def _packed_bf16(packed: torch.Tensor):
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _int4(x: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    return q4_kernel.int4_linear(x, qweight, scales_zeros)


@functools.cache
def _measure(threads: int, forced: str | None) -> KernelTimings:
    started = time.perf_counter()
    seconds = _sweep(_candidates(forced), [torch.randn(rows, SHAPE[1]).to(torch.bfloat16) for rows in ROWS])
    timings = KernelTimings(seconds)
    log.info("int4 kernels timed in %.2fs with %d threads (%s): %s; int4 up to %d rows", time.perf_counter() - started,
             threads, timings.describe(), timings.int4_kernel(), timings.int4_max_rows())
    return timings


def timings() -> KernelTimings:
    """This machine's measurements (with the current thread count), measured on first use."""
    forced = os.environ.get(ENV)
    return _measure(torch.get_num_threads(), forced if forced in KERNELS else None)


def use_vnni(n: int, k: int) -> bool:
    """Whether an [n, k] int4 grid is packed for the VNNI kernel: forced by LMSERVE_INT4_KERNEL,
    else where it is available and measured faster than torch's at one row for this shape. The
    shape matters: on an AMX Xeon the VNNI kernel was 1.6x faster on 2048 x 1024 and torch's 1.2x
    faster on SmolLM2's 576-wide products (docs/benchmarks.md)."""
    forced = os.environ.get(ENV)
    if forced == "torch" or not q4_kernel.available():
        return False
    return forced == "vnni" or _faster_kernel(n, k, torch.get_num_threads()) == "vnni"


@functools.cache
def _faster_kernel(n: int, k: int, threads: int) -> str:
    """The faster int4 kernel at one row for an [n, k] weight, timed on synthetic codes (each
    distinct layer shape of a model once: a few ms each)."""
    products = _int4_products(*_synthetic_grid(n, k), KERNELS)
    seconds = {kernel: times[0] for kernel, times in _sweep(products, [torch.randn(1, k).to(torch.bfloat16)]).items()}
    faster = min(seconds, key=seconds.__getitem__)
    log.info("int4 kernel for %d x %d weights: %s (one row: %s)", n, k, faster,
             ", ".join(f"{name} {t * 1e6:.0f} us" for name, t in seconds.items()))
    return faster
