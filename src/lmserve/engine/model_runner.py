"""Owns the model and its KV cache; turns a scheduled batch into tensors and runs one forward.

Per step it builds the flattened input ids and positions, the slot of every new token in the
paged cache, and the attention metadata (decode block tables and mask, prefill chunks) once for
all layers. Only the rows that need a next token go through the LM head.
"""

from __future__ import annotations

import torch

from lmserve.engine.scheduler import ScheduledBatch
from lmserve.models.attention import AttentionMetadata, PrefillChunk
from lmserve.models.config import ModelConfig


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        self.config = config
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)) for _ in range(config.num_layers)]

    @staticmethod
    def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, logit_seq_ids: list[int]) -> torch.Tensor:
        """Run the batch; return logits [len(logit_seq_ids), vocab] at the last new token of each
        listed sequence (an id may repeat: the n choices of one prompt sample from one row)."""
        self.copy_blocks(batch.block_copies)
        bs = self.block_size
        dev = self.device
        input_ids: list[int] = []
        positions: list[int] = []
        last_row: dict[int, int] = {}

        decodes = batch.decodes
        for row, seq in enumerate(decodes):
            input_ids.append(seq.token_ids[seq.num_computed_tokens])
            positions.append(seq.num_computed_tokens)
            last_row[seq.seq_id] = row
        meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decode=len(decodes))
        slot_parts: list[torch.Tensor] = []
        if decodes:
            tables = _padded_tables([s.block_table for s in decodes], dev)
            pos = torch.tensor(positions, dtype=torch.int64, device=dev)
            slot_parts.append(tables.gather(1, (pos // bs).unsqueeze(1)).squeeze(1) * bs + pos % bs)
            meta.decode_block_tables = tables
            span = torch.arange(tables.shape[1] * bs, device=dev)
            # Additive (0 / -inf, compute dtype), built once here: SDPA would otherwise convert a
            # boolean mask to exactly this in every layer.
            beyond = span.unsqueeze(0) > pos.unsqueeze(1)
            meta.decode_mask = torch.zeros(beyond.shape, dtype=self.dtype, device=dev).masked_fill_(
                beyond, float("-inf")).view(len(decodes), 1, 1, -1)
        row = len(decodes)
        for seq, n in batch.prefills:
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            pos = torch.arange(start, start + n, device=dev)
            positions.extend(range(start, start + n))
            table = torch.tensor(seq.block_table, dtype=torch.int64, device=dev)
            slot_parts.append(table[pos // bs] * bs + pos % bs)
            chunk = PrefillChunk(start=row, length=n, context_len=start)
            if start:
                chunk.block_table = table
                keys = torch.arange(start + n, device=dev)
                chunk.mask = keys.unsqueeze(0) <= pos.unsqueeze(1)
            meta.prefills.append(chunk)
            row += n
            last_row[seq.seq_id] = row - 1
        meta.slot_mapping = torch.cat(slot_parts)

        ids_t = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        hidden = self.model(ids_t, pos_t, self.kv_caches, meta)
        if not logit_seq_ids:
            return hidden.new_empty(0, self.config.vocab_size)
        rows = torch.tensor([last_row[i] for i in logit_seq_ids], device=dev)
        return self.model.compute_logits(hidden[rows])


def _padded_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=device)
