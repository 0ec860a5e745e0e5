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
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, from a script

_RUN = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from lmserve import SamplingParams
from lmserve.engine.llm_engine import LLMEngine

def status_mib(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key))) / 1024

start = time.perf_counter()
engine = LLMEngine(sys.argv[1], dtype="bfloat16", quantization=sys.argv[2], num_kv_blocks=64)
out = {"load_s": time.perf_counter() - start, "peak": status_mib("VmHWM"), "rss": status_mib("VmRSS")}

def decode(tokens):
    engine.add_request("r", [5, 6, 7, 8], SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()

decode(4)  # warm-up
start = time.perf_counter()
decode(32)
out["tok_s"] = 32 / (time.perf_counter() - start)
print(json.dumps(out))
"""


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
        runs = {}
        for mode in ("none", "int4"):
            child = subprocess.run([sys.executable, "-c", _RUN, str(path), mode, str(args.threads)],
                                   capture_output=True, text=True, check=True)
            runs[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    base = runs["none"]
    print("| quantization | load s | peak RSS MiB | RSS after load MiB | batch-1 decode tok/s |")
    print("|---|---:|---:|---:|---:|")
    for mode, r in runs.items():
        print(f"| {mode} | {r['load_s']:.1f} | {r['peak']:.0f} ({r['peak'] / base['peak']:.2f}x) | "
              f"{r['rss']:.0f} ({r['rss'] / base['rss']:.2f}x) | "
              f"{r['tok_s']:.1f} ({r['tok_s'] / base['tok_s']:.2f}x) |")


if __name__ == "__main__":
    main()
