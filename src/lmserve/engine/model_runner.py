"""Owns the model and its KV cache; runs one forward over a plain-data `ModelInput`.

The cache is allocated from the KV specs the model's attention layers declare (one pair of
tensors per layer, shaped by that layer's spec). Per step it builds the flattened token ids and
positions, lets the device's attention backend build its metadata once for all layers, and
sends only the rows that need a next token through the LM head.
"""

from __future__ import annotations

import torch

from lmserve.attention import KVCacheSpec, get_attention_backend
from lmserve.attention.spec import kv_bytes_per_block
from lmserve.engine.batch import ModelInput
from lmserve.models.config import ModelConfig


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        self.config = config
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.kv_specs: list[KVCacheSpec] = model.kv_cache_specs()
        self.kv_caches = [spec.allocate(num_blocks, block_size, dtype, device) for spec in self.kv_specs]
        self.attention_backend = get_attention_backend(device)

    @staticmethod
    def kv_bytes_per_block(model: torch.nn.Module, block_size: int, dtype: torch.dtype) -> int:
        return kv_bytes_per_block(model.kv_cache_specs(), block_size, dtype)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in self.kv_caches:
            for part in cache:
                part[dst] = part[src]

    @torch.inference_mode()
    def execute(self, batch: ModelInput) -> torch.Tensor:
        """Run the batch; return logits [len(batch.logit_rows), vocab]."""
        self.copy_blocks(batch.block_copies)
        dev = self.device
        ids = torch.tensor(batch.token_ids, dtype=torch.int64, device=dev)
        positions = torch.tensor(batch.positions, dtype=torch.int64, device=dev)
        meta = self.attention_backend.build_metadata(batch, positions, self.block_size, self.dtype)
        hidden = self.model(ids, positions, self.kv_caches, meta)
        if not batch.logit_rows:
            return hidden.new_empty(0, self.config.vocab_size)
        rows = torch.tensor(batch.logit_rows, device=dev)
        return self.model.compute_logits(hidden[rows])
