"""Quantization formats on the bundled model, each mode in its own process, side by side:
resident memory after loading, offline tokens/s for 32 chat prompts x 64 tokens one request at a
time (batch 1) and all at once (batch 32), the time of one 1,024-token prefill, perplexity of
tests/data/perplexity_text.txt (one prefill: the kernel of large products), and greedy agreement
with the first mode on the batch-1 runs (share of positions before the first difference, and of
whole sequences equal).

    .venv/bin/python benchmarks/bench_quantization.py [--modes none int4 int4:2 int8] [--threads N]

A mode is `none`, `int8`, `int4` or `fp8` (the `quantization` option), optionally `:N` for
quantized_max_rows=N (a bf16 copy serves products of more than N rows), optionally prefixed by a
GGUF type the bundled file is first re-encoded in (benchmarks/gguf_reencode.py: Q8_0, Q5_0, Q4_0,
Q4_1 by gguf-py, Q4_K, Q6_K and the Q4_K_M mix by tests/support/gguf_kquants.py; e.g. `Q8_0/int8`
loads a Q8_0 file as int8, `Q4_0/int4` keeps its 4-bit blocks as the int4 grid, `Q4_K_M/none`
measures the file itself, dequantized), optionally suffixed `+fp8kv` for an fp8 KV cache
(kv_cache_dtype fp8). The first mode is the reference for agreement and ratios. RSS is the
resident size after loading; peak RSS the process's maximum over loading and the whole run.
Perplexity is of one prefill (no token reads the KV cache); "cached ppl" scores the same text
in 16-token chunks, each attending to the earlier ones through the cache (what an fp8 cache moves).

    .venv/bin/python benchmarks/bench_quantization.py --modes none int4 Q8_0/int8 Q4_0/int4

(`fp8` runs too, but on a CPU it is the weight-only path that dequantizes every weight on every
call: minutes for this workload; its speed is measured on a GPU by gpu_check.py's fp8 part.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "perplexity_text.txt"
_QUESTIONS = ["Write a haiku about the sea.", "What is the capital of Japan?", "Explain recursion simply.",
              "Give three tips for sleeping well.", "Translate 'good morning' into Spanish.",
              "What is 17 times 23?", "Name a famous painter and one work.", "Describe a cat in one sentence.",
              "Why is the sky blue?", "Write a Python function that reverses a string."]


PROMPTS, TOKENS = 32, 64  # --quick: 8 prompts x 16 tokens (a loaded machine)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gguf_file(gguf_type: str) -> str:
    """The bundled model re-encoded as `gguf_type` (made once, kept in the temp dir)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from gguf_reencode import reencode

    from lmserve.models.loader import bundled_model_path

    path = Path(tempfile.gettempdir()) / f"lmserve-bench-smollm2.{gguf_type}.gguf"
    if not path.is_file():
        reencode(bundled_model_path(), path.with_suffix(".part"), gguf_type).rename(path)
    return str(path)


