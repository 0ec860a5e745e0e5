"""Batch API benchmark: what a running batch costs interactive traffic, and how much of the
engine's idle capacity the batch uses. One `lmserve serve` (started here, stopped after), three
phases in one run:

1. interactive alone: `--streams` concurrent streamed chats, TTFT p50/p90;
2. capacity: the batch's lines sent as plain concurrent requests (`--capacity-concurrency` in
   flight) on the idle server: output tokens/s, the engine's throughput for this work ("offline"
   through the API; the reference the batch is compared with);
3. the same lines as a batch (/v1/files + /v1/batches), with the interactive streams of phase 1
   running beside it: interactive TTFT p50/p90 again, and the batch's output tokens/s while it
   shares the engine.

Ratios: TTFT with the batch / alone (target p50 <= 1.5x), batch tokens/s / capacity tokens/s
(target >= 0.8 of the idle capacity; the interactive streams take their share of the engine).
Numbers from a shared machine are noisy: compare only numbers of one run.

    .venv/bin/python benchmarks/bench_batch.py --lines 1000 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# The test harness's port picker and parent-death guard, as benchmarks/soak.py uses them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support
from tests.support.private_services import die_with_parent, free_port  # noqa: E402

KEY = "sk-bench"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a refrigerator works.",
           "List ten facts about Mars.", "Describe your ideal weekend.", "Why is the sky blue?",
           "Give me a recipe for pancakes.", "Compare Python and Rust.", "What causes the seasons?"]


def start_server(work: Path, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    (work / "config.yaml").write_text(f"""\
server:
  api_keys: ["{KEY}"]
  stats_interval_s: 0
platform:
  batch_poll_s: 0.2
  batch_concurrency: {args.batch_concurrency}
models:
  - id: {MODEL}
    path: {MODEL}
    dtype: float32
    engine: {{max_num_seqs: {args.max_num_seqs}, batch_kv_share: {args.batch_kv_share}}}
""")
    env = dict(os.environ, HF_HUB_OFFLINE="1", LMSERVE_DATA_DIR=str(work))
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lmserve", "serve", "--config", str(work / "config.yaml"),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: see {work / 'server.log'}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not become healthy")


def line_body(i: int, max_tokens: int) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" ({i})"}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


async def interactive(http: httpx.AsyncClient, streams: int, per_stream: int, stop: asyncio.Event | None) -> list:
    """TTFTs of `streams` concurrent streamed chats, `per_stream` each (or until `stop`)."""
    ttfts: list[float] = []

    async def one_stream(s: int):
        for k in range(per_stream):
            if stop is not None and stop.is_set():
                return
            body = {**line_body(s * 1000 + k, 16), "stream": True}
            start = time.perf_counter()
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.aiter_lines()
                async for raw in lines:
                    if raw.startswith("data: ") and '"content":"' in raw and '"content":""' not in raw:
                        ttfts.append(time.perf_counter() - start)
                        break
                async for _ in lines:  # the rest of the stream
                    pass

    await asyncio.gather(*(one_stream(s) for s in range(streams)))
    return ttfts


async def capacity(http: httpx.AsyncClient, lines: int, max_tokens: int, concurrency: int) -> float:
    """Output tokens/s of the lines as plain concurrent requests on the idle server."""
    queue = list(range(lines))
    tokens = 0

    async def worker():
        nonlocal tokens
        while queue:
            i = queue.pop()
            r = await http.post("/v1/chat/completions", json=line_body(i, max_tokens))
            tokens += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens / (time.perf_counter() - start)


async def batch_with_interactive(http: httpx.AsyncClient, args) -> tuple[float, list[float], int]:
    data = "".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": line_body(i, args.max_tokens)}) + "\n" for i in range(args.lines))
    f = (await http.post("/v1/files", files={"file": ("b.jsonl", data.encode())}, data={"purpose": "batch"})).json()
    start = time.perf_counter()
    b = (await http.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                              "completion_window": "24h"})).json()
    stop = asyncio.Event()
    await asyncio.sleep(2.0)  # the batch fills its share of the engine first
    chats = asyncio.ensure_future(interactive(http, args.streams, 10**6, stop))
    while True:
        b = (await http.get(f"/v1/batches/{b['id']}")).json()
        if b["status"] in ("completed", "failed", "expired", "cancelled"):
            break
        await asyncio.sleep(0.25)
    elapsed = time.perf_counter() - start
    stop.set()
    ttfts = await chats
    out = (await http.get(f"/v1/files/{b['output_file_id']}/content")).text.splitlines()
    tokens = sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"] for x in out)
    return tokens / elapsed, ttfts, len(out)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def main_async(args, url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600, headers={"Authorization": f"Bearer {KEY}"},
                                 limits=httpx.Limits(max_connections=256)) as http:
        await interactive(http, 1, 2, None)  # warm up
        alone = await interactive(http, args.streams, args.per_stream, None)
        print(f"interactive alone: TTFT p50 {pct(alone, 50) * 1000:.0f} ms", file=sys.stderr, flush=True)
        cap = await capacity(http, args.lines, args.max_tokens, args.capacity_concurrency)
        print(f"capacity: {cap:.1f} output tokens/s", file=sys.stderr, flush=True)
        batch_tps, busy, done = await batch_with_interactive(http, args)
    rows = [("interactive TTFT p50 (ms)", pct(alone, 50) * 1000, pct(busy, 50) * 1000),
            ("interactive TTFT p90 (ms)", pct(alone, 90) * 1000, pct(busy, 90) * 1000),
            ("output tokens/s: capacity vs batch", cap, batch_tps)]
    print(f"# bench_batch: {args.lines} lines x {args.max_tokens} tokens, {args.streams} interactive streams, "
          f"{platform.machine()} {os.cpu_count()} CPUs; {done} lines done; {len(busy)} chats during the batch")
    print(f"| {'metric':<38} | {'idle / alone':>12} | {'with batch':>12} | {'ratio':>6} |")
    print(f"|{'-' * 40}|{'-' * 14}|{'-' * 14}|{'-' * 8}|")
    for name, a, b in rows:
        print(f"| {name:<38} | {a:>12.1f} | {b:>12.1f} | {b / a:>6.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--per-stream", type=int, default=6)
    p.add_argument("--capacity-concurrency", type=int, default=32)
    p.add_argument("--batch-concurrency", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=48)
    p.add_argument("--batch-kv-share", type=float, default=0.5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmserve-bench-batch-") as tmp:
        proc, url = start_server(Path(tmp), args)
        try:
            asyncio.run(main_async(args, url))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
