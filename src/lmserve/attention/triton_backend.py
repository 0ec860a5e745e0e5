"""The CUDA attention backend: Triton kernels over the paged cache (attention/triton_paged.py).

Per step it builds, once for all layers, the sequences' padded block tables, cached lengths,
query starts and cache slots, copied to the device in one transfer (lmserve.staging). Per layer
it writes the new keys and values into their slots and launches one kernel for the whole batch:
decode tokens and prefill chunks (with a cached prefix) alike, sliding window and softcap
included. Decode-only batches that would leave the GPU's multiprocessors idle split each
sequence's keys (flash-decoding) and merge the partials in a second kernel.

MLA layers (DeepSeek-V2) write their latent entries into the one-tensor cache; decode rows run
attention/triton_mla.py's kernel in the absorbed form, prefill chunks the expanded form (the
pages they read expanded through kv_b_proj into per-head keys and values, then the same kernel
as every other family's prefill), both as the reference backend computes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmserve.attention.backend import AttentionBackend
from lmserve.attention.kv_cache_dtype import read_rows, store_rows
from lmserve.attention.spec import KVSpec, MLAKVCacheSpec
from lmserve.attention.triton_mla import mla_decode
from lmserve.attention.triton_paged import paged_attention, prefill_block_q, split_buffer_sizes, write_kv
from lmserve.staging import ints_to_device, padded_rows

if TYPE_CHECKING:
    from lmserve.model_input import ModelInput

MAX_SPLITS = 16
# A decode batch whose every sequence has at most this many cached tokens runs in one pass (no
# split keys, no merge launch). Measured on an H200 (gpu_check's attention part, 8B layer shape,
# per layer, split+merge / one pass): batch 1 at 128 keys 7.2 / 6.7 us, at 256 keys 7.6 / 10.6 us;
# batch 8 at 128 keys 8.2 / 7.0 us, at 256 keys 8.8 / 10.9 us. So one pass pays up to 128 keys
# and loses beyond (the first guess, 512, cost batch-1 decode 198 -> 193 tok/s). MLA keeps its
# splits: its kernel runs one program per sequence (not one per KV head), so one pass would
# serialize 8x more work. LMSERVE_DECODE_SINGLE_PASS_KEYS overrides it (0: always split).
SINGLE_PASS_MAX_KEYS = 128


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
    num_decodes: int | None = None  # None: decode_only (every sequence decodes)
    mla_prefill: MLAPrefill | None = None  # MLA models' steps with prefill chunks

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


@dataclass
class MLAPrefill:
    """An MLA step's prefill chunks over the expanded form: the distinct cache pages they read
    (expanded once per layer) and, per chunk's sequence, its table renumbered into those pages."""

    pages: torch.Tensor  # [P] cache blocks, each once
    block_tables: torch.Tensor  # [S, W] indices into `pages`
    seq_lens: torch.Tensor  # [S]
    query_start: torch.Tensor  # [S + 1], rows counted from the first prefill row
    query_lens: list[int]
    device: torch.device
    _tiles: dict = field(default_factory=dict)

    def tiles(self, block_q: int) -> tuple[torch.Tensor, torch.Tensor]:
        if block_q not in self._tiles:
            seqs = [i for i, n in enumerate(self.query_lens) for _ in range(0, n, block_q)]
            firsts = [f for n in self.query_lens for f in range(0, n, block_q)]
            self._tiles[block_q] = tuple(ints_to_device(self.device, seqs, firsts))
        return self._tiles[block_q]


