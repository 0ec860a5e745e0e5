"""Start-up time of `lmserve serve` on the bundled model, measured two ways in one run:

1. end to end through the real CLI: process start -> port bound (503 loading) -> /health 200 ->
   first chat answer;
2. the load phases one by one in fresh processes, each next to the way it was done before
   (AutoTokenizer's GGUF path, torch's random weight init, a second GGUF parse), so the ratios
   are measured on the same machine in the same run.

    HF_HUB_OFFLINE=1 python benchmarks/bench_startup.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

PHASES = r"""
import json, sys, time
t = time.perf_counter()
marks = {}
def mark(name):
    global t
    now = time.perf_counter(); marks[name] = now - t; t = now
import torch
mark("import torch")
from lmserve.engine import tokenizer as tok_mod
from lmserve.models import loader
from lmserve.defaults import DEFAULT_MODEL_ID
mark("import lmserve")
old = sys.argv[1] == "old"
ckpt = loader.resolve_checkpoint(DEFAULT_MODEL_ID)
config = loader.read_config(ckpt)
mark("GGUF metadata (config)")
if old:
    from lmserve.models import gguf
    gguf._cached_reader.cache_clear()  # the old loader parsed the file again for the tensors
    ckpt._gguf = None
    loader._skip_random_init = __import__("contextlib").nullcontext  # and ran torch's random init
model = loader.load_model(ckpt, config, torch.float32, torch.device("cpu"))
mark("weights")
if old:
    from transformers import AutoTokenizer
    source, kwargs = ckpt.tokenizer_source
    AutoTokenizer.from_pretrained(source, **kwargs)
else:
    tok_mod.load_tokenizer(ckpt)
mark("tokenizer")
from lmserve.engine.model_runner import ModelRunner
ModelRunner(model, config, 2048, 16, torch.float32, torch.device("cpu"))
mark("KV cache (2048 blocks)")
print(json.dumps(marks))
"""


def phases(way: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PHASES, way], capture_output=True, text=True, check=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def end_to_end() -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    data_dir = tempfile.mkdtemp(prefix="lmserve-bench-")  # its own platform database
    proc = subprocess.Popen([sys.executable, "-m", "lmserve", "serve", "--port", str(port), "--api-key", "sk-bench",
                             "--data-dir", data_dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    marks: dict[str, float] = {}
    try:
        while "ready" not in marks:
            try:
                status = httpx.get(f"{url}/health", timeout=5).status_code
                marks.setdefault("port answers", time.perf_counter() - start)
                if status == 200:
                    marks["ready"] = time.perf_counter() - start
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise RuntimeError("lmserve serve exited")
            time.sleep(0.02)
        r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer sk-bench"}, timeout=60,
                       json={"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "max_tokens": 8,
                             "messages": [{"role": "user", "content": "Hello!"}]})
        r.raise_for_status()
        marks["first answer"] = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(30)
    return marks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"bundled SmolLM2-135M Q4_1 GGUF, CPU, {os.cpu_count()} cores, median of {args.runs} runs\n")
    e2e = [end_to_end() for _ in range(args.runs)]
    print("lmserve serve, from process start (s):")
    for key in e2e[0]:
        print(f"  {key:<14} {statistics.median(m[key] for m in e2e):6.2f}")
    new = [phases("new") for _ in range(args.runs)]
    old = [phases("old") for _ in range(args.runs)]
    print("\nload phases (s):          before    now   ratio")
    for key in new[0]:
        b, n = statistics.median(m[key] for m in old), statistics.median(m[key] for m in new)
        print(f"  {key:<22} {b:6.2f} {n:6.2f}  {b / n if n else float('inf'):5.1f}x")
    b, n = (sum(statistics.median(m[k] for m in runs) for k in new[0]) for runs in (old, new))
    print(f"  {'total':<22} {b:6.2f} {n:6.2f}  {b / n:5.1f}x")


if __name__ == "__main__":
    main()
