"""Llama family: Meta-Llama-3/3.1, Yi-1.5, SmolLM2 (`LlamaForCausalLM` checkpoints).

Pre-norm decoder, GQA attention with half-split rope, SwiGLU MLP, tied or untied LM head. The
attention and decoder layer here are the generic ones other Llama-shaped families reuse with
their own options (biases, scale, window, softcap).
"""

from __future__ import annotations

import torch
from torch import nn

from lmserve.attention import Attention
from lmserve.layers.linear import QKVParallelLinear, RowParallelLinear
from lmserve.layers.mlp import GatedMLP
from lmserve.layers.norm import RMSNorm
from lmserve.layers.rotary import RotaryEmbedding, get_rope
from lmserve.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from lmserve.models.base import CausalLM
from lmserve.models.config import DecoderConfig


class DecoderAttention(nn.Module):
    """q/k/v packed in one projection, rope on q and k, paged attention, output projection."""

    def __init__(self, config: DecoderConfig, rotary: RotaryEmbedding, scale: float | None = None,
                 sliding_window: int | None = None, softcap: float | None = None):
        super().__init__()
        c = config
        # Under tensor parallelism the projection keeps this rank's heads; the sizes below are its.
        self.qkv_proj = QKVParallelLinear(c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, bias=c.qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = c.head_dim
        self.q_size, self.kv_size = self.num_heads * c.head_dim, self.num_kv_heads * c.head_dim
        self.o_proj = RowParallelLinear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, c.head_dim,
                              scale if scale is not None else c.head_dim**-0.5, sliding_window, softcap)

    def forward(self, rope, x, kv_cache, meta):
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        qk_size = self.q_size + self.kv_size
        # Query and key heads are adjacent columns of the packed projection: rotate them as one
        # tensor, and hand out strided views instead of copies.
        qk = self.rotary.apply(qkv[:, :qk_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim), *rope)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim)
        out = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(out.reshape(t, self.q_size))


class PreNormDecoderLayer(nn.Module):
    """The pre-norm residual block most families share: x + attn(norm(x)), then + mlp(norm(x)).
    A subclass builds self_attn, mlp, input_layernorm and post_attention_layernorm; the residual
    add before the second norm is one launch with it on CUDA (RMSNorm.add_and_norm)."""

    def forward(self, rope, x, kv_cache, meta):
        attn = self.self_attn(rope, self.input_layernorm(x), kv_cache, meta)
        x, h = self.post_attention_layernorm.add_and_norm(x, attn)
        return x + self.mlp(h)


class LlamaDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: DecoderConfig, rotary: RotaryEmbedding, index: int):
        super().__init__()
        self.self_attn = DecoderAttention(config, rotary)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    layer_class: type[nn.Module] = LlamaDecoderLayer  # built as layer_class(config, rotary, index)
    norm_class: type[nn.Module] = RMSNorm

    def __init__(self, config: DecoderConfig, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.rotary = self.build_rotary(config, dtype)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(config, self.rotary, i) for i in range(config.num_layers))
        self.norm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def build_rotary(self, config: DecoderConfig, dtype: torch.dtype) -> RotaryEmbedding:
        """The rope every layer shares (a family with partial or interleaved rope overrides it)."""
        return get_rope(config.head_dim, config.max_position_embeddings, config.rope_theta,
                        config.rope_scaling, dtype=dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta) -> torch.Tensor:
        x = self.embed(input_ids)
        rope = self.rotary.lookup(positions)  # every layer rotates at the same positions
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(rope, x, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits of the rows (on rank 0; None on the other tensor-parallel ranks)."""
        return self.lm_head(hidden)
