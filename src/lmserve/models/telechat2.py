"""TeleChat2 (Tele-AI/TeleChat2-3B/7B/35B/115B; model_type telechat, remote code only).

Llama's numerics (MODEL_FAMILIES.md §9, vLLM's telechat2.py, the remote modeling_telechat2.py)
with:
- Bloom-style config keys: n_layer, n_head, ffn_hidden_size, layer_norm_epsilon;
  num_key_value_heads absent or null means multi-head attention;
- biases on the attention output (`dense`) and the MLP down projection only;
- `self_attention.query` (q) and `self_attention.key_value`, whose rows are per KV head its key
  rows then its value rows ([K_0; V_0; K_1; V_1; ...]): split at load into our packed k and v;
- rope base 10000; past `base_seqlen` (8192) the remote code stretches the base by NTK
  (alpha = 2^ceil(log2(L / base_seqlen) + 1) - 1) and scales cos/sin by 0.1 ln(L / training_seqlen) + 1.
  A paged cache needs one rotation per position, so positions inside base_seqlen rotate exactly
  as the remote code does for every sequence that fits it, and positions beyond use the
  stretch for the full configured context (the choice the dynamic-NTK families make too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmserve.layers.mlp import GatedMLP
from lmserve.layers.rotary import RotaryEmbedding, get_rope, rope_frequencies
from lmserve.models.config import DecoderConfig, id_set
from lmserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM

_RENAMES = (
    ("word_embeddings.", "embed_tokens."),
    ("ln_f.", "norm."),
    ("h.", "layers."),
    (".self_attention.dense.", ".self_attn.o_proj."),
)
_KV_SHARD = "key_value"  # a shard id of our own: one tensor filling the k and v shards


@dataclass
class TeleChat2Config(DecoderConfig):
    base_seqlen: int = 8192
    training_seqlen: int = 8192

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None,
                **overrides: Any) -> DecoderConfig:
        if cfg.get("embed_layernorm"):
            raise ValueError("TeleChat2 with embed_layernorm: true is not supported")
        if cfg.get("apply_residual_connection_post_layernorm"):
            raise ValueError("TeleChat2 with apply_residual_connection_post_layernorm: true is not supported")
        heads = cfg["n_head"]
        training = int(cfg.get("training_seqlen") or 8192)
        context = int(cfg.get("max_position_embeddings") or cfg.get("seq_length") or training)
        values = dict(
            architecture=(cfg.get("architectures") or ["TeleChat2ForCausalLM"])[0],
            num_layers=cfg["n_layer"],
            vocab_size=cfg["vocab_size"],
            context_length=context,
            eos_token_ids=id_set(cfg.get("eos_token_id")) | id_set((generation_config or {}).get("eos_token_id")),
            bos_token_id=cfg.get("bos_token_id"),
            hidden_size=cfg["hidden_size"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg["hidden_size"] // heads,
            intermediate_size=cfg["ffn_hidden_size"],
            rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            rope_theta=10000.0,
            max_position_embeddings=context,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=False, o_bias=True, mlp_bias=False,
            hidden_act=cfg.get("hidden_act") or "silu",
            base_seqlen=int(cfg.get("base_seqlen") or training),
            training_seqlen=training,
        )
        values.update(overrides)
        return cls(**values)


class TeleChat2DecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: TeleChat2Config, rotary: RotaryEmbedding, index: int):
        super().__init__(config, rotary, index)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=False,
                            down_bias=True)


class TeleChat2ForCausalLM(LlamaForCausalLM):
    config_class = TeleChat2Config
    layer_class = TeleChat2DecoderLayer

    def __init__(self, config: TeleChat2Config, dtype: torch.dtype):
        super().__init__(config, dtype)
        for layer in self.layers:
            layer.self_attn.qkv_proj.customize_loading(self._qkv_loader, [0, _KV_SHARD])

    def build_rotary(self, config: TeleChat2Config, dtype: torch.dtype) -> RotaryEmbedding:
        rotary = get_rope(config.head_dim, config.max_position_embeddings, config.rope_theta, dtype=dtype)
        if config.max_position_embeddings > config.base_seqlen:
            longest = config.max_position_embeddings
            alpha = max(2 ** math.ceil(math.log2(longest / config.base_seqlen) + 1) - 1, 1)
            d = config.head_dim
            base = config.rope_theta * alpha ** (d / (d - 2))
            ratio = longest / config.training_seqlen
            mscale = 0.1 * math.log(ratio) + 1.0 if ratio > 1 else 1.0
            beyond = torch.arange(config.base_seqlen, longest)
            angles, _ = rope_frequencies(beyond, d, base, None, longest)
            table = torch.cat([angles.cos() * mscale, angles.sin() * mscale], dim=-1)
            with torch.no_grad():
                rotary.cos_sin[config.base_seqlen:] = table.to(rotary.cos_sin.dtype)
        return rotary

    def _qkv_loader(self, inner):
        """The qkv parameter's loader (`inner`), taking TeleChat2's fused key_value tensor."""
        kv_heads, head_dim = self.config.num_kv_heads, self.config.head_dim

        def load(param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
            if shard_id != _KV_SHARD:
                return inner(param, tensor, shard_id)
            if tensor.shape[0] != 2 * kv_heads * head_dim:
                raise ValueError(f"has shape {tuple(tensor.shape)}, expected {2 * kv_heads * head_dim} rows")
            per_head = tensor.reshape(kv_heads, 2, head_dim, *tensor.shape[1:])
            inner(param, per_head[:, 0].reshape(kv_heads * head_dim, *tensor.shape[1:]), 1)
            inner(param, per_head[:, 1].reshape(kv_heads * head_dim, *tensor.shape[1:]), 2)

        return load

    def map_checkpoint_name(self, name: str) -> tuple[str, int | None] | None:
        if not name.startswith("transformer."):
            if name == "lm_head.weight":
                return None if self.config.tie_word_embeddings else (name, None)
            return name, None  # reported as unexpected by the loader
        name = name[len("transformer."):]
        if "rotary_emb.inv_freq" in name:
            return None
        for old, new in _RENAMES:
            if name.startswith(old) or old.startswith("."):
                name = name.replace(old, new, 1)
        for fragment, target, shard in ((".self_attention.query.", ".self_attn.qkv_proj.", 0),
                                        (".self_attention.key_value.", ".self_attn.qkv_proj.", _KV_SHARD),
                                        (".mlp.gate_proj.", ".mlp.gate_up_proj.", 0),
                                        (".mlp.up_proj.", ".mlp.gate_up_proj.", 1)):
            if fragment in name:
                return name.replace(fragment, target), shard
        return name, None
