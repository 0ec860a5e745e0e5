"""GLM-4 in transformers' native layout: THUDM/glm-4-9b-chat-hf (`GlmForCausalLM`, model_type glm).

Llama's block with (transformers' modeling_glm is the reference):
- biases on q/k/v, none on the output projection or the MLP;
- rope on the first `partial_rotary_factor` (0.5) of each head only, with interleaved pairs
  (2i, 2i+1): the layout the original ChatGLM code rotates in, kept by the conversion;
- gate and up stored fused as `mlp.gate_up_proj` ([gate; up], gate first), loaded as one piece.

The original ChatGLM layout of the same weights is models/chatglm.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmserve.layers.rotary import RotaryEmbedding, get_rope
from lmserve.models.config import DecoderConfig
from lmserve.models.llama import LlamaForCausalLM


@dataclass
class GlmConfig(DecoderConfig):
    partial_rotary_factor: float = 0.5

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None,
                **overrides: Any) -> DecoderConfig:
        rope_params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
        factor = cfg.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 0.5))
        overrides.setdefault("qkv_bias", bool(cfg.get("attention_bias", True)))
        return super().from_hf(cfg, generation_config, partial_rotary_factor=float(factor), o_bias=False,
                               mlp_bias=False, **overrides)


class GlmForCausalLM(LlamaForCausalLM):
    config_class = GlmConfig

    def build_rotary(self, config: GlmConfig, dtype: torch.dtype) -> RotaryEmbedding:
        rotary_dim = int(config.head_dim * config.partial_rotary_factor)
        return get_rope(config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling,
                        rotary_dim=rotary_dim, style="interleaved", dtype=dtype)
