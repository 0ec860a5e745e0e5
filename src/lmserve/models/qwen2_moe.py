"""Qwen2-MoE family: Qwen2-57B-A14B-Instruct (`Qwen2MoeForCausalLM`).

Qwen2's attention (q/k/v biases) with a mixture-of-experts MLP (transformers'
modeling_qwen2_moe is the reference): softmax top-k routing without renormalisation in the
released checkpoint (`norm_topk_prob`), plus one shared expert scaled per token by
sigmoid(shared_expert_gate(x)). Which layers are MoE: every `decoder_sparse_step`-th, except
`mlp_only_layers` (dense, `intermediate_size` wide); the released model has every layer MoE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmserve.layers.mlp import GatedMLP
from lmserve.layers.moe import SparseMoE, map_expert_name, qwen2_moe_is_sparse
from lmserve.layers.norm import RMSNorm
from lmserve.layers.rotary import RotaryEmbedding
from lmserve.models.config import DecoderConfig
from lmserve.models.llama import DecoderAttention, PreNormDecoderLayer
from lmserve.models.qwen2 import Qwen2Config, Qwen2ForCausalLM


@dataclass
class Qwen2MoeConfig(Qwen2Config):
    num_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None,
                **overrides: Any) -> DecoderConfig:
        return super().from_hf(
            cfg, generation_config,
            num_experts=int(cfg.get("num_experts", 0)),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 1)),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size", 0)),
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
            mlp_only_layers=[int(i) for i in cfg.get("mlp_only_layers") or []], **overrides)


class Qwen2MoeDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: Qwen2MoeConfig, rotary: RotaryEmbedding, index: int):
        super().__init__()
        c = config
        self.self_attn = DecoderAttention(c, rotary)
        if qwen2_moe_is_sparse(index, c.num_experts, c.decoder_sparse_step, c.mlp_only_layers):
            self.mlp = SparseMoE(c.hidden_size, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
                                 c.hidden_act, renormalize=c.norm_topk_prob,
                                 shared_intermediate=c.shared_expert_intermediate_size,
                                 shared_name="shared_expert", shared_gate=True)
        else:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    config_class = Qwen2MoeConfig
    layer_class = Qwen2MoeDecoderLayer
    # The shared expert's gate has one output row: int4's packed layout needs 16k rows, and the
    # layer is a single vector anyway.
    dense_modules = ("shared_expert_gate",)

    def map_checkpoint_name(self, name: str):
        return map_expert_name(name) or super().map_checkpoint_name(name)
