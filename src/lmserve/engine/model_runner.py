"""Owns the model and its KV cache; runs one forward over a plain-data `ModelInput`.

The cache is allocated from the KV specs the model's attention layers declare (one pair of
tensors per layer, shaped by that layer's spec). Per step it builds the flattened token ids and
positions, lets the device's attention backend build its metadata once for all layers, and
sends only the rows that need a next token through the LM head.
"""

from __future__ import annotations

import logging

import torch

from lmserve.attention import KVCacheSpec, get_attention_backend
from lmserve.attention.spec import kv_bytes_per_block
from lmserve.engine.batch import ModelInput
from lmserve.engine.compiled_decode import CompiledDecode, unsupported_reason
from lmserve.models.config import ModelConfig

log = logging.getLogger("lmserve.engine")


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, compile_decode: bool = False):
        self.model = model
        self.config = config
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.kv_specs: list[KVCacheSpec] = model.kv_cache_specs()
        self.compiled: CompiledDecode | None = None
        reason = unsupported_reason(model) if compile_decode else None
        if reason is not None:
            log.warning("compile: not for this model (%s); decode stays eager", reason)
        # The compiled path's warm-up writes to one scratch block past the block manager's.
        extra = 1 if compile_decode and reason is None else 0
        self.kv_caches = [spec.allocate(num_blocks + extra, block_size, dtype, device) for spec in self.kv_specs]
        self.attention_backend = get_attention_backend(device)
        if extra:
            self.compiled = CompiledDecode(model, self.kv_caches, block_size, scratch_block=num_blocks)
            self.compiled.start()

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
        if self.compiled is not None:
            logits = self.compiled.run(batch, dev)
            if logits is not None:
                return logits
        ids = torch.tensor(batch.token_ids, dtype=torch.int64, device=dev)
        positions = torch.tensor(batch.positions, dtype=torch.int64, device=dev)
        meta = self.attention_backend.build_metadata(batch, positions, self.block_size, self.dtype)
        hidden = self.model(ids, positions, self.kv_caches, meta)
        if not batch.logit_rows:
            return hidden.new_empty(0, self.config.vocab_size)
        rows = torch.tensor(batch.logit_rows, device=dev)
        return self.model.compute_logits(hidden[rows])
