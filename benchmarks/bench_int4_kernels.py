"""The candidates for the batch-few int4 linear, side by side in one process on the bundled model's
shapes (SmolLM2-135M: the four linears of a layer, 576 -> 960 / 576 / 3072 and 1536 -> 576, over
30 layers of distinct weights, as a decode step streams them): milliseconds for all of them and
the effective weight bandwidth, at 1, 2 and 4 rows.

    .venv/bin/python benchmarks/bench_int4_kernels.py [--threads N] [--rows 1 2 4] [--cpu-time]

- bf16 oneDNN: the dense path (pre-packed weight, what `--quantization none` runs)
- torch int4: `_weight_int4pack_mm_for_cpu` (what the int4 method ran before the VNNI kernel)
- torch dyn-quant 4bit: `_dyn_quant_matmul_4bit` (KleidiAI's int4 x dynamic-int8, where torch has it)
- torch int8: `_weight_int8pack_mm` (int8 weights, bf16 activations)
- lmserve VNNI q4: layers/q4_kernel.py (4-bit weights x int8 activations, vpdpbusd)
Ratios are against torch int4 in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmserve.layers import q4_kernel
from lmserve.layers.linear import _linear_pointwise

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in)


def _time(fn, reps: int, clock=time.perf_counter) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(3):  # best of 3 batches of reps: the shared box is noisy
        start = clock()
        for _ in range(reps):
            fn()
        best = min(best, (clock() - start) / reps)
    return best


def candidates(n: int, k: int):
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale = torch.rand(n, k // 32) * 0.002 + 1e-3
    zero = torch.randn(n, k // 32) * 0.01
    out = {}
    wb = w.bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(wb, 1)
    out["bf16 oneDNN"] = (lambda x: _linear_pointwise(x, packed, None, "none", [], ""), n * k * 2)
    q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().bfloat16()
    out["torch int4"] = (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4, 32, sz), n * k // 2 + n * k // 8)
    try:
        dq = torch.ops.aten._dyn_quant_pack_4bit_weight(codes.to(torch.uint8), scale, torch.zeros(n), 32, k, n)
        torch.ops.aten._dyn_quant_matmul_4bit(torch.randn(1, k), dq, 32, k, n)
        out["torch dyn-quant 4bit"] = (lambda x: torch.ops.aten._dyn_quant_matmul_4bit(x.float(), dq, 32, k, n),
                                       n * k // 2 + n * k // 8)
    except Exception as e:  # noqa: BLE001 - not built into every torch
        print(f"torch dyn-quant 4bit: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s8 = torch.rand(n).bfloat16()
    out["torch int8"] = (lambda x: torch.ops.aten._weight_int8pack_mm(x, q8, s8), n * k + n * 2)
    if q4_kernel.available():
        qw, sz4 = q4_kernel.pack_int4(codes, scale, zero)
        out["lmserve VNNI q4"] = (lambda x: q4_kernel.int4_linear(x, qw, sz4), n * k // 2 + n * k // 8)
    else:
        print(f"lmserve VNNI q4: unavailable ({q4_kernel.unavailable_reason()})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--layers", type=int, default=30,
                   help="distinct layers' weights to cycle through (30: the whole model, as a decode step "
                        "streams it; 1: cache-resident weights, the kernels' compute speed)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by the process's CPU time (with --threads 1: what a kernel costs on a busy box, "
                        "where wall time mostly measures the neighbours)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    layer = [candidates(n, k) for _ in range(args.layers) for n, k in SHAPES]
    names = list(layer[0])
    with torch.inference_mode():
        for rows in args.rows:
            xs = [torch.randn(rows, k).bfloat16() for _ in range(args.layers) for _, k in SHAPES]
            res = {}
            for name in names:
                fns = [c[name][0] for c in layer]
                nbytes = sum(c[name][1] for c in layer)
                t = _time(lambda fns=fns, xs=xs: [f(x) for f, x in zip(fns, xs)], args.reps,
                          time.process_time if args.cpu_time else time.perf_counter)
                res[name] = (t, nbytes)
            base = res["torch int4"][0]
            print(f"\nrows {rows}: the four products of {args.layers} layers")
            print(f"{'kernel':<22} {'ms':>8} {'GB/s':>7} {'vs torch int4':>14}")
            for name, (t, nbytes) in res.items():
                print(f"{name:<22} {t * 1e3:8.2f} {nbytes / t / 1e9:7.1f} {base / t:13.2f}x")


if __name__ == "__main__":
    main()
