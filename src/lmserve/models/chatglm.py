"""ChatGLM3-6B and GLM-4-9B-chat in their original layout (`ChatGLMModel`, model_type chatglm).

The same network as GLM-4's -hf layout (models/glm.py): what differs is how the checkpoint
spells it, and that is all this family reads (MODEL_FAMILIES.md §7, vLLM's chatglm.py):
- config keys: num_layers, ffn_hidden_size, kv_channels (head dim), multi_query_group_num
  (KV heads when multi_query_attention), layernorm_epsilon, padded_vocab_size, seq_length,
  rope_ratio (the rope base is 10000 * rope_ratio: 500 for GLM-4), add_qkv_bias,
  add_bias_linear;
- tensors under `transformer.`: `self_attention.query_key_value` is already [Q; K; V] (weight
  and bias) and `mlp.dense_h_to_4h` is already [gate; up], so both load whole into our packed
  projections; the stored `rotary_pos_emb.inv_freq` is recomputed instead.
Rope covers the first half of each head in interleaved pairs (`original_rope`), as in -hf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmserve.models.config import id_set
from lmserve.models.glm import GlmConfig, GlmForCausalLM

# checkpoint name (after "transformer.") -> ours; the rest of each name is kept.
_RENAMES = (
    ("embedding.word_embeddings.", "embed_tokens."),
    ("encoder.final_layernorm.", "norm."),
    ("output_layer.", "lm_head."),
    ("encoder.layers.", "layers."),
    (".self_attention.query_key_value.", ".self_attn.qkv_proj."),
    (".self_attention.dense.", ".self_attn.o_proj."),
    (".mlp.dense_h_to_4h.", ".mlp.gate_up_proj."),
    (".mlp.dense_4h_to_h.", ".mlp.down_proj."),
)


@dataclass
class ChatGLMConfig(GlmConfig):
    @classmethod
    def from_hf(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None,
                **overrides: Any) -> GlmConfig:
        for key, meaning in (("apply_residual_connection_post_layernorm", False), ("rmsnorm", True),
                             ("post_layer_norm", True)):
            if bool(cfg.get(key, meaning)) != meaning:
                raise ValueError(f"ChatGLM with {key}: {cfg[key]} is not supported")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("multi_query_group_num", heads) if cfg.get("multi_query_attention") else heads
        head_dim = cfg.get("kv_channels") or cfg["hidden_size"] // heads
        context = cfg.get("seq_length") or cfg.get("max_position_embeddings") or 8192
        eos = id_set(cfg.get("eos_token_id")) | id_set((generation_config or {}).get("eos_token_id"))
        if cfg.get("rope_scaling"):
            raise ValueError("ChatGLM rope_scaling is not supported")
        values = dict(
            architecture=(cfg.get("architectures") or ["ChatGLMModel"])[0],
            num_layers=cfg["num_layers"],
            vocab_size=cfg.get("padded_vocab_size") or cfg["vocab_size"],
            context_length=context,
            eos_token_ids=eos,
            bos_token_id=cfg.get("bos_token_id"),
            hidden_size=cfg["hidden_size"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=cfg["ffn_hidden_size"],
            rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
            rope_theta=10000.0 * float(cfg.get("rope_ratio", 1.0)),
            max_position_embeddings=context,
            rope_scaling=None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("add_qkv_bias", True)),
            o_bias=bool(cfg.get("add_bias_linear", False)),
            mlp_bias=bool(cfg.get("add_bias_linear", False)),
            hidden_act="silu",
            partial_rotary_factor=0.5,
        )
        values.update(overrides)
        return cls(**values)


class ChatGLMForCausalLM(GlmForCausalLM):
    """`ChatGLMModel` checkpoints (the architecture name their config.json declares)."""

    config_class = ChatGLMConfig

    def map_checkpoint_name(self, name: str) -> tuple[str, int | None] | None:
        if not name.startswith("transformer."):
            return name, None  # reported as unexpected by the loader
        name = name[len("transformer."):]
        if name.startswith("rotary_pos_emb."):
            return None
        for old, new in _RENAMES:
            name = name.replace(old, new)
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        return name, None
