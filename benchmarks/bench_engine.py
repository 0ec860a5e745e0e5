"""lmserve's engine vs transformers' generate on the bundled model, side by side in one run.

Same token-id prompts (64 tokens each, distinct per row), same number of new tokens with EOS
ignored, same dtype, greedy. Prints output tokens/s for both and the ratio lmserve/transformers.

    .venv/bin/python benchmarks/bench_engine.py [--batch-sizes 1 8 32] [--dtype bfloat16]

`--cpu-attention both` times the engine with its decode attention both ways on the same engine
(attention/cpu_decode_kernel.py's paged kernel and the gather + SDPA path it replaced, alternated,
best of two each) and prints the ratio; transformers is skipped then.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lmserve import LLM, SamplingParams
from lmserve.models.loader import DEFAULT_MODEL_ID, bundled_model_path

_TEXT = ("The history of computing is a story of people who turned ideas into machines, and machines "
         "into tools that changed how everyone works, learns, travels and talks to one another. ")


def make_prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    base = tokenizer.encode(_TEXT * (8 + (length + 3 * batch) // 30), add_special_tokens=False)
    # Rows differ by where they start in the text, so no two prompts are the same.
    return [base[i * 3:i * 3 + length] for i in range(batch)]


def bench_lmserve(llm: LLM, prompts, new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return len(prompts) * new_tokens / elapsed


def bench_transformers(model, prompts, new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(prompts) * new_tokens / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--cpu-attention", choices=["kernel", "gather", "both"], default="kernel",
                    help="CPU decode attention: the paged kernel (default), the gather path, or both in turn")
    args = ap.parse_args()
    if args.cpu_attention != "kernel":
        from lmserve.attention import cpu_decode_kernel

        cpu_decode_kernel.set_enabled(False)
    if args.cpu_attention == "both":
        return compare_cpu_attention(args)

    llm = LLM(DEFAULT_MODEL_ID, dtype=args.dtype)
    hf = None
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        path = bundled_model_path()
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=getattr(torch, args.dtype)).eval()
    # Warm up both (first-call allocations, lazy init) outside the timed runs.
    warm = make_prompts(llm.tokenizer, 2, args.prompt_len)
    bench_lmserve(llm, warm, 8)
    if hf is not None:
        bench_transformers(hf, warm, 8)

    print(f"# {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"dtype {args.dtype}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, ignore_eos")
    print("| batch | lmserve tok/s | transformers tok/s | ratio |")
    print("|---:|---:|---:|---:|")
    for b in args.batch_sizes:
        prompts = make_prompts(llm.tokenizer, b, args.prompt_len)
        ours = bench_lmserve(llm, prompts, args.new_tokens)
        if hf is None:
            print(f"| {b} | {ours:.1f} | - | - |", flush=True)
            continue
        theirs = bench_transformers(hf, prompts, args.new_tokens)
        print(f"| {b} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |", flush=True)


def compare_cpu_attention(args) -> None:
    from lmserve.attention import cpu_decode_kernel

    # Eager steps: a CPU graph would keep the attention path it recorded whatever the switch says.
    llm = LLM(DEFAULT_MODEL_ID, dtype=args.dtype, cpu_graphs=False)
    bench_lmserve(llm, make_prompts(llm.tokenizer, 2, args.prompt_len), 8)
    print(f"# {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"dtype {args.dtype}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, ignore_eos")
    print("| batch | gather + SDPA tok/s | paged kernel tok/s | kernel / gather |")
    print("|---:|---:|---:|---:|")
    for b in args.batch_sizes:
        prompts = make_prompts(llm.tokenizer, b, args.prompt_len)
        rates = {False: 0.0, True: 0.0}
        for on in (False, True, True, False):  # alternated, best of two each: the box's load drifts
            cpu_decode_kernel.set_enabled(on)
            rates[on] = max(rates[on], bench_lmserve(llm, prompts, args.new_tokens))
        print(f"| {b} | {rates[False]:.1f} | {rates[True]:.1f} | {rates[True] / rates[False]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
