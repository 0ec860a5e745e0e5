"""Weight-only int8 / int4 through the linear layers' quant_method: the kernels compute what the
stored grid says, the LM head stays dense, memory drops, and the bundled model's perplexity on a
fixed text stays within a bound of the dense model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmserve import LLM, SamplingParams
from lmserve.engine.scoring import perplexity
from lmserve.layers import q4_kernel
from lmserve.layers.linear import Linear
from lmserve.layers.quantization import INT4_GROUP, quantize_model

TEXT = (Path(__file__).parents[1] / "data" / "perplexity_text.txt").read_text()


def _dequantized(layer: Linear, method: str) -> torch.Tensor:
    """The weight the stored grid stands for, rebuilt independently of the kernels."""
    if method == "int8":
        return layer.qweight.float() * layer.scales.float()[:, None]
    return q4_kernel.dequantize_int4(layer.qweight, layer.scales_zeros, layer.input_size)


@pytest.mark.parametrize("method,tol", [("int8", 0.01), ("int4", 0.12)])
def test_quantized_linear_matches_its_grid_and_stays_close_to_dense(method, tol):
    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear(128, [96, 64], bias=True))
    with torch.no_grad():
        model[0].weight.normal_(0, 0.05)
        model[0].bias.normal_(0, 0.1)
    dense_w, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    assert quantize_model(model, method) == 1
    layer = model[0]
    assert layer.weight is None  # the dense copy is gone
    x = torch.randn(5, 128)
    y = layer(x)
    if method == "int8":
        # The kernel takes bf16 activations: compare with the same rounding of x.
        xb = x.bfloat16().float()
        torch.testing.assert_close(y, F.linear(xb, _dequantized(layer, method), bias), atol=2e-2, rtol=1e-2)
        per_channel = layer.scales.float()
        assert (dense_w - _dequantized(layer, method)).abs().amax(dim=1).le(per_channel / 2 + 1e-7).all()
    rel = (y - F.linear(x, dense_w, bias)).norm() / F.linear(x, dense_w, bias).norm()
    assert rel < tol


@pytest.fixture(scope="module")
def quantized_engines(smollm):
    # The dense baseline is the suite's shared float32 SmolLM2.
    return {"none": smollm, **{q: LLM(dtype="float32", quantization=q, num_kv_blocks=64) for q in ("int8", "int4")}}


def test_quantized_models_keep_perplexity_and_shrink_weights(quantized_engines):
    ids = quantized_engines["none"].engine.tokenizer.encode(TEXT)
    ppl = {q: perplexity(llm.engine, ids) for q, llm in quantized_engines.items()}
    assert 5 < ppl["none"] < 60, ppl
    assert ppl["int8"] / ppl["none"] < 1.05, ppl
    # The bundled GGUF is Q4_1: int4 group 32 is its grid; what moves is the VNNI kernel's int8
    # rounding of the activations (every product here, prefill included), bounded at 1%.
    assert ppl["int4"] / ppl["none"] < 1.01, ppl

    def linear_bytes(llm):  # the layers' weights, without the (dense, tied) head
        total = 0
        for name, m in llm.engine.model.named_modules():
            if isinstance(m, Linear) and name != "lm_head":
                for t in (m.weight, getattr(m, "qweight", None)):
                    total += t.numel() * t.element_size() if t is not None else 0
        return total

    dense = linear_bytes(quantized_engines["none"])
    assert linear_bytes(quantized_engines["int8"]) < 0.27 * dense  # fp32 -> int8 plus per-channel scales
    assert linear_bytes(quantized_engines["int4"]) < 0.15 * dense  # 4 bits plus a scale and zero per 32
    head = quantized_engines["int4"].engine.model.lm_head
    assert head.weight is not None and getattr(head, "qweight", None) is None


def test_quantized_engine_serves_batched_and_stays_deterministic(quantized_engines):
    llm = quantized_engines["int4"]
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=8, temperature=0)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone and all(len(t) > 0 for t in batched)


def test_unknown_quantization_is_refused_before_loading():
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(quantization="int3")


def test_layers_the_kernels_cannot_take_stay_dense():
    model = torch.nn.Sequential(Linear(40, 64), Linear(64, 24), Linear(64, 64))
    assert quantize_model(model, "int8") == 2  # 40 inputs: not a multiple of 16
    assert model[0].weight is not None and model[1].weight is None
    model = torch.nn.Sequential(Linear(48, 64), Linear(64, 24), Linear(64, 64))
    assert quantize_model(model, "int4") == 1  # 48 inputs: not whole groups of 32; 24 rows
    assert model[2].weight is None and model[0].weight is not None and model[1].weight is not None


def test_int4_from_a_q4_1_gguf_keeps_the_files_codes(quantized_engines):
    """The bundled GGUF is Q4_1: int4 takes each block's codes, d and m as they are (the VNNI
    kernel's fp16 d and m; torch's kernel: scale d, zero m + 8d, rounded to bf16), rather than
    requantizing a dequantized copy."""
    from gguf import GGUFReader

    from lmserve.models.gguf import q4_1_grid, undo_rope_permute
    from lmserve.models.loader import bundled_model_path

    reader = GGUFReader(str(bundled_model_path()))
    model = quantized_engines["int4"].engine.model
    config = quantized_engines["int4"].engine.model_config
    checked = 0
    for gguf_name, layer, heads, rows in [("blk.3.ffn_down.weight", model.layers[3].mlp.down_proj, None, None),
                                          ("blk.5.attn_k.weight", model.layers[5].self_attn.qkv_proj,
                                           config.num_kv_heads, slice(576, 768))]:
        t = next(t for t in reader.tensors if t.name == gguf_name)
        shape = tuple(reversed([int(x) for x in t.shape]))
        grid = q4_1_grid(t.data, shape)
        if heads:
            grid = grid.permute_rows(torch.from_numpy(undo_rope_permute(np.arange(shape[0]), heads)))
        # The VNNI kernel keeps the file's fp16 d and m exactly; torch's kernel rounds them to bf16.
        vnni = layer.scales_zeros.dtype == torch.float16
        scale, zero = (grid.scale, grid.zero) if vnni else (grid.scale.bfloat16().float(), grid.zero.bfloat16().float())
        expected = (grid.codes.float() - 8).reshape(shape[0], -1, INT4_GROUP) * scale[..., None] + zero[..., None]
        got = _dequantized(layer, "int4")[rows if rows else slice(None)]
        torch.testing.assert_close(got, expected.reshape(shape), atol=1e-6, rtol=0)
        checked += 1
    assert checked == 2


def test_quantized_max_rows_sends_big_products_to_the_kept_dense_weight():
    torch.manual_seed(0)
    hybrid = torch.nn.Sequential(Linear(128, 64))
    with torch.no_grad():
        hybrid[0].weight.normal_(0, 0.05)
    dense_w = hybrid[0].weight.detach().clone()
    only = torch.nn.Sequential(Linear(128, 64))
    with torch.no_grad():
        only[0].weight.copy_(dense_w)
    quantize_model(hybrid, "int4", dense_above_rows=2)
    quantize_model(only, "int4")
    assert hybrid[0].weight is not None and only[0].weight is None
    small, big = torch.randn(2, 128), torch.randn(5, 128)
    assert torch.equal(hybrid[0](small), only[0](small))  # the int4 kernel for 2 rows
    torch.testing.assert_close(hybrid[0](big), F.linear(big, dense_w))  # the dense weight for 5
    assert not torch.allclose(only[0](big), F.linear(big, dense_w), atol=1e-4)


def test_gguf_grids_with_a_dense_copy_for_big_products_in_bf16():
    """`lmserve serve`'s default for the bundled Q4_1 GGUF (engine/serving_defaults.py): int4 from
    the file's grids plus a dense copy for products of more than a few rows, in the compute dtype
    (bf16 here). Prefill (many rows) runs the copy and decode (one row) the grid; the copy holds the
    grid's own values, so the two paths agree on what the weight is."""
    from lmserve.layers.quantization.gguf import GGUFGridMethod

    llm = LLM(quantization="int4", quantized_max_rows=4, num_kv_blocks=32)  # dtype auto: bf16 on CPU
    layers = [m for m in llm.engine.model.modules() if isinstance(m, Linear) and isinstance(m.quant_method,
                                                                                            GGUFGridMethod)]
    assert layers and all(m.weight.dtype == torch.bfloat16 for m in layers)
    layer = layers[0]
    torch.testing.assert_close(layer.weight.float(), _dequantized(layer, "int4").to(torch.bfloat16).float())
    ids = llm.engine.tokenizer.encode("The capital of France is")
    out = llm.generate([ids], SamplingParams(max_tokens=6, temperature=0.0))[0].outputs[0]
    assert len(out.token_ids) == 6 and "Paris" in out.text, out.text
