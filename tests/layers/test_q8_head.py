"""The LM head's Q8_0 copy (layers/quantization/q8_head.py): the kernel against an independent
reference, and on the bundled model (served int4, its default) the head's one-row products against
the dense head over tests/data/perplexity_text.txt: perplexity, top-1 agreement, and which products
take which path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmserve.layers import q4_kernel
from lmserve.layers.linear import DenseLinearMethod
from lmserve.layers.quantization.q8_head import Q8HeadMethod

needs_kernel = pytest.mark.skipif(not q4_kernel.available(), reason=f"{q4_kernel.unavailable_reason()}")
TEXT = Path(__file__).parents[1] / "data" / "perplexity_text.txt"


@needs_kernel
@pytest.mark.parametrize("n,k", [(48, 576), (50, 160), (7, 32)])  # whole tiles of 16 rows, a part tile, less than one
def test_q8_product_matches_an_independent_reference(n, k):
    g = torch.Generator().manual_seed(n)
    w = 0.05 * torch.randn(n, k, generator=g)
    packed = q4_kernel.pack_q8(w, chunk_rows=32)
    with pytest.raises(ValueError, match="multiple of 16"):  # a chunk must fill whole tiles
        q4_kernel.pack_q8(w, chunk_rows=24)
    codes, d = q4_kernel.q8_blocks(*packed, n)
    assert codes.dtype == torch.uint8 and d.dtype == torch.float16 and codes.shape == (n, k)
    blocks = w.reshape(n, -1, 32)
    assert torch.equal(d, (blocks.abs().amax(-1) / 127).half())
    wq = (codes.float() - 128).reshape(n, -1, 32) * d.float()[..., None]
    assert (wq - blocks).abs().amax(-1).le(d.float() / 2 + 1e-7).all(), "every weight within half a step"
    for rows in (1, 3, 9):
        x = torch.randn(rows, k, generator=g)
        xb = x.reshape(rows, -1, 32)
        amax = xb.abs().amax(-1)
        qx = torch.round(xb * torch.where(amax > 0, 127 / amax, 0)[..., None]).clamp(-127, 127)
        ref = torch.einsum("rbi,nbi->rn", (qx * (amax / 127)[..., None]).double(), wq.double())
        torch.testing.assert_close(q4_kernel.q8_linear(x, *packed, n).double(), ref, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_q8_blocks_of_a_dequantized_q8_weight_are_its_own():
    g = torch.Generator().manual_seed(1)
    d = (torch.rand(64, 6, generator=g) * 0.01 + 1e-4).half()
    q = torch.randint(-127, 128, (64, 6, 32), generator=g)
    q[:, :, 0] = 127  # a block's largest magnitude is 127 steps, as llama.cpp quantizes
    w = (q.float() * d.float()[..., None]).reshape(64, 192)
    codes, scales = q4_kernel.q8_blocks(*q4_kernel.pack_q8(w), 64)
    assert torch.equal(scales, d) and torch.equal(codes.long() - 128, q.reshape(64, 192))


@needs_kernel
def test_bundled_model_head_one_row_products_against_dense():
    from lmserve import LLM, SamplingParams

    llm = LLM(quantization="int4", num_kv_blocks=64)  # the serving default for the bundled GGUF
    model = llm.engine.model
    head = model.lm_head
    assert isinstance(head.quant_method, Q8HeadMethod)
    ids = llm.engine.tokenizer.encode(TEXT.read_text())[:256]
    # The final norm's output at every position from one prefill, then the head row by row (what
    # decode asks of it) against the dense head over all rows at once.
    captured = []
    hook = model.norm.register_forward_hook(lambda module, args, out: captured.append(out.clone()))
    try:
        llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0))
    finally:
        hook.remove()
    hidden = captured[0]
    assert hidden.shape[0] == len(ids)
    with torch.inference_mode():
        dense = DenseLinearMethod.apply(head.quant_method, head, hidden).float()[:, :head.vocab_size]
        one_row = torch.cat([head.quant_method.apply(head, hidden[i:i + 1]) for i in range(len(ids))]).float()
    one_row = one_row[:, :head.vocab_size]
    targets = torch.tensor(ids[1:])

    def ppl(logits):
        return math.exp(torch.nn.functional.cross_entropy(logits[:-1], targets).item())

    ratio = ppl(one_row) / ppl(dense)
    agree = (one_row.argmax(-1) == dense.argmax(-1)).float().mean().item()
    print(f"Q8_0 head: perplexity {ppl(one_row):.3f} vs dense {ppl(dense):.3f} ({ratio:.4f}x), "
          f"top-1 agreement {agree:.3f}")  # measured: 22.760 vs 22.801 (0.998x), 0.962
    assert abs(ratio - 1) < 0.01 and agree >= 0.93
    # Many rows keep the dense weight.
    assert torch.equal(head.quant_method.apply(head, hidden[:4]), DenseLinearMethod.apply(head.quant_method, head,
                                                                                           hidden[:4]))


def test_dense_when_turned_off_or_not_quantized(monkeypatch):
    from lmserve import LLM

    monkeypatch.setenv("LMSERVE_LM_HEAD", "dense")
    assert type(LLM(quantization="int4", num_kv_blocks=16).engine.model.lm_head.quant_method) is DenseLinearMethod
    monkeypatch.delenv("LMSERVE_LM_HEAD")
    assert type(LLM(quantization="none", num_kv_blocks=16).engine.model.lm_head.quant_method) is DenseLinearMethod


@needs_kernel
def test_untied_head_packed_once_as_its_tensor_arrives(tmp_path):
    """An untied head is finished by the loader as soon as its tensor is in (a tied one at the end):
    the method is chosen before loading, so either way its blocks are built, once."""
    from lmserve import LLM, SamplingParams
    from tests.support.family_checkpoints import build_llama

    build_llama(tmp_path)
    llm = LLM(str(tmp_path), dtype="bfloat16", quantization="int4", num_kv_blocks=16)
    head = llm.engine.model.lm_head
    assert isinstance(head.quant_method, Q8HeadMethod) and head.weight is not llm.engine.model.embed_tokens.weight
    codes, scales = q4_kernel.pack_q8(head.weight.detach())
    assert torch.equal(head.q8[0], codes) and torch.equal(head.q8[1], scales)
    x = torch.randn(1, head.input_size).to(torch.bfloat16)
    assert torch.equal(head.quant_method.apply(head, x), q4_kernel.q8_linear(x, codes, scales, head.weight.shape[0]))
    out = llm.generate([[1, 5, 9]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 4
