"""Serving benchmark: real `lmserve serve` processes driven by a streaming load generator,
a baseline and a candidate side by side in one run.

Each configuration gets its own server (started here, on a free port, stopped after); for every
concurrency level the generator keeps that many streamed chat requests in flight until the
level's request count is done, and reports output tokens/s over the level's wall time, time to
first token (TTFT) and time per output token after the first (TPOT) percentiles. The last
column is candidate / baseline. Compare only numbers from one run: machines differ.

    .venv/bin/python benchmarks/bench_serving.py --candidate quantization=int4
    .venv/bin/python benchmarks/bench_serving.py --concurrency 1 16 64 --max-tokens 128 \\
        --baseline quantization=none --candidate quantization=int8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

KEY = "sk-bench"
PROMPTS = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "Explain how a refrigerator works, step by step.", "List ten facts about the planet Mars.",
           "Describe your ideal weekend in detail.", "What are the main causes of the French Revolution?",
           "Give me a recipe for pancakes and explain each step.", "Why is the sky blue? Explain to a child.",
           "Compare Python and Rust for writing a web server."]


def _engine_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = int(value) if value.isdigit() else value
    return out


class Server:
    def __init__(self, model: str, dtype: str, engine: dict, work: Path, name: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cfg = {"server": {"api_keys": [KEY]},
               "models": [{"id": "bench", "path": model, "dtype": dtype, "engine": engine}]}
        path = work / f"{name}.yaml"
        path.write_text(json.dumps(cfg))  # JSON is YAML
        self.log = open(work / f"{name}.log", "wb")
        cmd = [sys.executable, "-m", "lmserve", "serve", "--config", str(path), "--host", "127.0.0.1",
               "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, HF_HUB_OFFLINE="1"))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server {name} exited; see {work / (name + '.log')}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"server {name} not healthy after 300 s")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def _one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {KEY}"}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                last = time.perf_counter()
                first = first or last
    first = first or time.perf_counter()
    tpot = (last - first) / (tokens - 1) if last and tokens > 1 else 0.0
    return first - start, tpot, tokens


async def run_level(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    queue = list(range(requests))
    results: list[tuple[float, float, int]] = []

    async def worker(client):
        while queue:
            i = queue.pop()
            results.append(await _one(client, url, PROMPTS[i % len(PROMPTS)], max_tokens))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await _one(client, url, PROMPTS[0], 4)  # warm-up: first-request costs are not serving costs
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    tpot = sorted(r[1] for r in results if r[1])
    return {"tok/s": sum(r[2] for r in results) / wall, "ttft p50 ms": 1000 * statistics.median(ttft),
            "ttft p90 ms": 1000 * ttft[int(0.9 * (len(ttft) - 1))],
            "tpot p50 ms": 1000 * statistics.median(tpot) if tpot else 0.0}


def main() -> None:
    from lmserve.models.loader import DEFAULT_MODEL_ID

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL_ID)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--requests", type=int, default=0, help="per level (default: 2 x concurrency, at least 8)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--baseline", nargs="*", default=[], metavar="OPTION=VALUE", help="engine options")
    ap.add_argument("--candidate", nargs="*", default=[], metavar="OPTION=VALUE", help="engine options")
    args = ap.parse_args()
    configs = {"baseline": _engine_options(args.baseline), "candidate": _engine_options(args.candidate)}
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"# model {args.model}, dtype {args.dtype}, {args.max_tokens} output tokens, streamed, greedy")
    for name, engine in configs.items():
        print(f"# {name}: {engine or 'defaults'}")
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, engine in configs.items():
            server = Server(args.model, args.dtype, engine, Path(tmp), name)
            try:
                results[name] = {c: asyncio.run(run_level(server.url, c, args.requests or max(8, 2 * c),
                                                          args.max_tokens)) for c in args.concurrency}
            finally:
                server.stop()
    print(f"{'concurrency':>11} | {'metric':<12} | {'baseline':>10} | {'candidate':>10} | {'ratio':>6}")
    for c in args.concurrency:
        for metric in results["baseline"][c]:
            b, k = results["baseline"][c][metric], results["candidate"][c][metric]
            print(f"{c:>11} | {metric:<12} | {b:>10.1f} | {k:>10.1f} | {k / b if b else float('nan'):>6.2f}")


if __name__ == "__main__":
    main()
