"""The Triton MLA path (attention/triton_mla.py and TritonPagedBackend.forward_mla) against the
reference backend, on CPU under Triton's interpreter (tests/conftest.py sets it).

One MLA layer over scattered cache pages: decodes (absorbed form, the new kernel, with and
without split keys), prefill chunks with and without a cached prefix (expanded form through
triton_paged's kernel), mixed in one step; then the tiny DeepSeek-V2 checkpoint served by both
backends, greedy-equal; then the kernel compiled for sm_90.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmserve.attention import MLAAttention
from lmserve.attention.kv_cache_dtype import dequantize, quantize
from lmserve.attention.reference import ReferenceBackend
from lmserve.attention.selector import get_attention_backend
from lmserve.attention.triton_backend import TritonPagedBackend
from lmserve.model_input import ModelInput

PAGE = 4
NUM_BLOCKS = 64


def _batch(decode_contexts: list[int], prefills: list[tuple[int, int]], g: torch.Generator) -> ModelInput:
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    query_lens, context_lens, tables = [], [], []
    for context, length in [(c, 1) for c in decode_contexts] + prefills:
        tables.append([free.pop() for _ in range(-(-(context + length) // PAGE))])
        query_lens.append(length)
        context_lens.append(context)
    tokens = sum(query_lens)
    return ModelInput([0] * tokens, query_lens, context_lens, tables, len(decode_contexts), list(range(tokens)))


def _run_both(batch: ModelInput, heads: int, nope: int, rope: int, v_dim: int, rank: int, num_splits=None,
              fp8_scale: float | None = None):
    """With fp8_scale: an fp8 cache (kv_cache_dtype: fp8) of that scale, and new entries it
    holds exactly (Triton's interpreter rounds some float -> fp8 casts wrongly; a GPU does not)."""
    g = torch.Generator().manual_seed(0)
    layer = MLAAttention(heads, nope, rope, v_dim, rank, (nope + rope) ** -0.5)
    kv_b_proj = nn.Linear(rank, heads * (nope + v_dim), bias=False)
    kv_b_proj.weight.data = torch.randn(heads * (nope + v_dim), rank, generator=g) * rank**-0.5
    cache = torch.randn(NUM_BLOCKS, PAGE, rank + rope, generator=g)
    t = len(batch.token_ids)
    q = torch.randn(t, heads, nope + rope, generator=g)
    entry = torch.randn(t, rank + rope, generator=g)
    if fp8_scale is not None:
        layer.k_scale = fp8_scale
        cache = quantize(cache, fp8_scale)
        entry = dequantize(quantize(entry, fp8_scale), fp8_scale, torch.float32)
    positions = torch.tensor(batch.positions)
    outs, caches = [], []
    for backend in (ReferenceBackend(), TritonPagedBackend([layer.kv_spec], torch.device("cpu"))):
        kv = (cache.clone(),)
        meta = backend.build_metadata(batch, positions, PAGE, torch.float32)
        if num_splits is not None:
            meta.num_splits = num_splits
        outs.append(layer(q, entry, kv_b_proj, kv, meta))
        caches.append(kv[0])
    assert torch.equal(caches[0].view(torch.uint8), caches[1].view(torch.uint8)), "both write the same entries"
    return outs


# heads, nope, rope, v, rank: the tiny checkpoint's odd sizes (v < qk), v wider than q/k, more
# heads than one program's block, a latent wider than a rope tile.
SHAPES = [(4, 12, 8, 10, 20), (3, 8, 8, 24, 16), (20, 16, 16, 16, 40)]


@pytest.mark.parametrize("heads, nope, rope, v_dim, rank", SHAPES, ids=["tiny", "wide-v", "many-heads"])
def test_mixed_mla_batch_matches_reference(heads, nope, rope, v_dim, rank):
    g = torch.Generator().manual_seed(1)
    # Two decodes (one with a single cached entry), a fresh prompt, a chunk after a cached prefix
    # that shares no page with it, and a chunk longer than one prefill tile.
    batch = _batch([0, 13], [(0, 7), (9, 6), (3, 70)], g)
    ref, got = _run_both(batch, heads, nope, rope, v_dim, rank)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [1, 4])
def test_mla_decode_batch_matches_reference(splits):
    batch = _batch([0, 3, 16, 41, 77], [], torch.Generator().manual_seed(2))
    ref, got = _run_both(batch, 4, 12, 8, 10, 20, num_splits=splits)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_mla_over_an_fp8_cache_matches_reference():
    """kv_cache_dtype: fp8 -- decodes (the kernel dequantizes each tile) and prefill chunks over
    cached pages (dequantized before kv_b_proj) as the reference backend reads them."""
    batch = _batch([0, 13, 40], [(0, 7), (9, 6)], torch.Generator().manual_seed(4))
    ref, got = _run_both(batch, 4, 12, 8, 10, 20, num_splits=4, fp8_scale=0.25)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_selector_takes_triton_for_mla():
    from lmserve.attention.spec import MLAKVCacheSpec

    backend = get_attention_backend(torch.device("cpu"), [MLAKVCacheSpec(16, 8)], "triton")
    assert isinstance(backend, TritonPagedBackend) and backend.mla


STEPS = 6


