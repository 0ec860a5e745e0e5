"""Attention over the paged KV cache: per-layer KV specs, the attention layer families use, and
backends chosen by device (the CPU SDPA backend is the reference every faster one must match)."""

from lmserve.attention.layer import Attention, MLAAttention
from lmserve.attention.selector import get_attention_backend
from lmserve.attention.spec import KVCacheSpec, MLAKVCacheSpec

__all__ = ["Attention", "KVCacheSpec", "MLAAttention", "MLAKVCacheSpec", "get_attention_backend"]
