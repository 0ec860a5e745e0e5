"""A short request's time to first token while a long prompt is being prefilled, with the
long-prefill cap off (a prefill may take a whole step's budget) and on, in one run.

For each setting, on its own engine over the bundled model: the short request alone (baseline),
then the same short request added one step after a long prompt started prefilling. Prints both
times to first token, their ratio (contended / alone: 1.0 means the long prompt costs the short
one nothing), and the long prompt's own prefill time (what the cap costs it).

    .venv/bin/python benchmarks/bench_long_prefill.py [--long-tokens 6000] [--threshold 512]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lmserve import LLM, SamplingParams
from lmserve.models.loader import DEFAULT_MODEL_ID

_TEXT = ("The history of computing is a story of people who turned ideas into machines, and machines "
         "into tools that changed how everyone works, learns, travels and talks to one another. ")
FIRST_TOKEN = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def first_token_time(engine, request_id: str) -> float:
    """Step the engine until `request_id` has its first token; seconds taken."""
    start = time.perf_counter()
    while True:
        for out in engine.step():
            if out.request_id == request_id and any(o.token_ids for o in out.outputs):
                return time.perf_counter() - start


def run(threshold: int, long_ids: list[int], short_ids: list[int], dtype: str) -> tuple[float, float, float]:
    llm = LLM(DEFAULT_MODEL_ID, dtype=dtype, long_prefill_token_threshold=threshold, enable_prefix_caching=False,
              max_num_batched_tokens=2048)
    engine = llm.engine
    llm.generate([short_ids[:8]], FIRST_TOKEN)  # warm-up

    engine.add_request("short-alone", short_ids, FIRST_TOKEN)
    alone = first_token_time(engine, "short-alone")

    engine.add_request("long", long_ids, FIRST_TOKEN)
    long_start = time.perf_counter()
    engine.step()  # the long prompt is prefilling now
    engine.add_request("short", short_ids, FIRST_TOKEN)
    contended = first_token_time(engine, "short")
    while engine.has_unfinished():
        engine.step()
    long_prefill = time.perf_counter() - long_start
    return alone, contended, long_prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long-tokens", type=int, default=6000)
    ap.add_argument("--short-tokens", type=int, default=32)
    ap.add_argument("--threshold", type=int, default=512, help="long_prefill_token_threshold of the capped run")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()

    tokenizer = LLM(DEFAULT_MODEL_ID, dtype=args.dtype, num_kv_blocks=16).tokenizer
    text_ids = tokenizer.encode(_TEXT * (args.long_tokens // 30 + 2), add_special_tokens=False)
    long_ids = text_ids[:args.long_tokens]
    short_ids = text_ids[7:7 + args.short_tokens]

    print(f"# {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, dtype {args.dtype}, "
          f"long prompt {len(long_ids)} tokens, short prompt {len(short_ids)} tokens, "
          "max_num_batched_tokens 2048")
    print("| long_prefill_token_threshold | short TTFT alone (s) | short TTFT with long (s) | ratio | "
          "long prefill (s) |")
    print("|---:|---:|---:|---:|---:|")
    results = {}
    for threshold in (0, args.threshold):
        alone, contended, long_prefill = run(threshold, long_ids, short_ids, args.dtype)
        results[threshold] = contended
        label = "off (0)" if threshold == 0 else str(threshold)
        print(f"| {label} | {alone:.3f} | {contended:.3f} | {contended / alone:.1f} | {long_prefill:.2f} |",
              flush=True)
    print(f"# short TTFT under a long prefill, cap off / cap on: {results[0] / results[args.threshold]:.1f}x")


if __name__ == "__main__":
    main()
