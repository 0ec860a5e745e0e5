"""Triton decode kernel for multi-head latent attention (DeepSeek-V2) over the latent paged cache.

The cache keeps one entry per token, [c (kv_lora_rank) | k_rope (rope_dim)], shared by every
head (attention/spec.py, MLAKVCacheSpec). Decode runs in the absorbed form the reference backend
uses (attention/reference.py, forward_mla): each head's query is moved into latent space once
(q_latent = W_UK^T q_nope, a batched matmul outside the kernel), so a head's score against a
cached token is q_latent . c + q_rope . k_rope and its output is sum_k p_k c_k, mapped through
W_UV afterwards. Every head reads the same entries, so the kernel is GQA with one KV head and
all query heads in its group:

- A program owns one decoding sequence, BLOCK_H of its heads and one key split. It walks the
  sequence's pages TILE_N entries at a time, loads each entry's latent and rope parts once for
  its BLOCK_H heads, and keeps an online softmax in float32 (scores: two real matrix products,
  [BLOCK_H, rank] x [rank, TILE_N] and [BLOCK_H, rope] x [rope, TILE_N]; values: the latent
  tile itself, [BLOCK_H, TILE_N] x [TILE_N, rank]).
- Small decode batches split each sequence's keys (flash-decoding) into NUM_SPLITS ranges and
  merge the partials with triton_paged's merge kernel (the partials are laid out as it reads
  them: [tokens, heads, splits, BLOCK_C]). The grid depends only on the batch's shape, as for
  the other kernels, so a decode step can be captured in a CUDA graph.

Prefill runs the expanded form (the latents through kv_b_proj into per-head keys and values,
then triton_paged's kernel); see TritonPagedBackend.forward_mla.

The kernel runs unchanged under TRITON_INTERPRET=1 on CPU tensors, which is how CI proves it
against the reference backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmserve.attention.kv_cache_dtype import is_fp8
from lmserve.attention.triton_paged import _merge_splits_kernel, _next_power_of_2

# Heads per program: tl.dot needs at least 16 rows; DeepSeek-V2-Lite has 16 heads, V2 128.
BLOCK_H = 16


@triton.jit(do_not_specialize=["stride_bt"])
def _mla_decode_kernel(
    q_ptr, cache_ptr, out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, block_tables_ptr, seq_lens_ptr,
    scale, kv_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ct, stride_bt, num_heads,
    RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
):
    seq = tl.program_id(0)  # decodes come first: sequence i's query is row i
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)  # cached entries, this step's included

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_valid = heads < num_heads
    cdims = tl.arange(0, BLOCK_C)
    c_valid = cdims < RANK
    rdims = tl.arange(0, BLOCK_R)
    r_valid = rdims < ROPE

    q_row = q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
    q_lat = tl.load(q_row + cdims[None, :], mask=head_valid[:, None] & c_valid[None, :], other=0.0)
    q_pe = tl.load(q_row + RANK + rdims[None, :], mask=head_valid[:, None] & r_valid[None, :], other=0.0)

    lo = 0
    hi = seq_len
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), TILE_N) * TILE_N
        lo = split * per_split
        hi = tl.minimum(seq_len, lo + per_split)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    keys = tl.arange(0, TILE_N)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, TILE_N):
        k_pos = start + keys
        k_valid = k_pos < hi
        page = tl.load(table_row + k_pos // PAGE_SIZE, mask=k_valid, other=0).to(tl.int64)
        entry = cache_ptr + page * stride_cb + (k_pos % PAGE_SIZE).to(tl.int64) * stride_ct
        latent = tl.load(entry[None, :] + cdims[:, None], mask=k_valid[None, :] & c_valid[:, None],
                         other=0.0)  # [BLOCK_C, TILE_N]
        k_pe = tl.load(entry[None, :] + RANK + rdims[:, None], mask=k_valid[None, :] & r_valid[:, None],
                       other=0.0)  # [BLOCK_R, TILE_N]
        if KV_FP8:  # an fp8 cache's entries, read back in the compute dtype (attention/kv_cache_dtype.py)
            latent = (latent.to(tl.float32) * kv_scale).to(q_lat.dtype)
            k_pe = (k_pe.to(tl.float32) * kv_scale).to(q_pe.dtype)
        s = tl.dot(q_lat, latent, input_precision=PRECISION)
        s = (s + tl.dot(q_pe, k_pe, input_precision=PRECISION)) * scale
        s = tl.where(k_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(latent.dtype), tl.trans(latent), input_precision=PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + cdims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_valid[:, None] & c_valid[None, :])
    else:
        part = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * BLOCK_C + cdims[None, :], acc, mask=head_valid[:, None])
        tl.store(part_max_ptr + part, m_i, mask=head_valid)
        tl.store(part_sum_ptr + part, l_i, mask=head_valid)


def mla_block_sizes(rank: int, rope: int, dtype: torch.dtype) -> dict:
    """The kernel's tile constants for a latent of `rank` and a rope key of `rope` values.
    Entries per tile: 32 in 16-bit types (a [512, 32] latent tile is 32 KiB), 16 in float32."""
    return dict(BLOCK_C=_next_power_of_2(max(rank, 16)), BLOCK_R=_next_power_of_2(max(rope, 16)),
                TILE_N=16 if dtype == torch.float32 else 32)


def mla_decode(q: torch.Tensor, cache: torch.Tensor, out: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, rank: int, scale: float, num_splits: int = 1,
               split_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               kv_scale: float = 1.0) -> torch.Tensor:
    """out[b, h] = sum_k softmax_k(scale * q[b, h] . entry_k) entry_k[:rank], over sequence b's
    cached entries.

    q [B, H, rank + rope] (absorbed latent query | rotated rope query), one decode token per
    sequence, sequence b's query at row b; cache [blocks, page, rank + rope]; out [B, H, rank];
    block_tables [>= B, W]; seq_lens [>= B] (entries including this step's). With num_splits > 1,
    split_buffers holds float32 partials of at least [B * H * num_splits * BLOCK_C] and
    [B * H * num_splits] twice (triton_paged.split_buffer_sizes(B, H, rank, num_splits)). An fp8
    cache is read back as entry * kv_scale."""
    b, heads, width = q.shape
    rope = width - rank
    page = cache.shape[1]
    sizes = mla_block_sizes(rank, rope, q.dtype)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    part_acc, part_max, part_sum = split_buffers if num_splits > 1 else (out, out, out)
    grid = (b, triton.cdiv(heads, BLOCK_H), num_splits)
    _mla_decode_kernel[grid](
        q, cache, out, part_acc, part_max, part_sum, block_tables, seq_lens, scale, kv_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), cache.stride(0), cache.stride(1),
        block_tables.stride(0), heads,
        RANK=rank, ROPE=rope, PAGE_SIZE=page, BLOCK_H=BLOCK_H, NUM_SPLITS=num_splits, PRECISION=precision,
        KV_FP8=is_fp8(cache), num_stages=2, **sizes)
    if num_splits > 1:
        _merge_splits_kernel[(b, heads)](
            out, part_acc, part_max, part_sum, out.stride(0), out.stride(1), heads,
            HEAD_DIM=rank, BLOCK_D=sizes["BLOCK_C"], NUM_SPLITS=num_splits)
    return out
