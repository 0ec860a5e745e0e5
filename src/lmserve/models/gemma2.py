"""Gemma-2 family: gemma-2-9b-it, gemma-2-27b-it (`Gemma2ForCausalLM`).

What differs from Llama (transformers' modeling_gemma2 is the reference):
- RMSNorm scales by (1 + w) in fp32, and each layer has four norms (sandwich: a norm after
  attention and after the MLP too);
- embeddings are multiplied by sqrt(hidden), the factor cast to the compute dtype first;
- GELU-tanh gated MLP;
- attention scale query_pre_attn_scalar^-0.5 (not head_dim^-0.5), logits softcapped with
  cap * tanh(x / cap); final logits softcapped the same way;
- head_dim is its own config key, independent of hidden / heads;
- layers alternate sliding-window (even) and global attention (`layer_types` where given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmserve.layers.mlp import GatedMLP
from lmserve.layers.norm import GemmaRMSNorm
from lmserve.layers.rotary import RotaryEmbedding
from lmserve.models.config import DecoderConfig
from lmserve.models.llama import DecoderAttention, LlamaForCausalLM


@dataclass
class Gemma2Config(DecoderConfig):
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None,
                **overrides: Any) -> DecoderConfig:
        layers = cfg["num_hidden_layers"]
        layer_types = cfg.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        return super().from_hf(
            cfg, generation_config,
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            sliding_window=cfg.get("sliding_window") or cfg.get("sliding_window_size"),
            layer_types=list(layer_types), **overrides)


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config: Gemma2Config, rotary: RotaryEmbedding, index: int):
        super().__init__()
        c = config
        window = c.sliding_window if c.layer_types[index] == "sliding_attention" else None
        self.self_attn = DecoderAttention(c, rotary, scale=c.query_pre_attn_scalar**-0.5,
                                          sliding_window=window, softcap=c.attn_logit_softcapping)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.input_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, rope, x, kv_cache, meta):
        attn = self.post_attention_layernorm(self.self_attn(rope, self.input_layernorm(x), kv_cache, meta))
        x, h = self.pre_feedforward_layernorm.add_and_norm(x, attn)
        return x + self.post_feedforward_layernorm(self.mlp(h))


class Gemma2ForCausalLM(LlamaForCausalLM):
    config_class = Gemma2Config
    layer_class = Gemma2DecoderLayer
    norm_class = GemmaRMSNorm

    def __init__(self, config: Gemma2Config, dtype: torch.dtype):
        super().__init__(config, dtype)
        # transformers casts the factor to the compute dtype first (sqrt(3584) is 59.75 in bf16).
        self.embed_scale = config.hidden_size**0.5

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x * torch.tensor(self.embed_scale, dtype=x.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap and logits is not None else logits
