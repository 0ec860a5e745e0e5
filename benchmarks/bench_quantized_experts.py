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
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, from a script

from benchmarks.fresh_load import measure, print_table  # noqa: E402


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
        names = {"bf16": "bf16", "fbgemm_fp8": "fbgemm_fp8", "gptq": f"gptq (int4, group {args.group})"}
        runs = {name: measure(tmp / mode, "checkpoint", args.threads) for mode, name in names.items()}
    print_table("checkpoint", runs)

if __name__ == "__main__":
    main()
