"""Attention over the paged KV cache: per-layer KV specs, the attention layer families use, and
backends behind one interface (attention/backend.py), chosen by device (attention/reference.py is
the reference every faster one must match)."""

from lmserve.attention.backend import AttentionBackend
from lmserve.attention.layer import Attention, MLAAttention
from lmserve.attention.selector import get_attention_backend
from lmserve.attention.spec import KVCacheSpec, KVSpec, MLAKVCacheSpec

__all__ = ["Attention", "AttentionBackend", "KVCacheSpec", "KVSpec", "MLAAttention", "MLAKVCacheSpec",
           "get_attention_backend"]
