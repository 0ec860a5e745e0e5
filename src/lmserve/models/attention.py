"""Attention over the paged KV cache.

The cache of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim].
A step's tokens arrive flattened: decode tokens (one per sequence) first, then the prefill
chunks. `AttentionMetadata` is built once per step by the model runner and shared by every
layer, so per-layer work is pure tensor ops with no Python loop over the decode batch.

This is the always-correct CPU path (gather pages + scaled_dot_product_attention); faster
kernels plug in behind the same `paged_attention` signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """One sequence's prefill chunk inside the flattened batch."""

    start: int  # first row in the flattened token batch
    length: int  # tokens in this chunk
    context_len: int  # tokens before the chunk that are already in the cache
    block_table: torch.Tensor | None = None  # only when context_len > 0
    mask: torch.Tensor | None = None  # [length, context_len + length] bool, when context_len > 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks]
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size] additive: 0 or -inf
    prefills: list[PrefillChunk] = field(default_factory=list)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                   slot_mapping: torch.Tensor) -> None:
    k_cache, v_cache = kv_cache
    kvh, d = k_cache.shape[-2:]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[B, max_blocks] block ids -> [B, kvh, max_blocks * block_size, d] keys or values."""
    b, nblk = block_tables.shape
    _, bs, kvh, d = cache.shape
    # index_select on the flattened ids is a plain row copy; advanced indexing costs more per call.
    return cache.index_select(0, block_tables.view(-1)).view(b, nblk * bs, kvh, d).transpose(1, 2)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (already rotated). Returns [T, Hq, D]."""
    write_kv_cache(k, v, kv_cache, meta.slot_mapping)
    t, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    nd = meta.num_decode
    out = q.new_empty(q.shape) if nd < t else None
    if nd:
        # One query per sequence: fold the query heads sharing a KV head into the "query length"
        # axis, so GQA needs no key/value expansion and one SDPA call covers the whole batch.
        qd = q[:nd].view(nd, hkv, group, d)
        kd = _gather(kv_cache[0], meta.decode_block_tables)
        vd = _gather(kv_cache[1], meta.decode_block_tables)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        if nd == t:  # decode only: no scatter into a separate output
            return od.reshape(nd, hq, d)
        out[:nd] = od.reshape(nd, hq, d)
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.start + chunk.length)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
        if chunk.context_len == 0:
            kp = k[rows].transpose(0, 1).unsqueeze(0)
            vp = v[rows].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            total = chunk.context_len + chunk.length
            kp = _gather(kv_cache[0], chunk.block_table.unsqueeze(0))[:, :, :total]
            vp = _gather(kv_cache[1], chunk.block_table.unsqueeze(0))[:, :, :total]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=chunk.mask, scale=scale, enable_gqa=True)
        out[rows] = op.squeeze(0).transpose(0, 1)
    return out
