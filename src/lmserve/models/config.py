"""Model configs: the small common spec the engine sees, and the decoder config most families
read their own keys into.

The engine needs only `ModelConfig`'s fields (layer count, vocabulary, context, end-of-sequence
ids) plus the per-layer KV specs the built model declares. Everything else is the family's: each
family's config class reads its own checkpoint keys (`from_hf`), so a family with other key
names (ChatGLM's `num_layers`, TeleChat2's `n_layer`) brings its own reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmserve.layers.rotary import normalize_rope_scaling, rope_context_length


@dataclass
class ModelConfig:
    architecture: str
    num_layers: int
    vocab_size: int
    context_length: int
    eos_token_ids: set[int] = field(default_factory=set)
    bos_token_id: int | None = None
    # config.json's `quantization_config` (GPTQ, AWQ, ...): the checkpoint's tensors are quantized
    # (layers/quantization/ reads it); None for a dense checkpoint.
    quantization_config: dict[str, Any] | None = None


@dataclass
class DecoderConfig(ModelConfig):
    """A pre-norm GQA decoder with rope and a gated MLP (Llama, Qwen2, Gemma2 and kin)."""

    hidden_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None,
                **overrides: Any) -> DecoderConfig:
        """Read Llama-style keys; a family passes what it fixes or reads itself as overrides."""
        archs = cfg.get("architectures") or [cfg.get("model_type", "")]
        heads = cfg["num_attention_heads"]
        rope_scaling, rope_theta = rope_settings(cfg)
        max_pos = cfg.get("max_position_embeddings", 2048)
        attention_bias = bool(cfg.get("attention_bias", False))
        values = dict(
            architecture=archs[0],
            num_layers=cfg["num_hidden_layers"],
            vocab_size=cfg["vocab_size"],
            context_length=rope_context_length(max_pos, rope_scaling),
            eos_token_ids=id_set(cfg.get("eos_token_id")) | id_set((generation_config or {}).get("eos_token_id")),
            bos_token_id=cfg.get("bos_token_id"),
            hidden_size=cfg["hidden_size"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            max_position_embeddings=max_pos,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            hidden_act=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
        )
        values.update(overrides)
        return cls(**values)


def rope_settings(cfg: dict[str, Any]) -> tuple[dict[str, Any] | None, float]:
    """(normalized rope scaling, rope theta). transformers 5.x writes them under
    `rope_parameters`; checkpoints use the old keys `rope_scaling` and `rope_theta`."""
    rope_scaling = cfg.get("rope_scaling")
    rope_theta = cfg.get("rope_theta")
    rope_params = cfg.get("rope_parameters")
    if isinstance(rope_params, dict):
        rope_theta = rope_theta or rope_params.get("rope_theta")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
    return normalize_rope_scaling(rope_scaling), float(rope_theta or 10000.0)


def id_set(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}
