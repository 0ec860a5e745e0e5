"""The architecture facts one model needs, normalized from config.json or GGUF metadata.

Every family reads its numbers from the checkpoint at load time; this dataclass is the one
shape the layers see, so they never parse a checkpoint format themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    eos_token_ids: set[int] = field(default_factory=set)
    bos_token_id: int | None = None

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
        archs = cfg.get("architectures") or [cfg.get("model_type", "")]
        heads = cfg["num_attention_heads"]
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        # transformers 5.x writes rope settings under `rope_parameters`; checkpoints use the old keys.
        rope_params = cfg.get("rope_parameters")
        if isinstance(rope_params, dict):
            rope_theta = rope_theta or rope_params.get("rope_theta")
            if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        return cls(
            architecture=archs[0],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rope_scaling=normalize_rope_scaling(rope_scaling),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            eos_token_ids=_id_set(cfg.get("eos_token_id")) | _id_set((generation_config or {}).get("eos_token_id")),
            bos_token_id=cfg.get("bos_token_id"),
        )


def normalize_rope_scaling(rope_scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Accept both spellings of the scaling type ("type" in older configs, "rope_type" in newer)."""
    if not rope_scaling:
        return None
    out = dict(rope_scaling)
    rope_type = out.pop("type", None) or out.get("rope_type") or "default"
    out["rope_type"] = rope_type
    return None if rope_type == "default" else out


def _id_set(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}
