"""One checkpoint loaded in a fresh process, and what that costs: seconds to load, peak resident
size during loading, resident size after it, and batch-1 greedy decode speed. Shared by the
benchmarks that compare formats of one model side by side (bench_gguf_moe.py,
bench_quantized_experts.py); a fresh process each, so one load's heap never inflates the next's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_RUN = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from lmserve import SamplingParams
from lmserve.engine.llm_engine import LLMEngine

def status_mib(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key))) / 1024

start = time.perf_counter()
options = {} if sys.argv[2] == "checkpoint" else {"quantization": sys.argv[2]}
engine = LLMEngine(sys.argv[1], dtype="bfloat16", num_kv_blocks=64, **options)
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


def measure(path: Path, quantization: str, threads: int) -> dict[str, float]:
    """`quantization`: the option to load with, or "checkpoint" for the checkpoint's own."""
    child = subprocess.run([sys.executable, "-c", _RUN, str(path), quantization, str(threads)],
                           capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def print_table(first_column: str, runs: dict[str, dict[str, float]]) -> None:
    """A markdown table, each row's ratios against the first row's."""
    base = next(iter(runs.values()))
    print(f"| {first_column} | load s | peak RSS MiB | RSS after load MiB | batch-1 decode tok/s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in runs.items():
        print(f"| {name} | {r['load_s']:.1f} | {r['peak']:.0f} ({r['peak'] / base['peak']:.2f}x) | "
              f"{r['rss']:.0f} ({r['rss'] / base['rss']:.2f}x) | "
              f"{r['tok_s']:.1f} ({r['tok_s'] / base['tok_s']:.2f}x) |")
