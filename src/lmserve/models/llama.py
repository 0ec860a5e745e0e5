"""Llama family: Meta-Llama-3/3.1, Yi-1.5, SmolLM2 (LlamaForCausalLM checkpoints).

Pre-norm decoder, GQA attention with half-split rope, SwiGLU MLP, tied or untied LM head.
Checkpoint tensors keep their Hugging Face names; q/k/v and gate/up are packed into one
matmul each at load time (fewer, larger matmuls are what make small-batch decode fast).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lmserve.models.attention import AttentionMetadata, paged_attention
from lmserve.models.config import ModelConfig
from lmserve.models.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.attention_bias)
        self.rotary = rotary
        self.scale = self.head_dim**-0.5

    def forward(self, rope, x, kv_cache, meta: AttentionMetadata):
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        qk_size = self.q_size + self.kv_size
        # Query and key heads are adjacent columns of the packed projection: rotate them as one
        # tensor, and hand out strided views instead of copies.
        qk = self.rotary.apply(qkv[:, :qk_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim), *rope)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(t, self.q_size))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rope, x, kv_cache, meta):
        x = x + self.self_attn(rope, self.input_layernorm(x), kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our packed parameter fragment, shard index)
    packed_params = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(config, dtype)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, self.rotary) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions)  # every layer rotates at the same positions
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(rope, x, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def shard_sizes(self, packed: str) -> list[int]:
        c = self.config
        if packed == "qkv_proj":
            return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        return [c.intermediate_size, c.intermediate_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into our parameters; every parameter must be filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("model."):
                name = name[len("model."):]
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            target, offset, size = name, 0, None
            for frag, (packed, shard) in self.packed_params.items():
                if f".{frag}." in name:
                    target = name.replace(frag, packed)
                    sizes = self.shard_sizes(packed)
                    offset, size = sum(sizes[:shard]), sizes[shard]
                    break
            if target not in params:
                raise ValueError(f"unexpected tensor {name!r} for {self.config.architecture}")
            param = params[target]
            dest = param.data if size is None else param.data.narrow(0, offset, size)
            if dest.shape != tensor.shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(f"{target}#{offset}")
        expected = set()
        for pname in params:
            packed = next((p for p in ("qkv_proj", "gate_up_proj") if f".{p}." in pname), None)
            if packed is None:
                expected.add(f"{pname}#0")
            else:
                sizes = self.shard_sizes(packed)
                expected.update(f"{pname}#{sum(sizes[:i])}" for i in range(len(sizes)))
        if self.config.tie_word_embeddings:
            expected.discard("lm_head.weight#0")
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing tensors for: {', '.join(missing[:8])}"
                             + (" ..." if len(missing) > 8 else ""))
