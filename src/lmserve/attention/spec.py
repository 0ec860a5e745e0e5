"""What one layer keeps in the KV cache per token, so the runner can allocate and size it.

A spec belongs to a layer: Gemma-2 alternates sliding-window and global layers, and MLA
(DeepSeek-V2) caches one compressed latent per token instead of per-head keys and values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


class KVSpec(ABC):
    """What every layer kind's spec answers: the runner allocates, sizes and copies the cache by
    these alone, whatever the layer kind."""

    # Declared, not defined, here: each kind is a frozen dataclass that has them as fields or
    # properties. W: a query attends to itself and the W - 1 tokens before it (None: the whole
    # context); num_kv_heads: key/value heads the queries read (what kernels launch programs over).
    sliding_window: int | None
    num_kv_heads: int

    @abstractmethod
    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """The shape of each of the layer's cache tensors."""

    @abstractmethod
    def bytes_per_token(self, dtype: torch.dtype) -> int:
        ...

    @abstractmethod
    def allocate(self, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, ...]:
        """The layer's cache tensors, zeroed (the runner copies blocks part by part)."""


@dataclass(frozen=True)
class KVCacheSpec(KVSpec):
    """Per-head keys and values; `sliding_window` W bounds what a query attends to (itself and
    the W - 1 tokens before it), None for full attention."""

    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """The shape of each of the layer's two cache tensors (keys, values)."""
        return (num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()

    def allocate(self, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.cache_shape(num_blocks, block_size)
        return (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))


@dataclass(frozen=True)
class MLAKVCacheSpec(KVSpec):
    """Multi-head latent attention (DeepSeek-V2): per token one normalized latent of
    `kv_lora_rank` values and the rotated rope key (`rope_dim`, shared by every head), stored
    side by side in ONE tensor: [latent | rope key], 512 + 64 = 576 values for the real model.
    Per-head keys and values are never cached (they would be 128 heads x (192 + 128) values);
    attention expands or absorbs the latent through kv_b_proj when it reads it."""

    kv_lora_rank: int
    rope_dim: int
    sliding_window: None = None  # MLA layers attend to the whole context

    @property
    def num_kv_heads(self) -> int:
        """One latent entry per token, read by every query head: one "KV head"."""
        return 1

    @property
    def entry_size(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.entry_size)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.entry_size * torch.empty((), dtype=dtype).element_size()

    def allocate(self, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor]:
        """A one-tensor tuple: the runner copies blocks part by part, whatever the layer kind."""
        return (torch.zeros(self.cache_shape(num_blocks, block_size), dtype=dtype, device=device),)


def kv_bytes_per_block(specs: list[KVSpec], block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block (block_size tokens) takes across every layer."""
    return block_size * sum(spec.bytes_per_token(dtype) for spec in specs)
