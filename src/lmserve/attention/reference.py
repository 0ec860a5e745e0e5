"""The reference attention backend: gather each sequence's pages, then PyTorch's
scaled_dot_product_attention (or, for softcapped layers, the same math written out, since SDPA
has no softcap). Correct on every device and for every layer kind (MLA included); faster
backends are checked against it. It is the default on CPU and the fallback wherever Triton's
kernels do not apply.

On CPU, decode tokens of per-head layers skip the gather: attention/cpu_decode_kernel.py reads
the paged cache in place (the gather path, `gather_decode_attention`, stays for what that kernel
does not cover: an fp8 cache, CUDA, the kernel unbuilt or switched off; tests compare the two).

A step's tokens arrive flattened: decode tokens (one per sequence) first, then prefill chunks.
The metadata is built once per step and shared by every layer, so per-layer work is pure tensor
ops with no Python loop over the decode batch; prefill chunks of similar size share one SDPA call
(PrefillGroup), so a burst of short prompts is not a loop of small calls either. Masks are built
per sliding-window size on first use in a step (Gemma-2's layers alternate two) and reused by every
later layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lmserve.attention import cpu_decode_kernel
from lmserve.attention.backend import AttentionBackend
from lmserve.attention.kv_cache_dtype import read_rows, store_rows

if TYPE_CHECKING:
    from lmserve.model_input import ModelInput


@dataclass
class PrefillChunk:
    """One sequence's prefill chunk inside the flattened batch."""

    start: int  # first row in the flattened token batch
    length: int  # tokens in this chunk
    context_len: int  # tokens before the chunk that are already in the cache
    positions: torch.Tensor  # [length]
    block_table: torch.Tensor  # [blocks]


