"""Where a batch-1 decode step's time goes: torch.profiler over one request's decode on the bundled
model, op by op (self CPU time per token), and the time outside any op (Python between ops and
between steps: scheduling, sampling bookkeeping, detokenizing).

    .venv/bin/python benchmarks/profile_decode.py [--quantization int4] [--quantized-max-rows 4] [--threads N]
    LMSERVE_INT4_KERNEL=torch .venv/bin/python benchmarks/profile_decode.py   # torch's int4 kernel instead

Prints ms per token without the profiler (best of 3 runs of --tokens), then the profiled table.
"""

from __future__ import annotations

import argparse
import time

import lmserve  # noqa: F401 - before torch: the package sets OpenMP's wait policy, read when torch loads


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantization", default="int4")
    p.add_argument("--quantized-max-rows", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--no-profile", action="store_true", help="only the ms/token (A/B runs)")
    p.add_argument("--compile", action="store_true", help="decode steps through the compiled graph")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lmserve import LLM, SamplingParams

    llm = LLM(dtype="bfloat16", quantization=args.quantization, quantized_max_rows=args.quantized_max_rows,
              num_kv_blocks=256, compile=args.compile)
    if args.compile:
        llm.engine.runner.compiled.wait()
    prompt = llm.engine.encode("The history of the printing press begins", add_special_tokens=False)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0))  # warm
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        llm.generate([prompt], params)
        best = min(best, time.perf_counter() - start)
    print(f"quantization {args.quantization}, quantized_max_rows {args.quantized_max_rows}, "
          f"threads {torch.get_num_threads()}: {best / args.tokens * 1e3:.2f} ms/token "
          f"({args.tokens / best:.1f} tok/s, prefill included)")
    if args.no_profile:
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        llm.generate([prompt], params)
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_self = sum(e.self_cpu_time_total for e in events) / 1e3  # ms, every op's own time
    outside = (wall * 1e3 - total_self) / args.tokens
    print(f"\nprofiled: {wall / args.tokens * 1e3:.2f} ms/token wall, ops' self time "
          f"{total_self / args.tokens:.2f} ms/token, outside ops {outside:.2f} ms/token")
    print(f"{'op':<52} {'ms/token':>9} {'calls/token':>12} {'share':>6}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        ms = e.self_cpu_time_total / 1e3 / args.tokens
        print(f"{e.key[:52]:<52} {ms:9.3f} {e.count / args.tokens:12.1f} {ms / (wall * 1e3 / args.tokens):6.1%}")


if __name__ == "__main__":
    main()
