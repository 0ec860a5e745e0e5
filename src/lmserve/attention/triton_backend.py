"""The CUDA attention backend: Triton kernels over the paged cache (attention/triton_paged.py).

Per step it builds, once for all layers, the sequences' padded block tables, cached lengths,
query starts and cache slots, copied to the device in one transfer (lmserve.staging). Per layer
it writes the new keys and values into their slots and launches one kernel for the whole batch:
decode tokens and prefill chunks (with a cached prefix) alike, sliding window and softcap
included. Decode-only batches that would leave the GPU's multiprocessors idle split each
sequence's keys (flash-decoding) and merge the partials in a second kernel.

MLA layers (DeepSeek-V2) are not served here: the selector keeps the reference backend for
models that declare them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmserve.attention.spec import KVCacheSpec
from lmserve.attention.triton_paged import paged_attention, prefill_block_q, split_buffer_sizes, write_kv
from lmserve.staging import ints_to_device, padded_rows

if TYPE_CHECKING:
    from lmserve.engine.batch import ModelInput

MAX_SPLITS = 16


def choose_num_splits(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Key splits per decode sequence: enough programs (sequences x KV heads x splits) for about
    two waves over the multiprocessors, a power of two, at most MAX_SPLITS. A function of the
    batch's shape only, so a captured graph's grid stays right for every context length."""
    programs = num_seqs * num_kv_heads
    splits = 1
    while splits < MAX_SPLITS and programs * splits <= num_sms:
        splits *= 2
    return splits


@dataclass
class TritonAttentionMetadata:
    backend: TritonPagedBackend
    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    block_tables: torch.Tensor  # [N, W] pages of each sequence, padded with 0
    seq_lens: torch.Tensor  # [N] cached tokens of each sequence once this step's are written
    query_start: torch.Tensor  # [N + 1] first row of each sequence in the flattened batch
    query_lens: list[int]  # host copy, to lay out prefill tiles
    num_tokens: int
    decode_only: bool
    num_splits: int = 1
    split_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    _tiles: dict = field(default_factory=dict)

    def tiles(self, block_q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence, first query) of every tile of `block_q` queries, built on first use."""
        if block_q not in self._tiles:
            seqs, firsts = [], []
            for i, n in enumerate(self.query_lens):
                for first in range(0, n, block_q):
                    seqs.append(i)
                    firsts.append(first)
            self._tiles[block_q] = tuple(ints_to_device(self.backend.device, seqs, firsts))
        return self._tiles[block_q]


class TritonPagedBackend:
    def __init__(self, kv_specs: list[KVCacheSpec], device: torch.device, num_sms: int | None = None):
        self.device = device
        self.num_kv_heads = max(s.num_kv_heads for s in kv_specs)
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.num_sms = num_sms

    def build_metadata(self, batch: ModelInput, positions: torch.Tensor, block_size: int,
                       dtype: torch.dtype) -> TritonAttentionMetadata:
        n = len(batch.query_lens)
        width = max(len(t) for t in batch.block_tables)
        tables = padded_rows(batch.block_tables, width, 0)
        slots, starts, seq_lens, row = [], [0], [], 0
        for table, start, q_len in zip(batch.block_tables, batch.context_lens, batch.query_lens):
            slots += [table[p // block_size] * block_size + p % block_size for p in range(start, start + q_len)]
            row += q_len
            starts.append(row)
            seq_lens.append(start + q_len)
        slot_mapping, table_flat, lens, query_start = ints_to_device(self.device, slots, tables, seq_lens, starts)
        decode_only = batch.num_decodes == n
        meta = TritonAttentionMetadata(self, slot_mapping, table_flat.view(n, width), lens, query_start,
                                       list(batch.query_lens), row, decode_only)
        if decode_only:
            meta.num_splits = choose_num_splits(n, self.num_kv_heads, self.num_sms)
        return meta

    def allocate_split_buffers(self, meta: TritonAttentionMetadata, q_heads: int, head_dim: int) -> None:
        acc, scalars = split_buffer_sizes(meta.num_tokens, q_heads, head_dim, meta.num_splits)
        f32 = dict(dtype=torch.float32, device=self.device)
        meta.split_buffers = (torch.empty(acc, **f32), torch.empty(scalars, **f32), torch.empty(scalars, **f32))

    def forward(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: TritonAttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] (already rotated). Returns [T, Hq, D]."""
        write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        if q.stride(-1) != 1:
            q = q.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        hq, d = q.shape[1], q.shape[2]
        if meta.decode_only:
            block_q, splits = 1, meta.num_splits
            tile_seq, tile_first = meta.tiles(1)
            if splits > 1 and meta.split_buffers is None:
                self.allocate_split_buffers(meta, hq, d)
        else:
            block_q, splits = prefill_block_q(hq // layer.num_kv_heads, d), 1
            tile_seq, tile_first = meta.tiles(block_q)
        return paged_attention(q, kv_cache[0], kv_cache[1], out, meta.block_tables, meta.seq_lens, meta.query_start,
                               tile_seq, tile_first, block_q, layer.scale, layer.softcap, layer.sliding_window,
                               splits, meta.split_buffers)

    def forward_mla(self, layer, q, entry, kv_b_proj, kv_cache, meta):
        raise NotImplementedError("MLA layers are served by the reference backend (see attention/selector.py)")
