"""InternLM2 / InternLM2.5 (`InternLM2ForCausalLM`, model_type internlm2): internlm2_5-7b-chat,
internlm2_5-20b-chat.

Llama's numerics under other names (MODEL_FAMILIES.md §6, vLLM's internlm2.py). The one real
difference is `attention.wqkv`: its rows are grouped by KV head, each group holding that head's
q_per_kv query heads, then its key head, then its value head. Our packed projection is
[all q | all k | all v], so the tensor is re-ordered at load by the parameter's own loader.
Rope scaling `dynamic` (factor 2) follows the remote code: exact inside the trained window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmserve.models.config import DecoderConfig
from lmserve.models.llama import LlamaForCausalLM

_RENAMES = (
    ("tok_embeddings.", "embed_tokens."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    (".attention.wqkv.", ".self_attn.qkv_proj."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
)
_SHARDS = {".feed_forward.w1.": (".mlp.gate_up_proj.", 0), ".feed_forward.w3.": (".mlp.gate_up_proj.", 1)}


@dataclass
class InternLM2Config(DecoderConfig):
    @classmethod
    def from_hf(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None,
                **overrides: Any) -> DecoderConfig:
        bias = bool(cfg.get("bias", False))  # on wqkv and wo alike; the MLP never has one
        return super().from_hf(cfg, generation_config, qkv_bias=bias, o_bias=bias, mlp_bias=False, **overrides)


def kv_grouped_to_packed(tensor: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """wqkv rows [kv group: q_per_kv q heads, k, v] -> [all q; all k; all v] (weight or bias)."""
    rest = tensor.shape[1:]
    groups = tensor.reshape(num_kv_heads, -1, head_dim, *rest)
    q = groups[:, :-2].reshape(-1, *rest)
    k = groups[:, -2].reshape(-1, *rest)
    v = groups[:, -1].reshape(-1, *rest)
    return torch.cat([q, k, v])


class InternLM2ForCausalLM(LlamaForCausalLM):
    config_class = InternLM2Config

    def __init__(self, config: DecoderConfig, dtype: torch.dtype):
        super().__init__(config, dtype)
        for layer in self.layers:
            layer.self_attn.qkv_proj.customize_loading(self._wqkv_loader)

    def _wqkv_loader(self, inner):
        """The qkv parameter's loader (`inner`), taking InternLM2's grouped wqkv tensor."""
        c = self.config
        rows = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim

        def load(param, tensor: torch.Tensor, shard_id=None) -> None:
            if shard_id is not None or tensor.shape[0] != rows or (c.num_heads % c.num_kv_heads):
                return inner(param, tensor, shard_id)  # the shape check reports it
            inner(param, kv_grouped_to_packed(tensor, c.num_kv_heads, c.head_dim), None)

        return load

    def map_checkpoint_name(self, name: str) -> tuple[str, int | None] | None:
        if name.startswith("model."):
            name = name[len("model."):]
        if name == "output.weight":
            return None if self.config.tie_word_embeddings else ("lm_head.weight", None)
        if "rotary_emb.inv_freq" in name:
            return None
        for old, (new, shard) in _SHARDS.items():
            if old in name:
                return name.replace(old, new), shard
        for old, new in _RENAMES:
            name = name.replace(old, new)
        return name, None
