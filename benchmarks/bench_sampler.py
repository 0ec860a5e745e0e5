"""The sampler at batch 32 over a 49,152-token vocabulary, per parameter mix, optionally beside a
baseline tree (another checkout's `src`) measured in a subprocess of the same run.

Logits are synthetic but shaped like a model's: normal noise with a few dozen strong tokens, so
a top_p nucleus holds tens of tokens as it does for real text (a flat random row would make
every nucleus method sort the vocabulary).

    .venv/bin/python benchmarks/bench_sampler.py [--baseline /path/to/other/checkout] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top_p": dict(temperature=0.8, top_p=0.9),
    "top_k": dict(temperature=0.8, top_k=50),
    "top_k+top_p+penalties": dict(temperature=0.8, top_k=50, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.3),
    "top_p+repetition": dict(temperature=0.8, top_p=0.9, repetition_penalty=1.1),
}


def measure(batch: int, vocab: int, repeats: int) -> dict[str, float]:
    """Milliseconds per sampler call for each case (median of `repeats`)."""
    import torch

    from lmserve.engine.detokenizer import IncrementalDetokenizer
    from lmserve.engine.sampler import Sampler
    from lmserve.engine.sequence import Request, Sequence
    from lmserve.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=gen) * 2
    logits[:, :30] += 10
    # bf16, as a bf16 model's LM head returns them (the sampler's float32 copy is part of the cost)
    logits = logits[:, torch.randperm(vocab, generator=gen)].bfloat16()
    prompt = torch.randint(0, vocab, (200,), generator=gen).tolist()
    outputs = torch.randint(0, vocab, (batch, 100), generator=gen).tolist()
    sampler = Sampler()
    results = {}
    for name, kwargs in CASES.items():
        params = SamplingParams(**kwargs)
        seqs = [Sequence(i, Request(f"r{i}", prompt, params, 0.0, seed=i), 0, prompt + outputs[i], sampling_key=i,
                         detok=IncrementalDetokenizer(None)) for i in range(batch)]
        for _ in range(3):
            sampler(logits, seqs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            sampler(logits, seqs)
            times.append(time.perf_counter() - start)
        results[name] = sorted(times)[len(times) // 2] * 1e3
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--baseline", help="a checkout whose src/ is measured the same way, for the ratio")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the baseline subprocess
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    base = None
    if args.baseline:
        cmd = [sys.executable, __file__, "--json", "--batch", str(args.batch), "--vocab", str(args.vocab),
               "--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])
        env = dict(os.environ, PYTHONPATH=os.path.join(args.baseline, "src"))
        base = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
    ours = measure(args.batch, args.vocab, args.repeats)
    if args.json:
        print(json.dumps(ours))
        return
    print(f"# batch {args.batch}, vocab {args.vocab}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median ms per call")
    print("| case | this tree ms |" + (" baseline ms | speedup |" if base else ""))
    print("|---|---:|" + ("---:|---:|" if base else ""))
    for name, ms in ours.items():
        row = f"| {name} | {ms:.2f} |"
        if base:
            row += f" {base[name]:.2f} | {base[name] / ms:.1f}x |"
        print(row)


if __name__ == "__main__":
    main()
