"""The Triton paged-attention kernels against the reference backend, on CPU.

Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before Triton is imported) runs the very kernels
the CUDA backend launches, program by program, on CPU tensors. Each case lays a batch's
sequences over scattered cache pages (decodes, prefill chunks with and without a cached prefix),
runs one layer through both backends on copies of the same cache, and compares the outputs and
the written caches: GQA groups that are not powers of two, a head dim that is not one, sliding
windows shorter than the context, softcaps, split keys for decode.
"""

from __future__ import annotations

import pytest
import torch

from lmserve.attention import Attention
from lmserve.attention.reference import ReferenceBackend
from lmserve.attention.selector import get_attention_backend
from lmserve.attention.triton_backend import TritonPagedBackend, choose_num_splits
from lmserve.model_input import ModelInput

PAGE = 4
NUM_BLOCKS = 96


def _batch(decode_contexts: list[int], prefills: list[tuple[int, int]], generator: torch.Generator) -> ModelInput:
    """Decodes (cached context each) first, then prefill chunks (cached context, chunk length);
    every sequence gets its own random pages."""
    free = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    query_lens, context_lens, tables = [], [], []
    for context, length in [(c, 1) for c in decode_contexts] + prefills:
        pages = -(-(context + length) // PAGE)
        tables.append([free.pop() for _ in range(pages)])
        query_lens.append(length)
        context_lens.append(context)
    tokens = sum(query_lens)
    return ModelInput([0] * tokens, query_lens, context_lens, tables, len(decode_contexts), list(range(tokens)))


def _run_both(batch: ModelInput, layer: Attention, dtype: torch.dtype, num_splits: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    cache = [torch.randn(NUM_BLOCKS, PAGE, hkv, d, generator=g).to(dtype) for _ in range(2)]
    t = len(batch.token_ids)
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    k = torch.randn(t, hkv, d, generator=g).to(dtype)
    v = torch.randn(t, hkv, d, generator=g).to(dtype)
    positions = torch.tensor(batch.positions)
    outs, caches = [], []
    for backend in (ReferenceBackend(), TritonPagedBackend([layer.kv_spec], torch.device("cpu"))):
        kv = tuple(c.clone() for c in cache)
        meta = backend.build_metadata(batch, positions, PAGE, dtype)
        if num_splits is not None and isinstance(backend, TritonPagedBackend):
            meta.num_splits = num_splits
        outs.append(backend.forward(layer, q, k, v, kv, meta))
        caches.append(kv)
    for ref, got in zip(*caches):
        assert torch.equal(ref, got), "both backends write the same slots"
    return outs


CASES = [
    # name, heads, kv heads, head dim, window, softcap
    ("mha", 2, 2, 16, None, None),
    ("gqa-3", 6, 2, 32, None, None),
    ("gqa-4-dim24", 8, 2, 24, None, None),
    ("window", 4, 2, 16, 5, None),
    ("softcap", 4, 1, 32, None, 30.0),
    ("window-softcap", 4, 2, 16, 6, 20.0),
]


@pytest.mark.parametrize("name, hq, hkv, d, window, softcap", CASES, ids=[c[0] for c in CASES])
def test_mixed_batch_matches_reference(name, hq, hkv, d, window, softcap):
    layer = Attention(hq, hkv, d, d**-0.5, window, softcap)
    g = torch.Generator().manual_seed(1)
    # Two decodes (one with a single cached token), a fresh prompt, a chunk after a cached
    # prefix, and a chunk longer than one prefill tile.
    batch = _batch([1, 13], [(0, 7), (9, 6), (3, 70)], g)
    ref, got = _run_both(batch, layer, torch.float32)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_batch_with_split_keys_matches_reference(splits, window):
    layer = Attention(6, 2, 32, 0.2, window, None)
    g = torch.Generator().manual_seed(2)
    batch = _batch([0, 3, 16, 41, 77], [], g)
    ref, got = _run_both(batch, layer, torch.float32, num_splits=splits)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_half_precision_within_rounding():
    layer = Attention(4, 2, 64, 0.125, None, None)
    batch = _batch([20, 33], [(5, 11)], torch.Generator().manual_seed(3))
    ref, got = _run_both(batch, layer, torch.float16)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_equals_index_copy(dtype):
    """Both caches in one launch, from strided views of a packed qkv projection, equal to the
    reference backend's two index_copy_ calls; slots out of order and across pages."""
    from lmserve.attention.reference import write_kv_cache
    from lmserve.attention.triton_paged import write_kv

    g = torch.Generator().manual_seed(3)
    t, hq, hkv, d, blocks, page = 5, 6, 3, 24, 4, 16
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(t, hkv, d)
    slots = torch.tensor([37, 2, 16, 63, 15])
    caches = [tuple(torch.randn(blocks, page, hkv, d, generator=g).to(dtype) for _ in range(2)) for _ in range(2)]
    caches[1] = tuple(c.clone() for c in caches[0])
    write_kv_cache(k, v, caches[0], slots)
    write_kv(k, v, caches[1][0], caches[1][1], slots)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_splits_fill_the_multiprocessors_only_for_small_batches():
    assert choose_num_splits(1, 8, 132) == 16  # batch 1 of an 8-KV-head model: 128 programs
    assert choose_num_splits(4, 8, 132) == 8  # 256 programs: about two waves
    assert choose_num_splits(32, 8, 132) == 1  # 256 programs already cover 132 SMs
    assert choose_num_splits(256, 8, 132) == 1


def test_selector_keeps_the_reference_for_plain_cpu():
    from lmserve.attention.spec import KVCacheSpec, MLAKVCacheSpec

    cpu = torch.device("cpu")
    assert isinstance(get_attention_backend(cpu, [KVCacheSpec(2, 16)]), ReferenceBackend)
    assert isinstance(get_attention_backend(cpu, [MLAKVCacheSpec(16, 8)]), ReferenceBackend)
    assert isinstance(get_attention_backend(cpu, [KVCacheSpec(2, 16)], "triton"), TritonPagedBackend)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        get_attention_backend(cpu, [KVCacheSpec(2, 16)], "flash")


# ---- the whole engine on the Triton backend, CUDA-graph padding path included -----------------

STEPS = 8  # the interpreter runs every kernel program in Python: keep the engine runs short


@pytest.mark.parametrize("family, paths", [("llama", ("eager", "graphs")), ("gemma2", ("graphs",))])
def test_engine_on_triton_backend_matches_reference(family, paths, tmp_path):
    """The tiny Llama (GQA, llama3 rope) and Gemma-2 (sliding window shorter than the prompts,
    attention softcap) checkpoints, served by the reference backend and by the Triton kernels,
    eager and through the CUDA-graph path's padded static buffers (no capture on CPU): the same
    greedy tokens and logits at every step, chunked prefill and prefix hits included."""
    from tests.support import family_checkpoints
    from tests.support.family_checkpoints import assert_same_greedy_run, serve_waves_greedy

    getattr(family_checkpoints, f"build_{family}")(tmp_path)
    _, reference = serve_waves_greedy(tmp_path, STEPS, attention_backend="reference")
    for path in paths:
        engine, got = serve_waves_greedy(tmp_path, STEPS, attention_backend="triton", cuda_graphs=path == "graphs")
        assert isinstance(engine.runner.attention_backend, TritonPagedBackend)
        if path == "graphs":
            assert engine.runner.graphs is not None and engine.runner.graphs.steps > 0, "decodes took the padded path"
        else:
            assert engine.runner.graphs is None
        assert_same_greedy_run(reference, got, STEPS)


def test_graph_ladder_and_padding():
    from lmserve.engine.cuda_graphs import graph_batch_sizes, padded_size

    assert graph_batch_sizes(256)[:5] == [1, 2, 4, 8, 16] and graph_batch_sizes(256)[-1] == 256
    assert len(graph_batch_sizes(256)) == 35
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 24]  # the last size holds max_num_seqs
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(1) == [1]
    sizes = graph_batch_sizes(64)
    assert [padded_size(n, sizes) for n in (1, 3, 5, 8, 9, 63, 64, 65)] == [1, 4, 8, 8, 16, 64, 64, None]


# Both kernels compiled for an H100 (tests/support/sm90_compile.py says why), in bfloat16 and float32,
# over a cache in the compute dtype or fp8 (e4m3, kv_cache_dtype: fp8) for a decode and a prefill tile.
_COMPILE_FOR_SM90 = """
from lmserve.attention import triton_paged as P

ints = ("block_tables_ptr", "seq_lens_ptr", "query_start_ptr", "tile_seq_ptr", "tile_first_ptr")
strides = ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_kt", "stride_kh",
           "stride_vb", "stride_vt", "stride_vh", "stride_bt", "num_q_heads", "window")
# dtype, head dim, GQA group, queries per tile, key splits, window, softcap: decode (split and
# not), a Llama-8B prefill tile, Gemma-2's 256-wide heads, a non-power-of-two head dim and group;
# the 8B decode and prefill tiles again over an fp8 cache.
for dt, head_dim, group, block_q, splits, window, softcap, kv in (
        ("bf16", 128, 4, 1, 8, True, False, "bf16"), ("bf16", 128, 4, 16, 1, False, False, "bf16"),
        ("bf16", 256, 2, 16, 1, True, True, "bf16"), ("bf16", 80, 7, 9, 1, False, True, "bf16"),
        ("fp32", 64, 4, 1, 1, False, False, "fp32"), ("bf16", 128, 4, 1, 8, False, False, "fp8e4nv"),
        ("bf16", 128, 4, 16, 1, False, False, "fp8e4nv")):
    precision = "ieee" if dt == "fp32" else "tf32"
    block_d = P._next_power_of_2(head_dim)
    sig = {"q_ptr": "*" + dt, "k_cache_ptr": "*" + kv, "v_cache_ptr": "*" + kv, "out_ptr": "*" + dt,
           "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
           **{n: "*i64" for n in ints}, "scale": "fp32", "softcap": "fp32", "k_scale": "fp32", "v_scale": "fp32",
           **{n: "i32" for n in strides}}
    compile_for_sm90(P._paged_attention_kernel, sig, {
        "HEAD_DIM": head_dim, "BLOCK_D": block_d, "PAGE_SIZE": 16, "GROUP": group, "BLOCK_Q": block_q,
        "BLOCK_M": max(16, P._next_power_of_2(block_q * group)), "TILE_N": 64 if block_d <= 128 else 32,
        "NUM_SPLITS": splits, "USE_SOFTCAP": softcap, "USE_WINDOW": window, "PRECISION": precision,
        "KV_FP8": kv == "fp8e4nv"})
    if splits > 1:
        compile_for_sm90(P._merge_splits_kernel, {
            "out_ptr": "*" + dt, "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
            "stride_ot": "i32", "stride_oh": "i32", "num_q_heads": "i32"},
            {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "NUM_SPLITS": splits})
    compile_for_sm90(P._write_kv_kernel, {
        "k_ptr": "*" + dt, "v_ptr": "*" + dt, "k_cache_ptr": "*" + kv, "v_cache_ptr": "*" + kv, "slots_ptr": "*i64",
        **{n: "i32" for n in ("stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ks", "stride_kch",
                              "stride_vs", "stride_vch")}, "k_scale": "fp32", "v_scale": "fp32"},
        {"NUM_HEADS": group, "HEAD_DIM": head_dim, "BLOCK_H": P._next_power_of_2(group), "BLOCK_D": block_d,
         "KV_FP8": kv == "fp8e4nv"})
"""


def test_kernels_compile_for_sm90(tmp_path):
    from tests.support.sm90_compile import compile_for_sm90_in_child

    compile_for_sm90_in_child(_COMPILE_FOR_SM90, tmp_path)
