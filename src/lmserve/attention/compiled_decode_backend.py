"""Decode attention as one opaque operator, for the torch.compile'd decode forward.

Inside a compiled graph the eager backend's Python (decode groups, per-window masks built on
first use, a dict cache) cannot be traced without graph breaks, and a functionalized cache write
would copy the whole KV cache every layer. So a decode step's attention is a custom op that
mutates the cache in place (`mutates_args`), which Inductor calls as an extern kernel: the new
K/V rows go into the paged cache, then the reference backend's decode attention runs: the paged
kernel over the cache in place (attention/cpu_decode_kernel.py) where it applies, else the
sequences' pages are gathered for SDPA under an additive mask. The mask is built once per step
inside the compiled graph (from the positions and the block-table width) and shared by every layer.

Only plain attention layers take this path (no sliding window, no softcap, no MLA): the compiled
decode is offered for models made of those alone (lmserve.engine.compiled_decode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lmserve.attention import cpu_decode_kernel
from lmserve.attention.backend import AttentionBackend

if TYPE_CHECKING:
    from lmserve.model_input import ModelInput


@torch.library.custom_op("lmserve::paged_decode_attention", mutates_args=("k_cache", "v_cache"))
def paged_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                           mask: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D], k/v [B, Hkv, D] (one new token per sequence, already rotated); caches
    [blocks, block_size, Hkv, D]; block_tables [B, W]; mask [B, 1, 1, W * block_size] additive;
    seq_lens [B] tokens each sequence attends (position + 1; the paged kernel reads these instead
    of the mask). Returns [B, Hq, D], contiguous (the fake kernel below promises that layout)."""
    blocks, block_size, kvh, d = k_cache.shape
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v)
    if cpu_decode_kernel.covers(q, k_cache):
        return cpu_decode_kernel.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, None, scale, None)
    b, width = block_tables.shape
    flat = block_tables.reshape(-1)
    keys = k_cache.index_select(0, flat).view(b, width * block_size, kvh, d).transpose(1, 2)
    values = v_cache.index_select(0, flat).view(b, width * block_size, kvh, d).transpose(1, 2)
    hq = q.shape[1]
    # GQA folding as in the eager backend: the query heads sharing a KV head are its "query length".
    out = F.scaled_dot_product_attention(q.reshape(b, kvh, hq // kvh, d), keys, values, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, d).contiguous()


@paged_decode_attention.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, block_tables, mask, seq_lens, scale):
    return q.new_empty(q.shape)


@dataclass
class CompiledDecodeMetadata:
    """A decode-only step's metadata, as tensors the compiled graph takes as inputs."""

    backend: CompiledDecodeBackend
    slot_mapping: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, W]
    mask: torch.Tensor  # [B, 1, 1, W * block_size], 0 / -inf in the compute dtype
    seq_lens: torch.Tensor  # [B] position + 1: the tokens each sequence attends


class CompiledDecodeBackend(AttentionBackend):
    """The attention backend the compiled decode forward hands its layers. Inside the graph its
    metadata is built from the graph's tensor inputs (engine/compiled_decode.py's DecodeGraph);
    `build_metadata` builds the same from a decode-only step, outside a graph."""

    def build_metadata(self, batch: ModelInput, positions: torch.Tensor, block_size: int,
                       dtype: torch.dtype) -> CompiledDecodeMetadata:
        if batch.num_decodes != len(batch.query_lens):
            raise ValueError("the compiled decode backend takes decode-only steps")
        width = max(len(t) for t in batch.block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in batch.block_tables], dtype=torch.int64,
                              device=positions.device)  # padding is masked out
        pages = tables.gather(1, (positions // block_size).unsqueeze(1)).squeeze(1)
        return CompiledDecodeMetadata(self, pages * block_size + positions % block_size, tables,
                                      decode_mask(positions, width, block_size, dtype), positions + 1)

    def forward(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: CompiledDecodeMetadata) -> torch.Tensor:
        return torch.ops.lmserve.paged_decode_attention(q, k, v, kv_cache[0], kv_cache[1], meta.slot_mapping,
                                                        meta.block_tables, meta.mask, meta.seq_lens, layer.scale)

    def forward_mla(self, layer, q, entry, kv_b_proj, kv_cache, meta) -> torch.Tensor:
        # Never reached: the compiled decode is offered only for models without MLA layers
        # (engine/compiled_decode.py, unsupported_reason).
        raise NotImplementedError("MLA layers run the eager backend (no compiled decode for them)")


def decode_mask(positions: torch.Tensor, width: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, 1, width * block_size] mask hiding every cache slot past each position
    (pages padded onto a short table, slots not yet written)."""
    span = torch.arange(width * block_size, device=positions.device).unsqueeze(0)
    hidden = span > positions.unsqueeze(1)
    return torch.zeros(hidden.shape, dtype=dtype, device=positions.device).masked_fill_(
        hidden, float("-inf")).view(positions.shape[0], 1, 1, -1)
