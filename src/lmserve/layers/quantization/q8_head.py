"""The LM head in 8-bit blocks for one-row products, on a weight-only quantized (int4/int8) model on
a CPU with the VNNI kernel (layers/q4_kernel.py).

Why: a batch-1 decode step streams every weight once, and the head is the largest: SmolLM2's tied
head is 56 MiB in bf16 against 60 MiB for all its int4 layers together. In llama.cpp's Q8_0 blocks
(an int8 per weight and an fp16 scale per 32, the type SmolLM2's GGUF stores it in) it is 30 MiB,
and the kernel's one-row product over it measured 1.9x faster than oneDNN's bf16 one
(docs/benchmarks.md, "Round three"). Products of more rows (prefill's last tokens, decode
batches) keep the dense weight: each row would stream the blocks again.

Numerics: the blocks are taken from the dense weight (d = amax / 127 per 32, as llama.cpp
quantizes; a weight dequantized from Q8_0 in float32 gets its own blocks back, one rounded to bf16
nearly so), and the activations are rounded to int8 per block of 32 as for the int4 kernel: the
product llama.cpp computes for a Q8_0 head. Heads stayed dense until now because int4 on the head
(16 levels per group) changed about half of greedy tokens; on the bundled model 8-bit blocks score
tests/data/perplexity_text.txt at 0.998x the dense head's perplexity and pick the same top token
at 96% of positions, the others near-ties (tests/layers/test_q8_head.py holds both).

One consequence: with speculative decoding on, a verification step's rows (several per sequence)
take the dense head and a plain decode step's single row the blocks, so a near-tie may resolve
differently than without speculation (as batch shape moves roundings in any engine).

`LMSERVE_LM_HEAD=dense` keeps every head dense (A/B runs).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from lmserve.layers import q4_kernel
from lmserve.layers.linear import DenseLinearMethod, Linear

log = logging.getLogger("lmserve.engine")

ENV = "LMSERVE_LM_HEAD"


class Q8HeadMethod(DenseLinearMethod):
    """The dense method, plus Q8_0 blocks of the weight for one-row products."""

    def process_weights_after_loading(self, layer: Linear) -> None:
        super().process_weights_after_loading(layer)
        w = layer.weight
        layer.q8 = (*q4_kernel.pack_q8(w.detach()), w, w._version)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        q8 = layer.q8
        if q8 is not None and x.dim() == 2 and x.shape[0] == 1 and not torch.compiler.is_dynamo_compiling():
            codes, scales, source, version = q8
            if source is layer.weight and source._version == version:  # blocks of the current weight
                y = q4_kernel.q8_linear(x, codes, scales, source.shape[0])
                return y if layer.bias is None else y + layer.bias
            layer.q8 = None
        return super().apply(layer, x)


def use_q8_heads(model: nn.Module, quantization: str | None) -> int:
    """Give the model's LM heads (ParallelLMHead) the Q8_0 method where it applies: a weight-only
    quantized model (`quantization` int4 or int8), bf16/fp16 weights on the CPU, input widths in
    whole blocks of 32, the VNNI kernel built, and not turned off by LMSERVE_LM_HEAD=dense. Call
    before the weights are loaded (the method takes the dense method's parameters): the head is
    then packed once, blocks included, when its weights are in. Returns how many heads took it."""
    from lmserve.layers.vocab_parallel import ParallelLMHead

    if quantization not in ("int4", "int8") or os.environ.get(ENV) == "dense":
        return 0
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead) and type(m.quant_method) is DenseLinearMethod
             and not m.processed
             and m.weight is not None and m.weight.device.type == "cpu"
             and m.weight.dtype in (torch.bfloat16, torch.float16) and m.input_size % q4_kernel.BLOCK == 0]
    if not heads or not q4_kernel.available():
        return 0
    for head in heads:
        head.quant_method = Q8HeadMethod()
    log.info("LM head: Q8_0 blocks for one-row products (%s=dense keeps it dense)", ENV)
    return len(heads)
