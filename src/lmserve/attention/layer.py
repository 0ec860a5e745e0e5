"""The attention layer every family puts in its decoder layers.

It holds what is fixed per layer (heads, scale, softcap, sliding window) and declares its KV
spec; the step's backend (carried by the metadata, chosen by device) does the work.
"""

from __future__ import annotations

import torch
from torch import nn

from lmserve.attention.spec import KVCacheSpec


class Attention(nn.Module):
    """softmax(cap(q k^T * scale) + mask) v over the paged cache; q, k, v already rotated."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap or None

    @property
    def kv_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.num_kv_heads, self.head_dim, self.sliding_window)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache, meta) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq, D]."""
        return meta.backend.forward(self, q, k, v, kv_cache, meta)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"window={self.sliding_window}, softcap={self.softcap}")
