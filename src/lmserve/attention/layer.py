"""The attention layer every family puts in its decoder layers.

It holds what is fixed per layer (heads, scale, softcap, sliding window) and declares its KV
spec; the step's backend (carried by the metadata, chosen by device) does the work.
"""

from __future__ import annotations

import torch
from torch import nn

from lmserve.attention.spec import KVCacheSpec, MLAKVCacheSpec


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
        # An fp8 KV cache's scales (attention/kv_cache_dtype.py): from the checkpoint, else 1.0.
        # MLA layers scale their one latent entry by k_scale.
        self.k_scale = self.v_scale = 1.0

    @property
    def kv_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.num_kv_heads, self.head_dim, self.sliding_window)

    @property
    def partial_width(self) -> int:
        """Values per head in a decode split's partial output (the split-key buffers' row)."""
        return self.head_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache, meta) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq, D]."""
        return meta.backend.forward(self, q, k, v, kv_cache, meta)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"window={self.sliding_window}, softcap={self.softcap}")


class MLAAttention(Attention):
    """Multi-head latent attention (DeepSeek-V2) over a cache of [latent | rope key] entries.

    The layer caches, per token, the normalized latent c (kv_lora_rank) and the rotated rope key
    (rope_dim, one for all heads); per-head keys are [W_UK_h c ; k_rope] and values W_UV_h c,
    with W_UK/W_UV the two halves of each head's kv_b_proj rows. The backend computes them from
    the cache when it reads it (see ReferenceBackend.forward_mla for how).
    """

    def __init__(self, num_heads: int, qk_nope_dim: int, rope_dim: int, v_head_dim: int, kv_lora_rank: int,
                 scale: float):
        super().__init__(num_heads, 1, qk_nope_dim + rope_dim, scale)
        self.qk_nope_dim, self.rope_dim, self.v_head_dim = qk_nope_dim, rope_dim, v_head_dim
        self.kv_lora_rank = kv_lora_rank

    @property
    def partial_width(self) -> int:
        """Absorbed decode attends in latent space: a split's partial is a latent."""
        return self.kv_lora_rank

    @property
    def kv_spec(self) -> MLAKVCacheSpec:
        return MLAKVCacheSpec(self.kv_lora_rank, self.rope_dim)

    def forward(self, q: torch.Tensor, entry: torch.Tensor, kv_b_proj: nn.Module, kv_cache, meta) -> torch.Tensor:
        """q [T, H, nope + rope] (rope part rotated), entry [T, kv_lora_rank + rope] (the
        normalized latent and the rotated rope key), kv_b_proj the layer's up-projection
        -> [T, H, v_head_dim]."""
        return meta.backend.forward_mla(self, q, entry, kv_b_proj, kv_cache, meta)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, nope={self.qk_nope_dim}, rope={self.rope_dim}, v={self.v_head_dim}, "
                f"kv_lora_rank={self.kv_lora_rank}, scale={self.scale:.6g}")
