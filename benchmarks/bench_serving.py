"""Serving benchmark: real servers driven by a streaming load generator, side by side in one run.

Each configuration gets its own server (started here, on a free port, stopped after): lmserve
as `--baseline` and `--candidate` (engine options, plus `threads=N` for the server's CPU
threads and `src=DIR` to run another checkout's code), and optionally llama.cpp's
`llama-server` on the same GGUF (`--llama-server PATH`). For every concurrency level the
generator keeps that many streamed chat requests in flight until the level's request count is
done, and reports output tokens/s over the level's wall time, time to first token (TTFT) and
time per output token after the first (TPOT) percentiles. Ratio columns divide by the baseline
(and by llama.cpp when it ran). `--offline` adds the offline engine beside transformers'
`generate` (benchmarks/bench_engine.py) in the same run. Compare
only numbers from one run: machines differ.

    .venv/bin/python benchmarks/bench_serving.py --candidate quantization=int4
    .venv/bin/python benchmarks/bench_serving.py --concurrency 1 16 64 --max-tokens 128 \\
        --baseline quantization=none --candidate quantization=int4 quantized_max_rows=2 \\
        --llama-server /path/to/llama-server --offline
    .venv/bin/python benchmarks/bench_serving.py --concurrency 1 --max-tokens 16 --prompt-words 1500  # prefill
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lmserve_command(model: str, dtype: str, options: dict, work: Path, name: str, port: int) -> list[str]:
    engine = {k: v for k, v in options.items() if k not in ("threads", "src")}
    server = {"api_keys": [KEY], **({"threads": options["threads"]} if "threads" in options else {})}
    cfg = {"server": server, "models": [{"id": "bench", "path": model, "dtype": dtype, "engine": engine}]}
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return [sys.executable, "-m", "lmserve", "serve", "--config", str(path), "--host", "127.0.0.1",
            "--port", str(port)]


def llama_server_command(binary: str, gguf: str, threads: int, slots: int, max_tokens: int, port: int,
                         prompt_words: int = 0) -> list[str]:
    """llama.cpp's server on the same file: one slot per concurrent request, each with room for
    a prompt (a short chat, or ~2 tokens a word of a long one) and the output."""
    per_slot = 256 + 2 * prompt_words + max_tokens
    return [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-np", str(slots), "-c", str(slots * per_slot), "--no-webui", "--api-key", KEY]


class Server:
    def __init__(self, cmd: list[str], port: int, work: Path, name: str, src: str | None = None):
        self.port = port
        self.log = open(work / f"{name}.log", "wb")
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if src:  # another checkout's code (e.g. main before a change) as this server
            env["PYTHONPATH"] = str(Path(src) / "src")
            # with its own builds of our C++ kernels: one cache for two versions of a kernel's
            # source would rebuild it at every start (and race when both build at once)
            env["TORCH_EXTENSIONS_DIR"] = str(Path(src) / ".torch_extensions")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
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
    tokens = chunks = 0
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
                chunks += 1
                last = time.perf_counter()
                first = first or last
    first = first or time.perf_counter()
    tokens = tokens or chunks  # a server that does not report usage: one token per content chunk
    tpot = (last - first) / (tokens - 1) if last and tokens > 1 else 0.0
    return first - start, tpot, tokens


def long_prompts(words: int, count: int) -> list[str]:
    """`count` distinct prompts of about `words` words each (the prefill-heavy row): windows of
    tests/data/perplexity_text.txt repeated, each opened by its own request number so that no two
    share a cached prefix, then asked for a summary."""
    text = (Path(__file__).parents[1] / "tests" / "data" / "perplexity_text.txt").read_text().split()
    source = (text * (1 + (words + count * 97) // len(text)))
    return [f"Request {i}. " + " ".join(source[i * 97:i * 97 + words]) + "\n\nSummarize the text above."
            for i in range(count)]


async def run_level(url: str, concurrency: int, requests: int, max_tokens: int, prompts: list[str]) -> dict:
    queue = list(range(requests))
    results: list[tuple[float, float, int]] = []

    async def worker(client):
        while queue:
            i = queue.pop()
            results.append(await _one(client, url, prompts[i % len(prompts)], max_tokens))

    # A fresh connection per request: llama.cpp's server closes a kept-alive connection after a
    # stream, and a client that reuses it fails; on loopback a connect costs well under 1 ms.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
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
    from lmserve.models.loader import DEFAULT_MODEL_ID, bundled_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL_ID)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--requests", type=int, default=0, help="per level (default: 2 x concurrency, at least 8)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=0,
                    help="prefill-heavy: each request a distinct prompt of about this many words (default: chats)")
    ap.add_argument("--baseline", nargs="*", default=[], metavar="OPTION=VALUE", help="engine options")
    ap.add_argument("--candidate", nargs="*", default=[], metavar="OPTION=VALUE", help="engine options")
    ap.add_argument("--llama-server", metavar="PATH", help="also run llama.cpp's llama-server on the GGUF")
    ap.add_argument("--llama-gguf", help="the GGUF for llama-server (default: the bundled model's file)")
    ap.add_argument("--llama-threads", type=int, default=os.cpu_count(), help="llama-server -t")
    ap.add_argument("--logs", metavar="DIR", help="keep the servers' configs and logs here")
    ap.add_argument("--offline", action="store_true", help="also run bench_engine.py (offline vs transformers)")
    ap.add_argument("--busy-neighbour", action="store_true",
                    help="keep one core busy with another process during every server's run (a shared host)")
    args = ap.parse_args()
    configs = {"baseline": _engine_options(args.baseline), "candidate": _engine_options(args.candidate)}
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"# model {args.model}, dtype {args.dtype}, {args.max_tokens} output tokens, streamed, greedy, ignore_eos"
          + (f", distinct prompts of ~{args.prompt_words} words" if args.prompt_words else ""))
    for name, engine in configs.items():
        print(f"# {name}: {engine or 'defaults'}")
    gguf = args.llama_gguf or str(bundled_model_path())
    if args.llama_server:
        print(f"# llama.cpp: {args.llama_server} -m {Path(gguf).name} -t {args.llama_threads} "
              f"-np {max(args.concurrency)}")
    results: dict[str, dict[int, dict]] = {}
    with (contextlib.nullcontext(args.logs) if args.logs else tempfile.TemporaryDirectory()) as tmp:
        runs = {name: lambda port, name=name, engine=engine: lmserve_command(
            args.model, args.dtype, engine, Path(tmp), name, port) for name, engine in configs.items()}
        if args.llama_server:
            runs["llama.cpp"] = lambda port: llama_server_command(args.llama_server, gguf, args.llama_threads,
                                                                  max(args.concurrency), args.max_tokens, port,
                                                                  args.prompt_words)
        neighbour = busy_neighbour() if args.busy_neighbour else contextlib.nullcontext()
        with neighbour:
            _run_all(runs, configs, args, tmp, results)
    _print_table(results, args)


def _run_all(runs: dict, configs: dict, args, tmp: str, results: dict) -> None:
    # One server at a time, each driven through every concurrency level.
    count = max(args.requests or max(8, 2 * c) for c in args.concurrency)
    prompts = long_prompts(args.prompt_words, count) if args.prompt_words else PROMPTS
    for name, command in runs.items():
        port = _free_port()
        server = Server(command(port), port, Path(tmp), name, configs.get(name, {}).get("src"))
        try:
            results[name] = {c: asyncio.run(run_level(server.url, c, args.requests or max(8, 2 * c),
                                                      args.max_tokens, prompts)) for c in args.concurrency}
        except httpx.HTTPError as e:
            raise SystemExit(f"{name}: {type(e).__name__}: {e}; its log: {Path(tmp) / (name + '.log')}") from None
        finally:
            server.stop()


def _print_table(results: dict, args) -> None:
    names = list(results)
    header = f"{'concurrency':>11} | {'metric':<12} | " + " | ".join(f"{n:>10}" for n in names)
    header += " | cand/base" + (" | base/llama | cand/llama" if "llama.cpp" in results else "")
    print(header)
    for c in args.concurrency:
        for metric in results["baseline"][c]:
            vals = {n: results[n][c][metric] for n in names}
            row = f"{c:>11} | {metric:<12} | " + " | ".join(f"{vals[n]:>10.1f}" for n in names)
            row += f" | {_ratio(vals['candidate'], vals['baseline']):>9.2f}"
            if "llama.cpp" in vals:
                row += (f" | {_ratio(vals['baseline'], vals['llama.cpp']):>10.2f}"
                        f" | {_ratio(vals['candidate'], vals['llama.cpp']):>10.2f}")
            print(row)
    if args.offline:
        print("\n# offline engine vs transformers' generate (benchmarks/bench_engine.py)", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_engine.py"))], check=True)


@contextlib.contextmanager
def busy_neighbour():
    """Another process spinning on one core for the duration (a build, another service): what
    lmserve's threads meet on a shared host. It dies with this process (killed in `finally`)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    print(f"# busy neighbour: pid {proc.pid} spinning on one core", flush=True)
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


if __name__ == "__main__":
    main()