def _additive_mask(keys: int, positions: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """0 where a query at `positions` (any shape, last dim 1) attends key 0..keys-1, -inf where the
    key lies after it or outside its window: [..., keys] in the compute dtype (which SDPA would
    otherwise convert a boolean mask to in every layer)."""
    span = torch.arange(keys, device=positions.device)
    hidden = span > positions
    if window is not None:
        hidden |= span <= positions - window
    return torch.zeros(hidden.shape, dtype=dtype, device=positions.device).masked_fill_(hidden, float("-inf"))


@dataclass
class DecodeGroup:
    """Decoding sequences whose block tables are padded to one width. Sequences are grouped by
    table length (rounded up to a power of two), so a long sequence does not make every short
    one in the batch gather and attend over its length: the work per step follows the tokens
    actually attended, within 2x."""

    rows: torch.Tensor | None  # indices into the decode rows; None = all of them, in order
    block_tables: torch.Tensor  # [G, width]
    positions: torch.Tensor  # [G]
    dtype: torch.dtype
    block_size: int
    _masks: dict = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:
        """Additive [G, 1, 1, width * block_size] mask (0 / -inf in the compute dtype, which SDPA
        would otherwise convert a boolean mask to in every layer), built once per step."""
        if window not in self._masks:
            self._masks[window] = _additive_mask(self.block_tables.shape[1] * self.block_size,
                                                 self.positions.unsqueeze(1), window, self.dtype).view(
                len(self.positions), 1, 1, -1)
        return self._masks[window]


@dataclass
class PrefillGroup:
    """Prefill chunks of similar size attended in one SDPA call instead of one call each. A burst of
    short prompts (16 chat requests arriving together: ~15 new tokens each over a cached system
    prompt) otherwise spends more on 30 x 16 small calls and their gathers than on the attention
    itself. Queries are padded to the longest chunk, keys to the widest block table; chunks are
    grouped by length and by attended span, each rounded up to a power of two, so the padded work
    stays within 4x of the real work.

    Padding rows repeat a real token and attend only key 0 (a finite row); their outputs are dropped.
    """

    chunks: list[int]  # indices into the step's prefill chunks
    query_rows: torch.Tensor  # [N * L] the step's token row of each padded query
    valid: torch.Tensor  # [n] the padded queries that are real tokens (flat indices into N * L)
    dest: torch.Tensor  # [n] the step's token row of each of them
    block_tables: torch.Tensor  # [N, W] padded with block 0 (masked)
    positions: torch.Tensor  # [N, L] position of each padded query (0 for padding)
    dtype: torch.dtype
    block_size: int
    _masks: dict = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:
        """Additive [N, 1, L, W * block_size] causal (and windowed) mask, built once per step."""
        if window not in self._masks:
            self._masks[window] = _additive_mask(self.block_tables.shape[1] * self.block_size,
                                                 self.positions.unsqueeze(-1), window, self.dtype).unsqueeze(1)
        return self._masks[window]


@dataclass
class ReferenceMetadata:
    backend: ReferenceBackend
    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    dtype: torch.dtype
    num_decode: int = 0
    # Each decoding sequence's block table; None in static metadata (`static_decode_metadata`).
    decode_tables: list[list[int]] | None = field(default_factory=list)
    decode_positions: torch.Tensor | None = None  # [num_decode] position of each decode token
    prefills: list[PrefillChunk] = field(default_factory=list)
    _masks: dict = field(default_factory=dict)
    _decode_groups: list[DecodeGroup] | None = None
    _decode_table: tuple[torch.Tensor, torch.Tensor] | None = None
    _prefill_plan: list[int | PrefillGroup] | None = None

    @property
    def decode_groups(self) -> list[DecodeGroup]:
        """The gather path's groups (built on first use in a step: layers the kernel serves never need them)."""
        if self._decode_groups is None:
            if self.decode_tables is None:
                raise NotImplementedError("static decode metadata serves the paged kernel only: the gather "
                                          "path builds its groups from the block tables on the host")
            self._decode_groups = _decode_groups(self.decode_tables, self.decode_positions, self.dtype,
                                                 self.backend.block_size) if self.num_decode else []
        return self._decode_groups

    def decode_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The paged kernel's view of the decode batch: every table padded to the widest [B, W] (the
        kernel reads only each sequence's own blocks) and the tokens each attends, position + 1 [B]."""
        if self._decode_table is None:
            self._decode_table = (_padded_tables(self.decode_tables, self.decode_positions.device),
                                  self.decode_positions + 1)
        return self._decode_table

    def prefill_plan(self) -> list[int | PrefillGroup]:
        """The prefill chunks in the calls that attend them: a chunk index for a chunk alone in its
        size class, a PrefillGroup for two or more (built on first use in a step)."""
        if self._prefill_plan is None:
            classes: dict[tuple[int, int], list[int]] = {}
            for i, c in enumerate(self.prefills):
                key = ((c.length - 1).bit_length(), (c.context_len + c.length - 1).bit_length())
                classes.setdefault(key, []).append(i)
            self._prefill_plan = [members[0] if len(members) == 1 else self._group(members)
                                  for members in classes.values()]
        return self._prefill_plan

    def _group(self, members: list[int]) -> PrefillGroup:
        chunks = [self.prefills[i] for i in members]
        bs = self.backend.block_size
        dev = chunks[0].block_table.device
        longest = max(c.length for c in chunks)
        used = [-(-(c.context_len + c.length) // bs) for c in chunks]  # blocks each chunk attends
        tables = torch.zeros(len(chunks), max(used), dtype=torch.int64, device=dev)
        for row, (c, blocks) in enumerate(zip(chunks, used)):
            tables[row, :blocks] = c.block_table[:blocks]
        offset = torch.arange(longest, device=dev)
        lengths = torch.tensor([c.length for c in chunks], device=dev).unsqueeze(1)
        starts = torch.tensor([c.start for c in chunks], device=dev).unsqueeze(1)
        contexts = torch.tensor([c.context_len for c in chunks], device=dev).unsqueeze(1)
        real = offset < lengths  # [N, L]
        rows = torch.where(real, starts + offset, starts).view(-1)
        valid = real.view(-1).nonzero().squeeze(1)
        return PrefillGroup(members, rows, valid, rows[valid], tables,
                            torch.where(real, contexts + offset, 0), self.dtype, bs)

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor | None:
        """Boolean [length, context + length] (True = attend), or None for a plain causal chunk."""
        chunk = self.prefills[index]
        if chunk.context_len == 0 and window is None:
            return None
        key = (index, window)
        if key not in self._masks:
            keys = torch.arange(chunk.context_len + chunk.length, device=chunk.positions.device).unsqueeze(0)
            q = chunk.positions.unsqueeze(1)
            visible = keys <= q
            if window is not None:
                visible &= keys > q - window
            self._masks[key] = visible
        return self._masks[key]


class ReferenceBackend(AttentionBackend):
    block_size: int = 16

    def build_metadata(self, batch: ModelInput, positions: torch.Tensor, block_size: int,
                       dtype: torch.dtype) -> ReferenceMetadata:
        self.block_size = bs = block_size
        dev = positions.device
        nd = batch.num_decodes
        meta = ReferenceMetadata(backend=self, slot_mapping=torch.empty(0), dtype=dtype, num_decode=nd)
        slot_parts: list[torch.Tensor] = []
        if nd:
            pos = positions[:nd]
            slot_parts.append(self._decode_slots(batch.block_tables[:nd], pos, bs))
            meta.decode_tables, meta.decode_positions = batch.block_tables[:nd], pos
        row = nd
        for i in range(nd, len(batch.query_lens)):
            n, start = batch.query_lens[i], batch.context_lens[i]
            pos = positions[row:row + n]
            table = torch.tensor(batch.block_tables[i], dtype=torch.int64, device=dev)
            slot_parts.append(table[pos // bs] * bs + pos % bs)
            meta.prefills.append(PrefillChunk(start=row, length=n, context_len=start, positions=pos, block_table=table))
            row += n
        meta.slot_mapping = torch.cat(slot_parts)
        return meta

    def static_decode_metadata(self, slots: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                               seq_lens: torch.Tensor, dtype: torch.dtype) -> ReferenceMetadata:
        """A decode-only batch's metadata over fixed buffers (engine/cpu_graphs.py records a forward
        over them once and replays it): slots [B], positions [B], block tables [B, W], tokens to
        attend [B]. It serves the paged decode kernel; the gather path refuses it."""
        meta = ReferenceMetadata(backend=self, slot_mapping=slots, dtype=dtype, num_decode=slots.shape[0],
                                 decode_tables=None, decode_positions=positions)
        meta._decode_table = (tables, seq_lens)
        return meta

    @staticmethod
    def _decode_slots(tables: list[list[int]], positions: torch.Tensor, bs: int) -> torch.Tensor:
        """Cache slot of each decoding sequence's new token."""
        last = torch.tensor([t[p // bs] for t, p in zip(tables, positions.tolist())], dtype=torch.int64,
                            device=positions.device)
        return last * bs + positions % bs

    def forward(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: ReferenceMetadata) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] (already rotated). Returns [T, Hq, D]."""
        window, scale, softcap = layer.sliding_window, layer.scale, layer.softcap
        if 0 < meta.num_decode == q.shape[0] and cpu_decode_kernel.covers(q, kv_cache[0]):
            # A decode-only step: the new keys and values written and attended in one call.
            tables, seq_lens = meta.decode_table()
            return cpu_decode_kernel.paged_decode_write(q, k, v, kv_cache[0], kv_cache[1], meta.slot_mapping, tables,
                                                        seq_lens, window, scale, softcap)
        write_kv_cache(k, v, kv_cache, meta.slot_mapping, layer.k_scale, layer.v_scale)
        t, hq, d = q.shape
        hkv = k.shape[1]
        group = hq // hkv
        nd = meta.num_decode
        out = q.new_empty(q.shape) if nd < t else None
        if nd:
            if cpu_decode_kernel.covers(q, kv_cache[0]):
                tables, seq_lens = meta.decode_table()
                od = cpu_decode_kernel.paged_decode(q[:nd], kv_cache[0], kv_cache[1], tables, seq_lens, window,
                                                    scale, softcap)
            else:
                od = gather_decode_attention(q[:nd], kv_cache, meta.decode_groups, layer)
            if nd == t:  # decode only: no scatter into a separate output
                return od
            out[:nd] = od
        # Softcapped layers (Gemma-2) attend chunk by chunk: their attention is written out, not SDPA.
        for index in meta.prefill_plan() if softcap is None else range(len(meta.prefills)):
            if isinstance(index, PrefillGroup):
                _grouped_prefill_attention(q, kv_cache, index, layer, out)
                continue
            chunk = meta.prefills[index]
            rows = slice(chunk.start, chunk.start + chunk.length)
            mask = meta.prefill_mask(index, window)
            if chunk.context_len == 0:
                kp, vp = k[rows].transpose(0, 1).unsqueeze(0), v[rows].transpose(0, 1).unsqueeze(0)
            else:
                total = chunk.context_len + chunk.length
                kp = _gather(kv_cache[0], chunk.block_table.unsqueeze(0), layer.k_scale, q.dtype)[:, :, :total]
                vp = _gather(kv_cache[1], chunk.block_table.unsqueeze(0), layer.v_scale, q.dtype)[:, :, :total]
            if softcap is None:
                qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None,
                                                    scale=scale, enable_gqa=True)
                out[rows] = op.squeeze(0).transpose(0, 1)
            else:
                # Same GQA folding as decode: [1, Hkv, group * L, D] against [1, Hkv, S, D].
                length = chunk.length
                qp = q[rows].view(length, hkv, group, d).permute(1, 2, 0, 3).reshape(1, hkv, group * length, d)
                if mask is None:
                    mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril_()
                additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
                op = _softcapped_attention(qp, kp, vp, additive.repeat(group, 1), scale, softcap)
                out[rows] = op.view(hkv, group, length, d).permute(2, 0, 1, 3).reshape(length, hq, d)
        return out

    def forward_mla(self, layer, q: torch.Tensor, entry: torch.Tensor, kv_b_proj, kv_cache: tuple[torch.Tensor],
                    meta: ReferenceMetadata) -> torch.Tensor:
        """Multi-head latent attention. q: [T, H, nope + rope]; entry: [T, latent + rope], what
        the cache keeps per token. Returns [T, H, v_head_dim].

        Decode absorbs kv_b_proj instead of expanding the cache: a head's score against a
        cached token is q_nope . (W_UK c) + q_rope . k_rope = [W_UK^T q_nope ; q_rope] . [c ; k_rope],
        so every head's query is moved into latent space once and scores the cached entries
        directly (one shared "KV head" of 576 values, no per-token expansion: the work per step
        grows with the context only as a dot product); the weighted sum of latents is then
        mapped through W_UV. Prefill expands the latents of its chunk (and of the cached context)
        through kv_b_proj into per-head keys and values: with many queries per key that is the
        cheaper order, and it is exactly transformers' computation.
        """
        cache = kv_cache[0]
        rank, nope, heads = layer.kv_lora_rank, layer.qk_nope_dim, layer.num_heads
        width = cache.shape[-1]
        store_rows(cache.view(-1, width), meta.slot_mapping, entry, layer.k_scale)
        t = q.shape[0]
        nd = meta.num_decode
        out = q.new_empty(t, heads, layer.v_head_dim)
        if nd:
            w = kv_b_proj.weight.view(heads, nope + layer.v_head_dim, rank)
            w_uk, w_uv = w[:, :nope], w[:, nope:]  # [H, nope, rank], [H, v, rank]
            q_latent = torch.bmm(q[:nd, :, :nope].transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, rank]
            qd = torch.cat((q_latent, q[:nd, :, nope:]), dim=-1)  # [B, H, rank + rope]
            od = qd.new_empty(nd, heads, rank)
            for g in meta.decode_groups:
                rows = slice(None) if g.rows is None else g.rows
                entries = read_rows(cache, g.block_tables.view(-1), layer.k_scale, q.dtype).view(
                    len(g.positions), -1, width)
                # Written out (transformers' eager order) rather than SDPA: with all heads as the
                # query axis against one 576-wide key, PyTorch's CPU SDPA kernels ran ~100x slower
                # than these two batched matmuls (benchmarks/bench_mla.py).
                scores = torch.bmm(qd[rows], entries.transpose(1, 2)) * layer.scale + g.mask(None).squeeze(1)
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qd.dtype)
                od[rows] = torch.bmm(probs, entries[..., :rank])  # [G, H, rank]
            out[:nd] = torch.bmm(od.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
        for index, chunk in enumerate(meta.prefills):
            rows = slice(chunk.start, chunk.start + chunk.length)
            if chunk.context_len == 0:
                ent = entry[rows]
            else:
                total = chunk.context_len + chunk.length
                ent = read_rows(cache, chunk.block_table, layer.k_scale, q.dtype).view(-1, width)[:total]
            s = ent.shape[0]
            kv = kv_b_proj(ent[:, :rank]).view(s, heads, nope + layer.v_head_dim)
            k = torch.cat((kv[..., :nope], ent[:, None, rank:].expand(s, heads, width - rank)), dim=-1)
            mask = meta.prefill_mask(index, None)
            op = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                kv[..., nope:].transpose(0, 1).unsqueeze(0), attn_mask=mask, is_causal=mask is None, scale=layer.scale)
            out[rows] = op.squeeze(0).transpose(0, 1)
        return out


def gather_decode_attention(q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], groups: list[DecodeGroup],
                            layer) -> torch.Tensor:
    """Decode attention by gathering each group's pages for SDPA (the path every layer took before
    attention/cpu_decode_kernel.py, and still takes where that kernel does not apply: an fp8 cache,
    CUDA, heads over 256 values). q [B, Hq, D], one token per sequence; returns [B, Hq, D]."""
    nd, hq, d = q.shape
    hkv = kv_cache[0].shape[2]
    window, scale, softcap = layer.sliding_window, layer.scale, layer.softcap
    # One query per sequence: fold the query heads sharing a KV head into the "query length"
    # axis, so GQA needs no key/value expansion and one call covers a group.
    qd = q.view(nd, hkv, hq // hkv, d)
    od = None
    for g in groups:
        kd = _gather(kv_cache[0], g.block_tables, layer.k_scale, q.dtype)
        vd = _gather(kv_cache[1], g.block_tables, layer.v_scale, q.dtype)
        qg = qd if g.rows is None else qd[g.rows]
        if softcap is None:
            og = F.scaled_dot_product_attention(qg, kd, vd, attn_mask=g.mask(window), scale=scale)
        else:
            og = _softcapped_attention(qg, kd, vd, g.mask(window), scale, softcap)
        if g.rows is None:
            od = og
        else:
            if od is None:
                od = qd.new_empty(qd.shape)
            od[g.rows] = og
    return od.reshape(nd, hq, d)


def _grouped_prefill_attention(q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], group: PrefillGroup,
                                layer, out: torch.Tensor) -> None:
    """One SDPA call for a group of prefill chunks, their keys and values read from the cache (this
    step's already written); the real queries' outputs are written into `out` [T, Hq, D]."""
    n, length = group.positions.shape
    _, hq, d = q.shape
    qg = q.index_select(0, group.query_rows).view(n, length, hq, d).transpose(1, 2)
    kg = _gather(kv_cache[0], group.block_tables, layer.k_scale, q.dtype)
    vg = _gather(kv_cache[1], group.block_tables, layer.v_scale, q.dtype)
    og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=group.mask(layer.sliding_window), scale=layer.scale,
                                        enable_gqa=True)
    out.index_copy_(0, group.dest, og.transpose(1, 2).reshape(n * length, hq, d).index_select(0, group.valid))


def _softcapped_attention(q, k, v, mask, scale: float, softcap: float) -> torch.Tensor:
    """transformers' eager order: scores * scale, cap * tanh(scores / cap), + mask, softmax in
    fp32 cast back, times values."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """The new keys and values into their slots (quantized with the layer's scales in an fp8 cache)."""
    k_cache, v_cache = kv_cache
    kvh, d = k_cache.shape[-2:]
    store_rows(k_cache.view(-1, kvh, d), slot_mapping, k, k_scale)
    store_rows(v_cache.view(-1, kvh, d), slot_mapping, v, v_scale)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """[B, max_blocks] block ids -> [B, kvh, max_blocks * block_size, d] keys or values in the
    compute dtype (an fp8 cache's pages converted after the gather: only the pages read)."""
    b, nblk = block_tables.shape
    _, bs, kvh, d = cache.shape
    # index_select on the flattened ids is a plain row copy; advanced indexing costs more per call.
    return read_rows(cache, block_tables.view(-1), scale, dtype).view(b, nblk * bs, kvh, d).transpose(1, 2)


def _decode_groups(tables: list[list[int]], positions: torch.Tensor, dtype: torch.dtype,
                   block_size: int) -> list[DecodeGroup]:
    """Decoding sequences grouped by block-table width rounded up to a power of two."""
    dev = positions.device
    buckets: dict[int, list[int]] = {}
    for i, table in enumerate(tables):
        buckets.setdefault(1 << max(len(table) - 1, 0).bit_length(), []).append(i)
    if len(buckets) == 1:  # the usual case: one group, no row gather or scatter
        return [DecodeGroup(None, _padded_tables(tables, dev), positions, dtype, block_size)]
    groups = []
    for rows in buckets.values():
        index = torch.tensor(rows, dtype=torch.int64, device=dev)
        groups.append(DecodeGroup(index, _padded_tables([tables[i] for i in rows], dev), positions[index],
                                  dtype, block_size))
    return groups


def _padded_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=device)
