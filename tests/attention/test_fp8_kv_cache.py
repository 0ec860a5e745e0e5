"""The fp8 KV cache (`kv_cache_dtype: fp8`, attention/kv_cache_dtype.py) on CPU.

What is proven, and against what:
- one rounding: e4m3 keeps 3 mantissa bits, so a value in its normal range comes back within
  2^-4 of itself (relative), a subnormal within half its step (2^-10 * scale); the bound is
  reached, not just respected;
- the backends add nothing to that rounding: attention over an fp8 cache equals float32
  attention over the dequantized cache (reference backend and, under Triton's interpreter, the
  CUDA kernels), and reading with another scale than was written breaks it;
- end to end on a tiny Llama: logits within a tolerance stated from the same 2^-4, greedy tokens
  equal, the cache tensors float8 (1 byte) with twice the blocks in the same memory, prefix
  caching and preemption leaving every block free (serve_waves_greedy checks it). On the bundled
  SmolLM2, benchmarks/bench_quantization.py measures perplexity with an fp8 cache (too slow for CI);
- a compressed-tensors checkpoint's `k_scale` / `v_scale` (kv_cache_scheme) are the scales the
  cache uses: 1/16 stays within the tolerance with 16x larger cached values, and a scale of 256
  (every value pushed into e4m3's subnormals) fails it -- the tolerance is not vacuous.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmserve.attention import Attention
from lmserve.attention.kv_cache_dtype import (
    FP8_KV_DTYPE,
    FP8_RELATIVE_ERROR,
    dequantize,
    kv_cache_torch_dtype,
    kv_scale_target,
    quantize,
)
from lmserve.attention.reference import ReferenceBackend
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.options import EngineConfig
from tests.support.family_checkpoints import build_llama, serve_waves_greedy

from .test_triton_attention import NUM_BLOCKS, PAGE, _batch

# End to end, every cached key and value carries up to 2^-4 relative error; through softmax and
# three layers the logits move by a fraction of that. Stated as: the largest logit difference at
# most 2^-4 of the logits' own range (measured on the tiny Llama: 0.025, about 0.4 of it).
LOGIT_TOLERANCE = FP8_RELATIVE_ERROR
STEPS = 16  # greedy tokens per request (a random tiny model's near-ties part the runs after ~25)


def _max_logit_error(reference: list, got: list) -> float:
    """Largest |difference| of logits, as a fraction of the reference's range, over the steps both
    runs took from the same context (up to and including the first token they disagree on)."""
    worst = 0.0
    for (ref_tokens, ref_logits), (tokens, logits) in zip(reference, got, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), len(tokens))
        for ref_row, row in zip(ref_logits[:same + 1], logits[:same + 1]):
            worst = max(worst, ((row - ref_row).abs().max() / (ref_row.max() - ref_row.min())).item())
    return worst


def test_one_e4m3_rounding_is_within_its_bound_and_reaches_it():
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 0.05, 3.0):
        x = torch.randn(4096, generator=g) * torch.logspace(-3, 2, 4096)  # subnormals to near-saturation
        x = x.clamp(-400 * scale, 400 * scale)
        back = dequantize(quantize(x, scale), scale, torch.float32)
        bound = FP8_RELATIVE_ERROR * x.abs() + scale * 2.0 ** -10
        assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
        assert ((back - x).abs() / bound).max() > 0.9, "the bound is tight, not a loose guess"
    # Out of range saturates at +-448 * scale instead of turning into NaN.
    assert dequantize(quantize(torch.tensor([1e6, -1e6]), 2.0), 2.0, torch.float32).tolist() == [896.0, -896.0]


def test_option_names_and_refusals(tmp_path, capsys):
    assert kv_cache_torch_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert kv_cache_torch_dtype("fp8", torch.bfloat16) is FP8_KV_DTYPE
    assert kv_cache_torch_dtype("fp8_e4m3", torch.float32) is FP8_KV_DTYPE
    assert EngineConfig.from_options(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8_e4m3"
    with pytest.raises(ValueError, match="fp8_e5m2 is not supported: lmserve stores an fp8 KV cache as e4m3"):
        EngineConfig.from_options(kv_cache_dtype="fp8_e5m2")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3"):
        EngineConfig.from_options(kv_cache_dtype="int8")
    # The same option from the config file and the serve flag (which names e5m2's refusal too).
    from lmserve.cli import build_parser
    from lmserve.config import ConfigError, load_config

    f = tmp_path / "c.yaml"
    f.write_text("models:\n  - {id: a, engine: {kv_cache_dtype: fp8}}\n")
    assert load_config(str(f)).models[0].engine.options() == {"kv_cache_dtype": "fp8"}
    with pytest.raises(ConfigError, match="fp8_e5m2 is not supported"):
        load_config(None, kv_cache_dtype="fp8_e5m2")
    assert build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8_e4m3"]).kv_cache_dtype == "fp8_e4m3"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8_e5m2"])
    assert "fp8_e5m2 is not supported" in capsys.readouterr().err
    # Checkpoint names of KV scales (vLLM reads the same): compressed-tensors, its older
    # output_scale, AutoFP8's kv_scale; weight and input scales are not KV scales.
    assert kv_scale_target("model.layers.3.self_attn.k_scale") == (3, ("k_scale",))
    assert kv_scale_target("model.layers.0.self_attn.v_proj.output_scale") == (0, ("v_scale",))
    assert kv_scale_target("model.layers.2.self_attn.kv_scale") == (2, ("k_scale", "v_scale"))
    assert kv_scale_target("model.layers.2.self_attn.k_proj.kv_scale") == (2, ("k_scale",))
    for name in ("model.layers.1.self_attn.k_proj.weight_scale", "model.layers.1.self_attn.k_proj.input_scale",
                 "model.layers.1.mlp.down_proj.weight"):
        assert kv_scale_target(name) is None


def _layer_inputs(layer: Attention, batch, k_scale: float, v_scale: float):
    """q, new keys and values exactly representable in the fp8 cache (so writing them loses
    nothing and only the cache's rounding is left), and a random cache in both forms."""
    g = torch.Generator().manual_seed(3)
    t = len(batch.token_ids)
    hq, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = torch.randn(t, hq, d, generator=g)
    k = dequantize(quantize(torch.randn(t, hkv, d, generator=g), k_scale), k_scale, torch.float32)
    v = dequantize(quantize(torch.randn(t, hkv, d, generator=g), v_scale), v_scale, torch.float32)
    fp8 = tuple(quantize(torch.randn(NUM_BLOCKS, PAGE, hkv, d, generator=g) * 2, s) for s in (k_scale, v_scale))
    return q, k, v, fp8


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_attention_over_fp8_cache_equals_float32_over_the_dequantized_cache(backend_name):
    from lmserve.attention.triton_backend import TritonPagedBackend

    layer = Attention(6, 2, 16, scale=0.25)
    layer.k_scale, layer.v_scale = 0.5, 0.125  # the interpreter's float->fp8 cast rounds exactly for these
    batch = _batch([5, 13], [(0, 6), (7, 5)], torch.Generator().manual_seed(1))
    positions = torch.tensor(batch.positions)
    q, k, v, fp8 = _layer_inputs(layer, batch, layer.k_scale, layer.v_scale)
    dense = tuple(dequantize(c, s, torch.float32) for c, s in zip(fp8, (layer.k_scale, layer.v_scale)))

    def run(backend, cache, v_scale_on_read=None):
        meta = backend.build_metadata(batch, positions, PAGE, torch.float32)
        if v_scale_on_read is not None:  # written with the layer's scale, read with another
            backend.forward(layer, q, k, v, cache, meta)
            layer.v_scale, saved = v_scale_on_read, layer.v_scale
            out = backend.forward(layer, q, k, v, cache, meta)
            layer.v_scale = saved
            return out
        return backend.forward(layer, q, k, v, cache, meta)

    make = (ReferenceBackend if backend_name == "reference"
            else lambda: TritonPagedBackend([layer.kv_spec], torch.device("cpu")))
    reference = run(ReferenceBackend(), tuple(c.clone() for c in dense))
    cache = tuple(c.clone() for c in fp8)
    got = run(make(), cache)
    assert all(c.dtype == FP8_KV_DTYPE for c in cache)
    torch.testing.assert_close(got, reference, atol=2e-6, rtol=1e-5)
    # The new tokens' slots hold them quantized with the layer's scales, as the reference wrote them.
    slots = torch.cat([torch.tensor([t[p // PAGE] * PAGE + p % PAGE for p in range(c, c + n)])
                       for t, c, n in zip(batch.block_tables, batch.context_lens, batch.query_lens)])
    assert torch.equal(cache[0].view(-1, 2, 16)[slots].view(torch.uint8), quantize(k, layer.k_scale).view(torch.uint8))
    # Read back with another scale than written: the outputs of rows that read the cache move.
    wrong = run(make(), tuple(c.clone() for c in fp8), v_scale_on_read=layer.v_scale * 2)
    assert (wrong - reference).abs().max() > 0.1


def test_mla_over_fp8_cache_equals_float32_over_the_dequantized_cache():
    """DeepSeek-V2's latent cache in fp8 (its one scale: k_scale), through the reference backend
    (tests/attention/test_triton_mla.py holds the Triton kernel to this)."""
    from torch import nn

    from lmserve.attention import MLAAttention

    g = torch.Generator().manual_seed(5)
    heads, nope, rope, v_dim, rank = 4, 12, 8, 10, 20
    layer = MLAAttention(heads, nope, rope, v_dim, rank, (nope + rope) ** -0.5)
    layer.k_scale = 0.5
    kv_b_proj = nn.Linear(rank, heads * (nope + v_dim), bias=False)
    kv_b_proj.weight.data = torch.randn(heads * (nope + v_dim), rank, generator=g) * rank ** -0.5
    batch = _batch([3, 17], [(0, 6), (9, 5)], g)
    t = len(batch.token_ids)
    q = torch.randn(t, heads, nope + rope, generator=g)
    entry = dequantize(quantize(torch.randn(t, rank + rope, generator=g), 0.5), 0.5, torch.float32)
    fp8 = quantize(torch.randn(NUM_BLOCKS, PAGE, rank + rope, generator=g), 0.5)
    outs = []
    for cache in (dequantize(fp8, 0.5, torch.float32), fp8.clone()):
        backend = ReferenceBackend()
        outs.append(layer(q, entry, kv_b_proj, (cache,), backend.build_metadata(
            batch, torch.tensor(batch.positions), PAGE, torch.float32)))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    build_llama(directory)
    return directory


@pytest.fixture(scope="module")
def float32_kv_run(tiny_llama):
    _, run = serve_waves_greedy(tiny_llama, STEPS)
    return run


def test_fp8_kv_engine_matches_float32_kv_and_doubles_the_blocks(tiny_llama, float32_kv_run):
    engine, got = serve_waves_greedy(tiny_llama, STEPS, kv_cache_dtype="fp8")  # both waves: prefix cache hits
    caches = engine.executor.runner.kv_caches
    assert all(t.dtype == FP8_KV_DTYPE and t.element_size() == 1 for cache in caches for t in cache)
    error = _max_logit_error(float32_kv_run, got)
    assert 0 < error <= LOGIT_TOLERANCE, error
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in float32_kv_run]

    # Same KV memory, half the bytes per token: twice the blocks (kv_sizing and `lmserve plan`'s arithmetic).
    sized = {kv: LLMEngine(str(tiny_llama), dtype="bfloat16", kv_cache_memory=3 << 20, kv_cache_dtype=kv).num_blocks
             for kv in ("auto", "fp8")}
    assert sized == {"auto": 512, "fp8": 1024}  # 3 MiB over 3 layers x 2 x 2 heads x 16 dims x 16 tokens x 2 | 1 bytes


def test_compiled_decode_refuses_an_fp8_cache_and_stays_eager(tiny_llama, caplog):
    """The compiled CPU decode's operator reads a cache in the compute dtype: with fp8 it is not
    offered (logged), and decode runs eager over the fp8 cache."""
    engine = LLMEngine(str(tiny_llama), dtype="float32", num_kv_blocks=8, compile=True, kv_cache_dtype="fp8")
    assert engine.executor.runner.compiled is None
    assert "the compiled decode reads a KV cache in the compute dtype, not fp8" in caplog.text


def _with_kv_scales(dense: Path, out: Path, scale: float) -> None:
    """A compressed-tensors FP8 checkpoint (written by the compressed-tensors package, as
    tests/layers/test_fp8.py does) with a static per-tensor KV cache scheme: its config block
    serialized by the package, and `self_attn.k_scale` / `v_scale` per layer, the names and
    layout llm-compressor saves and vLLM loads."""
    from compressed_tensors.quantization import QuantizationArgs

    from ..layers.test_fp8 import write_compressed_tensors

    write_compressed_tensors(dense, out, "FP8_DYNAMIC")
    cfg = json.loads((out / "config.json").read_text())
    scheme = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    cfg["quantization_config"]["kv_cache_scheme"] = scheme.model_dump(mode="json")
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(out / "model.safetensors"))
    for i in range(cfg["num_hidden_layers"]):
        for name in ("k_scale", "v_scale"):
            tensors[f"model.layers.{i}.self_attn.{name}"] = torch.tensor(scale, dtype=torch.float32)
    save_file(tensors, str(out / "model.safetensors"))


def test_checkpoint_kv_scales_are_the_ones_the_cache_uses(tiny_llama, tmp_path):
    pytest.importorskip("compressed_tensors")
    results = {}
    for scale in (1 / 16, 256.0):
        path = tmp_path / f"scale-{scale}"
        _with_kv_scales(tiny_llama, path, scale)
        if not results:
            _, results["auto"] = serve_waves_greedy(path, STEPS)
        engine, results[scale] = serve_waves_greedy(path, STEPS, kv_cache_dtype="fp8")
        layers = [m for m in engine.model.modules() if isinstance(m, Attention)]
        assert len(layers) == 3 and all(m.k_scale == m.v_scale == scale for m in layers)
        if scale < 1:  # values / (1/16) are cached: 16x what a scale of 1 would store
            cached = engine.executor.runner.kv_caches[0][0].float().abs().max().item()
            assert cached > 8, cached
    assert _max_logit_error(results["auto"], results[1 / 16]) <= LOGIT_TOLERANCE
    assert _max_logit_error(results["auto"], results[256.0]) > LOGIT_TOLERANCE


def test_preempted_and_recomputed_under_fp8(tiny_llama, float32_kv_run):
    """22 blocks of 4 tokens for wave 1's 28: sequences are preempted, their caches freed and
    recomputed (quantized again), and the run still matches the float32 cache's (22 also keeps
    wave 1's shared prefix cached for wave 2, which serve_waves_greedy checks)."""
    engine, got = serve_waves_greedy(tiny_llama, STEPS, kv_cache_dtype="fp8", num_kv_blocks=22)
    assert engine.scheduler.num_preemptions > 0
    assert _max_logit_error(float32_kv_run, got) <= LOGIT_TOLERANCE
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in float32_kv_run]