def run_mode(mode: str, threads: int | None) -> dict:
    import torch

    from lmserve import LLM, SamplingParams
    from lmserve.engine.scoring import perplexity

    if threads:
        torch.set_num_threads(threads)
    gguf_type, _, mode = mode.rpartition("/")
    mode, fp8kv, _ = mode.partition("+fp8kv")
    quant, _, rows = mode.partition(":")
    model = {"model": gguf_file(gguf_type)} if gguf_type else {}
    llm = LLM(dtype="bfloat16", quantization=quant, quantized_max_rows=int(rows) if rows else None,
              num_kv_blocks=1024, kv_cache_dtype="fp8" if fp8kv else "auto", **model)
    out = {"rss_mib": _rss_mib(), "load_peak_rss_mib": _peak_rss_mib()}
    from lmserve.chat.prompt import render_chat

    prompts = [llm.engine.encode(render_chat(llm.tokenizer, [{"role": "user", "content": f"{q} (#{i})"}]),
                                 add_special_tokens=False) for i in range(4) for q in _QUESTIONS[:8]]
    prompts = prompts[:PROMPTS]
    greedy = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm
    # One request at a time: what a single user gets, and the decode rows the int4 kernel takes.
    start = time.perf_counter()
    out["tokens"] = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
    out["decode_b1"] = len(prompts) * TOKENS / (time.perf_counter() - start)
    start = time.perf_counter()
    llm.generate(prompts, greedy)
    out["decode_b32"] = len(prompts) * TOKENS / (time.perf_counter() - start)
    ids = llm.engine.tokenizer.encode(TEXT.read_text())
    out["perplexity"] = perplexity(llm.engine, ids)
    out["cached_perplexity"] = cached_perplexity(llm.engine, ids)
    long_prompt = (ids * 4)[:1024]
    llm.generate([long_prompt[:64]], SamplingParams(max_tokens=1))
    start = time.perf_counter()
    llm.generate([long_prompt], SamplingParams(max_tokens=1))
    out["prefill_1024_s"] = time.perf_counter() - start
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def cached_perplexity(engine, ids: list[int], chunk: int = 16) -> float:
    """Perplexity of `ids` scored in chunks of `chunk` tokens, each a prefill over the earlier
    chunks' cached keys and values (scoring.perplexity's one prefill never reads the cache)."""
    import math

    import torch

    from lmserve.model_input import ModelInput

    bs = engine.block_manager.block_size
    table = list(engine.block_manager.free_blocks)[:-(-len(ids) // bs)]
    nll = 0.0
    for start in range(0, len(ids) - 1, chunk):
        end = min(start + chunk, len(ids) - 1)
        batch = ModelInput(ids[start:end], [end - start], [start], [table], num_decodes=0,
                           logit_rows=list(range(end - start)))
        logits = engine.executor.execute(batch).float()
        targets = torch.tensor(ids[start + 1:end + 1]).unsqueeze(1)
        nll -= float(torch.log_softmax(logits, dim=-1).gather(1, targets).sum())
    return math.exp(nll / (len(ids) - 1))


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    """(share of positions before the first difference, share of identical sequences)."""
    prefix = 0
    for a, b in zip(ref, got):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += n
    return prefix / sum(len(a) for a in ref), sum(a == b for a, b in zip(ref, got)) / len(ref)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["none", "int4", "int4:2", "int8:2", "Q8_0/int8", "Q4_0/int4"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="8 prompts x 16 tokens instead of 32 x 64")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one mode in this process, print JSON
    args = ap.parse_args()
    global PROMPTS, TOKENS
    if args.quick:
        PROMPTS, TOKENS = 8, 16
    if args.one:
        print(json.dumps(run_mode(args.one, args.threads)))
        return
    results = {}
    for mode in args.modes:
        if "/" in mode:
            gguf_file(mode.split("/")[0])  # re-encode once, outside the timed children
        cmd = [sys.executable, __file__, "--one", mode] + (["--threads", str(args.threads)] if args.threads else [])
        cmd += ["--quick"] if args.quick else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if proc.returncode:
            sys.exit(f"mode {mode} failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        summary = {k: round(v, 2) for k, v in results[mode].items() if isinstance(v, float)}
        print(f"{mode}: {summary}", file=sys.stderr, flush=True)  # progress, should the run be cut
    import platform

    import torch

    ref = results[args.modes[0]]
    print(f"# {platform.machine()}, torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, "
          f"bf16 compute, bundled SmolLM2-135M (Q4_1 GGUF); reference mode {args.modes[0]}")
    print("| mode | RSS MiB | load peak MiB | decode b1 tok/s | decode b32 tok/s | prefill 1024 s | perplexity "
          "| cached ppl | greedy prefix agree | sequences equal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        prefix, whole = agreement(ref["tokens"], r["tokens"])
        print(f"| {mode} | {r['rss_mib']:.0f} | {r['load_peak_rss_mib']:.0f} "
              f"| {r['decode_b1']:.1f} ({r['decode_b1'] / ref['decode_b1']:.2f}x) "
              f"| {r['decode_b32']:.0f} ({r['decode_b32'] / ref['decode_b32']:.2f}x) | {r['prefill_1024_s']:.2f} "
              f"| {r['perplexity']:.2f} ({r['perplexity'] / ref['perplexity']:.3f}x) "
              f"| {r['cached_perplexity']:.2f} ({r['cached_perplexity'] / ref['cached_perplexity']:.3f}x) "
              f"| {prefix:.0%} | {whole:.0%} |")


if __name__ == "__main__":
    main()
