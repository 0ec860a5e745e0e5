"""Triton kernels for attention straight over the paged KV cache (the CUDA backend's work).

One kernel covers decode and chunked prefill with a cached prefix, so a mixed step is one launch
per layer and nothing gathers a padded copy of any sequence's cache:

- A program owns one "tile" (up to BLOCK_Q query tokens of one sequence) and one KV head. The
  GQA group of query heads that share that KV head is folded into the tile's rows (row r is token
  r // GROUP, head r % GROUP), so each key and value is loaded once for the whole group and the
  score product is a real matrix product even for a single decode token (vLLM's unified Triton
  attention does the same).
- It walks the keys the tile can see, TILE_N at a time, reading each key's page from the
  sequence's block table row (a gather inside the load), with an online softmax in float32.
  Causality, the sliding window (keys q - W < k <= q) and the softcap (cap * tanh(s / cap)) are
  applied per score, in transformers' order: scale, cap, mask.
- Decode batches too small to fill the GPU split each sequence's keys into NUM_SPLITS ranges
  (flash-decoding): every split writes an unnormalized partial (acc, max, sum), and a second
  kernel merges them. The grid depends only on the batch's shape, never on its lengths, so a
  decode step can be captured in a CUDA graph and replayed for any context lengths.

Both kernels run unchanged under TRITON_INTERPRET=1 on CPU tensors (float32/float16), which is
how CI proves them against the reference backend on a machine without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmserve.attention.kv_cache_dtype import is_fp8


# The block tables' row stride is the batch's longest table: a new value at nearly every
# prefill. Specialized (Triton's default for ints: ==1, multiple of 16), it would compile the
# kernel again mid-serving, about a second each time; it only addresses a table row.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr, tile_seq_ptr, tile_first_ptr,
    scale, softcap, window, k_scale, v_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    num_q_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    first = tl.load(tile_first_ptr + tile)  # the tile's first query, counted within its chunk
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)  # tokens in the cache once this step's are written
    context = seq_len - q_len  # position of the chunk's first query

    rows = tl.arange(0, BLOCK_M)
    token = first + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (token < q_len)
    q_pos = context + token
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM

    q_rows = (q_start + token).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

    # Keys this tile can see: up to its last query (causal), from its first query's window on.
    hi = tl.minimum(seq_len, context + first + BLOCK_Q)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(context + first - window + 1, 0)
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), TILE_N) * TILE_N
        lo = lo + split * per_split
        hi = tl.minimum(hi, lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    keys = tl.arange(0, TILE_N)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, TILE_N):
        k_pos = start + keys
        k_valid = k_pos < hi
        page = tl.load(table_row + k_pos // PAGE_SIZE, mask=k_valid, other=0).to(tl.int64)
        in_page = (k_pos % PAGE_SIZE).to(tl.int64)
        k_off = page * stride_kb + in_page * stride_kt + kv_head * stride_kh
        k = tl.load(k_cache_ptr + k_off[None, :] + dims[:, None],
                    mask=k_valid[None, :] & dim_valid[:, None], other=0.0)  # [BLOCK_D, TILE_N]
        if KV_FP8:  # an fp8 cache's keys, read back in the compute dtype (attention/kv_cache_dtype.py)
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
        s = tl.dot(q, k, input_precision=PRECISION) * scale
        if USE_SOFTCAP:
            # tanh(x) = 2 sigmoid(2x) - 1, written out: tl's tanh differs across Triton versions.
            s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)
        visible = k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_off = page * stride_vb + in_page * stride_vt + kv_head * stride_vh
        v = tl.load(v_cache_ptr + v_off[:, None] + dims[None, :],
                    mask=k_valid[:, None] & dim_valid[None, :], other=0.0)  # [TILE_N, BLOCK_D]
        if KV_FP8:
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a padded row (no keys) gives zeros
        tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])
    else:
        # Partials are [tokens, q heads, splits (, D)], float32; decode tiles are one token each.
        part = (q_rows * num_q_heads + head) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :], acc, mask=row_valid[:, None])
        tl.store(part_max_ptr + part, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part, l_i, mask=row_valid)


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, stride_ot, stride_oh, num_q_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    part = (token * num_q_heads + head) * NUM_SPLITS + splits
    m = tl.load(part_max_ptr + part)
    total_max = tl.max(m, axis=0)
    total_max = tl.where(total_max == float("-inf"), 0.0, total_max)
    w = tl.exp(m - total_max)  # an empty split (max -inf) weighs 0
    total = tl.sum(tl.load(part_sum_ptr + part) * w, axis=0)
    acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :])
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ks, stride_kch, stride_vs, stride_vch, k_scale, v_scale,
                     NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     KV_FP8: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + heads * stride_kh + dims, mask=mask)
    if KV_FP8:  # fp8(clamp(x / scale)), saturating at e4m3's largest value as kv_cache_dtype.quantize does
        k = tl.minimum(tl.maximum(k.to(tl.float32) / k_scale, -448.0), 448.0)
    tl.store(k_cache_ptr + slot * stride_ks + heads * stride_kch + dims, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + dims, mask=mask)
    if KV_FP8:
        v = tl.minimum(tl.maximum(v.to(tl.float32) / v_scale, -448.0), 448.0)
    tl.store(v_cache_ptr + slot * stride_vs + heads * stride_vch + dims, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k_cache/v_cache [blocks, page, Hkv, D] at slot_mapping[t] = k[t] / v[t] ([T, Hkv, D], any
    token and head strides): both caches in one launch, where two index_copy_ calls take two
    (each as long as the other small kernels of a decode step). An fp8 cache stores the values
    divided by the layer's scales."""
    t, hkv, d = k.shape
    if t == 0:
        return
    kc, vc = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    _write_kv_kernel[(t,)](k, v, kc, vc, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1), k_scale, v_scale,
                           NUM_HEADS=hkv, HEAD_DIM=d, BLOCK_H=_next_power_of_2(hkv), BLOCK_D=_next_power_of_2(d),
                           KV_FP8=is_fp8(k_cache))


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor,
                    tile_seq: torch.Tensor, tile_first: torch.Tensor, block_q: int, scale: float,
                    softcap: float | None, window: int | None, num_splits: int = 1,
                    split_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """out[t, h] = attention of query q[t, h] over its sequence's cached keys and values.

    q, out [T, Hq, D]; caches [blocks, page, Hkv, D] (this step's keys already written);
    block_tables [N, W] int32; seq_lens [N] (cached tokens including this step's);
    query_start [N + 1] (the sequences' first rows in q); tile_seq / tile_first [tiles] (which
    sequence each tile is, and its first query within the chunk), tiles of `block_q` queries.
    num_splits > 1 only for decode tiles (block_q == 1); split_buffers then holds float32
    partials of at least [T * Hq * num_splits * BLOCK_D], [T * Hq * num_splits] twice. An fp8
    cache is read back as value * k_scale / v_scale."""
    _, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    block_d = _next_power_of_2(max(d, 16))
    # Decode: a tile is one token and its group's heads. Prefill: 64 rows (32 for head dims
    # over 128, to keep the accumulator in registers), filled with as many tokens as fit.
    block_m = max(16, _next_power_of_2(block_q * group))
    if num_splits > 1 and block_q != 1:
        raise ValueError("split keys are for decode tiles (one query each)")
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if num_splits > 1:
        part_acc, part_max, part_sum = split_buffers
    else:
        part_acc = part_max = part_sum = out  # unused
    grid = (tile_seq.shape[0], hkv, num_splits)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, part_acc, part_max, part_sum,
        block_tables, seq_lens, query_start, tile_seq, tile_first,
        scale, softcap or 0.0, window or 0, k_scale, v_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        hq,
        HEAD_DIM=d, BLOCK_D=block_d, PAGE_SIZE=page, GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m,
        TILE_N=64 if block_d <= 128 else 32, NUM_SPLITS=num_splits,
        USE_SOFTCAP=softcap is not None, USE_WINDOW=window is not None, PRECISION=precision,
        KV_FP8=is_fp8(k_cache),
    )
    if num_splits > 1:
        _merge_splits_kernel[(tile_seq.shape[0], hq)](
            out, part_acc, part_max, part_sum, out.stride(0), out.stride(1), hq,
            HEAD_DIM=d, BLOCK_D=block_d, NUM_SPLITS=num_splits)
    return out


def prefill_block_q(group: int, head_dim: int) -> int:
    """Query tokens per prefill tile: 64 rows of token x group head (32 rows for head dims over
    128), at least one token."""
    rows = 64 if head_dim <= 128 else 32
    return max(1, rows // group)


def split_buffer_sizes(tokens: int, q_heads: int, head_dim: int, num_splits: int) -> tuple[int, int]:
    """Elements of the partial accumulators and of each of the max / sum buffers."""
    n = tokens * q_heads * num_splits
    return n * _next_power_of_2(max(head_dim, 16)), n
