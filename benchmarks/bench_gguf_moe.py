"""A GGUF MoE file loaded dense and with its experts kept quantized, each in a fresh process:
peak resident size during loading, resident size after it, and batch-1 greedy decode speed,
with ratios against the dense load measured in the same run.

The file is qwen2moe-shaped with random weights (tests/support/gguf_convert.py
write_random_qwen2moe: experts as Q4_K blocks of random bytes, the rest small F16): the values do
not matter for memory or speed, and no real MoE GGUF is small enough for this box. Default:
4 layers x 32 experts of 512 x 512 (100M expert weights, 201 MB in bf16).

    .venv/bin/python benchmarks/bench_gguf_moe.py [--layers 4 --experts 32 --width 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, from a script

from benchmarks.fresh_load import measure, print_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--width", type=int, default=512, help="hidden and expert width")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from tests.support.gguf_convert import write_random_qwen2moe

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random-qwen2moe.Q4_K.gguf"
        experts = write_random_qwen2moe(path, layers=args.layers, experts=args.experts, hidden=args.width,
                                        inter=args.width)
        print(f"{path.name}: {args.layers} layers x {args.experts} experts of {args.width} x {args.width}, "
              f"{experts / 1e6:.0f}M expert weights ({2 * experts / 2**20:.0f} MiB in bf16), file "
              f"{path.stat().st_size / 2**20:.0f} MiB; {args.threads} threads")
        runs = {mode: measure(path, mode, args.threads) for mode in ("none", "int4")}
    print_table("quantization", runs)

if __name__ == "__main__":
    main()
