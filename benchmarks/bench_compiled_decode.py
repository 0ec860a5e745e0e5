"""Compiled decode (`compile: true`) vs eager decode on the bundled model, in one run.

For each weight format (bf16, int4) one engine compiles its decode forward; then, on that same
engine, the same decode steps run eager and compiled (the switch is `runner.compiled.enabled`):
- step: one decode forward plus LM head (ModelRunner.execute) over B sequences with 128 tokens
  of context, median of --steps steps;
- generate: greedy LLM.generate of B prompts (64 tokens, 128 new, EOS ignored), output tok/s
  (prefill runs eager either way); both alternated, best of two;
and prints compiled/eager ratios (below 1 for step time, above 1 for tok/s is better), the
compile time and the greedy agreement of compiled with eager over the generated tokens.

    .venv/bin/python benchmarks/bench_compiled_decode.py [--batch-sizes 1 8 32] [--formats bf16 int4]

Set TORCHINDUCTOR_CACHE_DIR to an empty directory to time a cold compile.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from lmserve import LLM, SamplingParams
from lmserve.model_input import ModelInput
from lmserve.models.loader import DEFAULT_MODEL_ID

_TEXT = ("The history of computing is a story of people who turned ideas into machines, and machines "
         "into tools that changed how everyone works, learns, travels and talks to one another. ")


def decode_batch(llm: LLM, batch: int, context: int) -> ModelInput:
    """B sequences with `context` cached tokens each (their cache content is whatever the
    blocks hold: step time does not depend on it), one new token each."""
    bs = llm.engine.runner.block_size
    per_seq = -(-(context + 1) // bs)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    return ModelInput([11] * batch, [1] * batch, [context] * batch, tables, batch, list(range(batch)))


def step_ms(llm: LLM, batch: ModelInput, steps: int) -> float:
    runner = llm.engine.runner
    runner.execute(batch)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.execute(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def generate(llm: LLM, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return len(prompts) * new_tokens / elapsed, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--formats", nargs="+", default=["bf16", "int4"], choices=["bf16", "int8", "int4"])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"Inductor cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR', '(torch default)')}")
    print(f"{'weights':7} {'B':>3}  {'eager ms':>8} {'comp ms':>8} {'ratio':>5}  "
          f"{'eager tok/s':>11} {'comp tok/s':>10} {'ratio':>5}  {'greedy agree':>12}")
    for fmt in args.formats:
        started = time.perf_counter()
        llm = LLM(DEFAULT_MODEL_ID, dtype="bfloat16", quantization="none" if fmt == "bf16" else fmt, compile=True)
        compiled = llm.engine.runner.compiled
        if compiled is None or not compiled.wait():
            raise SystemExit(f"{fmt}: compiled decode unavailable: {compiled and compiled.error}")
        print(f"{fmt}: engine up and compiled in {time.perf_counter() - started:.1f}s "
              f"(compile {compiled.compile_seconds:.1f}s)")
        base = llm.tokenizer.encode(_TEXT * 8, add_special_tokens=False)
        for b in args.batch_sizes:
            batch = decode_batch(llm, b, args.context)
            eager_ms = comp_ms = float("inf")
            for _ in range(2):  # alternated, best of two: a neighbour's burst on a shared host hits one side only
                compiled.enabled = False
                eager_ms = min(eager_ms, step_ms(llm, batch, args.steps))
                compiled.enabled = True
                comp_ms = min(comp_ms, step_ms(llm, batch, args.steps))
            prompts = [base[i * 3:i * 3 + 64] for i in range(b)]
            eager_tps = comp_tps = 0.0
            for _ in range(2):  # alternated, best of two, as above
                compiled.enabled = False
                tps, eager_ids = generate(llm, prompts, args.new_tokens)
                eager_tps = max(eager_tps, tps)
                compiled.enabled = True
                tps, comp_ids = generate(llm, prompts, args.new_tokens)
                comp_tps = max(comp_tps, tps)
            same = sum(x == y for e, c in zip(eager_ids, comp_ids) for x, y in zip(e, c))
            print(f"{fmt:7} {b:3d}  {eager_ms:8.2f} {comp_ms:8.2f} {comp_ms / eager_ms:5.2f}  "
                  f"{eager_tps:11.1f} {comp_tps:10.1f} {comp_tps / eager_tps:5.2f}  "
                  f"{same / (b * args.new_tokens):11.0%}", flush=True)
        del llm


if __name__ == "__main__":
    main()