def test_deepseek_v2_engine_on_triton_matches_reference(tmp_path, monkeypatch):
    """The tiny DeepSeek-V2 checkpoint (MLA with q_lora, MoE) served by the reference backend and
    by the Triton kernels: the same greedy tokens and logits at every step, through chunked
    prefill (cached prefixes expanded from pages) and prefix-cache hits. Then as a GPU serves
    it: decodes through the CUDA-graph path's static buffers (split-key partials as wide as the
    latent; no capture on CPU) and the CUDA dispatch forced, so the MoE layers run the fused
    kernels (layers/triton_moe.py) and nothing reads expert counts on the host."""
    from tests.support.family_checkpoints import assert_same_greedy_run, build_deepseek_v2, serve_waves_greedy
    from tests.support.triton_dispatch import force_triton

    build_deepseek_v2(tmp_path)
    _, reference = serve_waves_greedy(tmp_path, STEPS, attention_backend="reference")
    engine, got = serve_waves_greedy(tmp_path, STEPS, attention_backend="triton", cuda_graphs=False)
    assert isinstance(engine.runner.attention_backend, TritonPagedBackend) and engine.runner.graphs is None
    assert_same_greedy_run(reference, got, STEPS)
    force_triton(monkeypatch)
    engine, got = serve_waves_greedy(tmp_path, STEPS, attention_backend="triton", cuda_graphs=True)
    assert engine.runner.graphs is not None and engine.runner.graphs.steps > 0, "decodes took the padded path"
    assert_same_greedy_run(reference, got, STEPS)


_COMPILE_FOR_SM90 = """
from lmserve.attention import triton_mla as M

ints = ("block_tables_ptr", "seq_lens_ptr")
strides = ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_cb", "stride_ct", "stride_bt", "num_heads")
# DeepSeek-V2's latent (512 + 64) in bf16 with and without key splits, in fp32, and the tiny
# sizes; V2's latent again over an fp8 cache (kv_cache_dtype: fp8).
for dt, rank, rope, splits, kv in (("bf16", 512, 64, 8, "bf16"), ("bf16", 512, 64, 1, "bf16"),
                                   ("fp32", 512, 64, 4, "fp32"), ("fp32", 20, 8, 1, "fp32"),
                                   ("bf16", 512, 64, 8, "fp8e4nv")):
    sizes = M.mla_block_sizes(rank, rope, M.torch.float32 if dt == "fp32" else M.torch.bfloat16)
    sig = {"q_ptr": "*" + dt, "cache_ptr": "*" + kv, "out_ptr": "*" + dt, "part_acc_ptr": "*fp32",
           "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", **{n: "*i64" for n in ints}, "scale": "fp32",
           "kv_scale": "fp32", **{n: "i32" for n in strides}}
    constexprs = {"RANK": rank, "ROPE": rope, "PAGE_SIZE": 16, "BLOCK_H": M.BLOCK_H, "NUM_SPLITS": splits,
                  "PRECISION": "ieee" if dt == "fp32" else "tf32", "KV_FP8": kv == "fp8e4nv", **sizes}
    # Shared memory is checked only at launch: an H100/H200 block may use up to 227 KiB.
    signature = {**sig, **{n: "constexpr" for n in constexprs}}
    kernel = triton.compile(ASTSource(fn=M._mla_decode_kernel, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_stages": 2})
    assert kernel.asm["ptx"] and kernel.metadata.shared <= 227 * 1024, (dt, rank, kernel.metadata.shared)

# The expanded prefill: triton_paged's kernel with one KV head per query head and V2's 192-wide
# q/k (values padded to it), in bf16 and float32.
from lmserve.attention import triton_paged as P

ints = ("block_tables_ptr", "seq_lens_ptr", "query_start_ptr", "tile_seq_ptr", "tile_first_ptr")
strides = ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_kt", "stride_kh",
           "stride_vb", "stride_vt", "stride_vh", "stride_bt", "num_q_heads", "window")
for dt in ("bf16", "fp32"):
    block_q = P.prefill_block_q(1, 192)
    constexprs = {"HEAD_DIM": 192, "BLOCK_D": 256, "PAGE_SIZE": 16, "GROUP": 1, "BLOCK_Q": block_q,
                  "BLOCK_M": max(16, P._next_power_of_2(block_q)), "TILE_N": 32, "NUM_SPLITS": 1,
                  "USE_SOFTCAP": False, "USE_WINDOW": False, "PRECISION": "ieee" if dt == "fp32" else "tf32",
                  "KV_FP8": False}
    sig = {"q_ptr": "*" + dt, "k_cache_ptr": "*" + dt, "v_cache_ptr": "*" + dt, "out_ptr": "*" + dt,
           "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
           **{n: "*i64" for n in ints}, "scale": "fp32", "softcap": "fp32", "k_scale": "fp32", "v_scale": "fp32",
           **{n: "i32" for n in strides},
           **{n: "constexpr" for n in constexprs}}
    kernel = triton.compile(ASTSource(fn=P._paged_attention_kernel, signature=sig, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["ptx"] and kernel.metadata.shared <= 227 * 1024, (dt, kernel.metadata.shared)
"""


def test_mla_kernel_compiles_for_sm90(tmp_path):
    from tests.support.sm90_compile import compile_for_sm90_in_child

    compile_for_sm90_in_child(_COMPILE_FOR_SM90, tmp_path)