class TritonPagedBackend(AttentionBackend):
    supports_cuda_graphs = True  # fixed-shape metadata in device buffers (engine/cuda_graphs.py)

    def __init__(self, kv_specs: list[KVSpec], device: torch.device, num_sms: int | None = None):
        self.device = device
        # An MLA layer's entries are one "KV head" every query head reads (programs per decode
        # sequence: its head blocks, 1 for V2-Lite's 16 heads): its spec says 1.
        self.num_kv_heads = max(s.num_kv_heads for s in kv_specs)
        self.mla = any(isinstance(s, MLAKVCacheSpec) for s in kv_specs)
        override = os.environ.get("LMSERVE_DECODE_SINGLE_PASS_KEYS")
        self.single_pass_max_keys = int(override) if override else 0 if self.mla else SINGLE_PASS_MAX_KEYS
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
                                       list(batch.query_lens), row, decode_only, num_decodes=batch.num_decodes)
        if decode_only:
            meta.num_splits = self.decode_splits(n, max(seq_lens))
        elif self.mla:
            meta.mla_prefill = self._mla_prefill(batch, block_size)
        return meta

    def _mla_prefill(self, batch: ModelInput, block_size: int) -> MLAPrefill:
        """The prefill chunks' pages (only those holding their tokens), each once, and their
        tables renumbered into that list."""
        nd = batch.num_decodes
        index: dict[int, int] = {}
        tables, seq_lens, starts = [], [], [0]
        for table, start, q_len in zip(batch.block_tables[nd:], batch.context_lens[nd:], batch.query_lens[nd:]):
            used = table[:-(-(start + q_len) // block_size)]
            tables.append([index.setdefault(p, len(index)) for p in used])
            seq_lens.append(start + q_len)
            starts.append(starts[-1] + q_len)
        width = max(len(t) for t in tables)
        pages, local, lens, query_start = ints_to_device(self.device, list(index), padded_rows(tables, width, 0),
                                                         seq_lens, starts)
        return MLAPrefill(pages, local.view(len(tables), width), lens, query_start, list(batch.query_lens[nd:]),
                          self.device)

    def decode_splits(self, num_seqs: int, longest: int) -> int:
        """Key splits of a decode-only batch whose longest sequence has `longest` cached tokens
        (this step's included): one pass when that fits, else choose_num_splits (a function of
        the batch size alone, so a CUDA graph captured for it serves any longer context)."""
        if longest <= self.single_pass_max_keys:
            return 1
        return choose_num_splits(num_seqs, self.num_kv_heads, self.num_sms)

    def allocate_split_buffers(self, meta: TritonAttentionMetadata, q_heads: int, head_dim: int) -> None:
        acc, scalars = split_buffer_sizes(meta.num_tokens, q_heads, head_dim, meta.num_splits)
        f32 = dict(dtype=torch.float32, device=self.device)
        meta.split_buffers = (torch.empty(acc, **f32), torch.empty(scalars, **f32), torch.empty(scalars, **f32))

    def forward(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: TritonAttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] (already rotated). Returns [T, Hq, D]."""
        write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping, layer.k_scale, layer.v_scale)
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
                               splits, meta.split_buffers, layer.k_scale, layer.v_scale)

    def forward_mla(self, layer, q: torch.Tensor, entry: torch.Tensor, kv_b_proj, kv_cache: tuple[torch.Tensor],
                    meta: TritonAttentionMetadata) -> torch.Tensor:
        """Multi-head latent attention (the reference's forward_mla says why absorbed for decode,
        expanded for prefill). q [T, H, nope + rope]; entry [T, rank + rope]. -> [T, H, v]."""
        cache = kv_cache[0]
        rank, nope, heads, v_dim = layer.kv_lora_rank, layer.qk_nope_dim, layer.num_heads, layer.v_head_dim
        store_rows(cache.view(-1, cache.shape[-1]), meta.slot_mapping, entry, layer.k_scale)
        t = q.shape[0]
        nd = t if meta.decode_only else meta.num_decodes
        w = kv_b_proj.weight.view(heads, nope + v_dim, rank)
        if nd == t:
            return self._mla_decode(layer, q, cache, w, meta)
        out = q.new_empty(t, heads, v_dim)
        if nd:
            out[:nd] = self._mla_decode(layer, q[:nd], cache, w, meta)
        out[nd:] = self._mla_prefill_forward(layer, q[nd:], cache, kv_b_proj, meta.mla_prefill)
        return out

    def _mla_decode(self, layer, q: torch.Tensor, cache: torch.Tensor, w: torch.Tensor,
                    meta: TritonAttentionMetadata) -> torch.Tensor:
        nope, rank = layer.qk_nope_dim, layer.kv_lora_rank
        b, heads = q.shape[0], q.shape[1]
        w_uk, w_uv = w[:, :nope], w[:, nope:]  # [H, nope, rank], [H, v, rank]
        q_latent = torch.bmm(q[:, :, :nope].transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, rank]
        qd = torch.cat((q_latent, q[:, :, nope:]), dim=-1)
        od = q.new_empty(b, heads, rank)
        splits = meta.num_splits if meta.decode_only else 1
        if splits > 1 and meta.split_buffers is None:
            self.allocate_split_buffers(meta, heads, rank)
        mla_decode(qd, cache, od, meta.block_tables, meta.seq_lens, rank, layer.scale, splits, meta.split_buffers,
                   layer.k_scale)
        return torch.bmm(od.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, v]

    def _mla_prefill_forward(self, layer, q: torch.Tensor, cache: torch.Tensor, kv_b_proj,
                             pre: MLAPrefill) -> torch.Tensor:
        """The chunks' pages expanded into per-head keys [c -> k_nope ; k_rope] and values
        (W_UV c), paged as the cache is, then triton_paged's kernel with one KV head per query
        head. Its one head dim covers q/k and v: the shorter side is padded with zeros (which
        add nothing to a score, and give output columns that are dropped)."""
        rank, nope, heads, v_dim = layer.kv_lora_rank, layer.qk_nope_dim, layer.num_heads, layer.v_head_dim
        qk_dim = nope + layer.rope_dim
        dim = max(qk_dim, v_dim)
        entries = read_rows(cache, pre.pages, layer.k_scale, q.dtype)  # [P, page, rank + rope]
        p, page = entries.shape[0], entries.shape[1]
        kv = kv_b_proj(entries[..., :rank].reshape(p * page, rank)).view(p, page, heads, nope + v_dim)
        k = q.new_zeros(p, page, heads, dim)
        k[..., :nope] = kv[..., :nope]
        k[..., nope:qk_dim] = entries[:, :, None, rank:]
        if v_dim == dim:
            v = kv[..., nope:]
        else:
            v = q.new_zeros(p, page, heads, dim)
            v[..., :v_dim] = kv[..., nope:]
        if qk_dim < dim:
            q = torch.cat((q, q.new_zeros(q.shape[0], heads, dim - qk_dim)), dim=-1)
        elif q.stride(-1) != 1:
            q = q.contiguous()
        out = q.new_empty(q.shape[0], heads, dim)
        block_q = prefill_block_q(1, dim)
        tile_seq, tile_first = pre.tiles(block_q)
        paged_attention(q, k, v, out, pre.block_tables, pre.seq_lens, pre.query_start, tile_seq, tile_first,
                        block_q, layer.scale, None, None)
        return out[..., :v_dim]
