"""A Qwen2-MoE checkpoint served dense (bf16) and from its FP8 (fbgemm) and GPTQ int4 versions,
experts included, each in a fresh process: peak resident size during loading, resident size
after it, and batch-1 greedy decode speed, with ratios against the dense load measured in the
same run.

The checkpoint is transformers' Qwen2MoeForCausalLM with random weights (the values do not
matter for memory or speed; no real MoE checkpoint is small enough for this box), saved in bf16;
the FP8 and GPTQ versions are written from it by the tests' independent writers
(tests/layers/test_fp8.py write_fbgemm, tests/support/int4_checkpoints.py). Default: 4 layers x
32 experts of 512 x 512 (101M expert weights, 192 MiB in bf16). On a CPU the FP8 experts are the
weight-only path (each routed expert's fp8 weight dequantized per call): its memory is the
point, not its speed; GPU speed is not measured here.

    .venv/bin/python benchmarks/bench_quantized_experts.py [--layers 4 --experts 32 --width 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, from a script

_RUN = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from lmserve import SamplingParams
from lmserve.engine.llm_engine import LLMEngine

def status_mib(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key))) / 1024

start = time.perf_counter()
engine = LLMEngine(sys.argv[1], dtype="bfloat16", num_kv_blocks=64)
out = {"load_s": time.perf_counter() - start, "peak": status_mib("VmHWM"), "rss": status_mib("VmRSS")}

def decode(tokens):
    engine.add_request("r", [5, 6, 7, 8], SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()

decode(4)  # warm-up
start = time.perf_counter()
decode(32)
out["tok_s"] = 32 / (time.perf_counter() - start)
print(json.dumps(out))
"""


def build(directory: Path, layers: int, experts: int, width: int) -> int:
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(vocab_size=1024, hidden_size=width, intermediate_size=width, num_hidden_layers=layers,
                            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                            num_experts=experts, num_experts_per_tok=4, moe_intermediate_size=width,
                            shared_expert_intermediate_size=width, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    return layers * experts * 3 * width * width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--width", type=int, default=512, help="hidden and expert width")
    parser.add_argument("--group", type=int, default=128, help="GPTQ group size")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from tests.layers.test_fp8 import write_fbgemm
    from tests.support.int4_checkpoints import write_int4_pair

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        expert_weights = build(tmp / "bf16", args.layers, args.experts, args.width)
        write_fbgemm(tmp / "bf16", tmp / "fbgemm_fp8")
        write_int4_pair(tmp / "bf16", tmp / "gptq", tmp / "gptq-dequantized", "gptq", group=args.group)
        print(f"Qwen2-MoE: {args.layers} layers x {args.experts} experts of {args.width} x {args.width}, "
              f"{expert_weights / 1e6:.0f}M expert weights ({2 * expert_weights / 2**20:.0f} MiB in bf16); "
              f"{args.threads} threads")
        runs = {}
        for mode in ("bf16", "fbgemm_fp8", "gptq"):
            child = subprocess.run([sys.executable, "-c", _RUN, str(tmp / mode), str(args.threads)],
                                   capture_output=True, text=True, check=True)
            runs[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    base = runs["bf16"]
    print("| checkpoint | load s | peak RSS MiB | RSS after load MiB | batch-1 decode tok/s |")
    print("|---|---:|---:|---:|---:|")
    for mode, r in runs.items():
        name = mode if mode != "gptq" else f"gptq (int4, group {args.group})"
        print(f"| {name} | {r['load_s']:.1f} | {r['peak']:.0f} ({r['peak'] / base['peak']:.2f}x) | "
              f"{r['rss']:.0f} ({r['rss'] / base['rss']:.2f}x) | "
              f"{r['tok_s']:.1f} ({r['tok_s'] / base['tok_s']:.2f}x) |")


if __name__ == "__main__":
    main()
