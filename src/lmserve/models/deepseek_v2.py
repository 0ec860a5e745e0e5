"""DeepSeek-V2 family: DeepSeek-V2-Chat, DeepSeek-Coder-V2-Instruct, DeepSeek-V2.5, and the
V2-Lite shape (`DeepseekV2ForCausalLM`).

Reference: transformers' modeling_deepseek_v2 (and DeepSeek's remote code where it differs).
- Multi-head latent attention. Queries: q_proj, or with `q_lora_rank` set
  q_b_proj(RMSNorm(q_a_proj(x))); each head is [nope | rope]. Keys and values come from one
  latent: kv_a_proj_with_mqa(x) = [c (kv_lora_rank) | k_rope (qk_rope_head_dim)], c is
  normalized (kv_a_layernorm), and kv_b_proj(c) gives each head [k_nope | v]; k_rope is one
  key shared by every head. The paged cache keeps only [c | rotated k_rope] per token (576
  values for the released models; MLAKVCacheSpec), attention reads it back through kv_b_proj
  (attention/reference.py: absorbed for decode, expanded for prefill).
- Rope on the rope parts only, interleaved pairs (x[2i], x[2i+1]) as transformers' complex
  multiplication (the remote code de-interleaves and rotates halves: the same scores), with
  YaRN scaling; the cos/sin factor is mscale(f, mscale) / mscale(f, mscale_all_dim) and the
  softmax scale is qk_head_dim^-0.5 * mscale(f, mscale_all_dim)^2.
- The q_a/kv_a norms use eps 1e-6 whatever rms_norm_eps says (as both references do).
- DeepSeekMoE (layers/moe.py): the first `first_k_dense_replace` layers dense, then every
  `moe_layer_freq`-th layer MoE; softmax routing in fp32, greedy or group-limited greedy
  (n_group / topk_group), weights times `routed_scaling_factor` (renormalized instead when
  `norm_topk_prob`, as DeepSeek's code does; every released config has it off), plus
  `n_shared_experts` always-on experts added ungated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmserve.attention import MLAAttention
from lmserve.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear
from lmserve.layers.mlp import GatedMLP
from lmserve.layers.moe import SparseMoE, deepseek_is_sparse, map_expert_name
from lmserve.layers.norm import RMSNorm
from lmserve.layers.rotary import RotaryEmbedding, get_rope, yarn_mscale
from lmserve.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from lmserve.models.base import CausalLM
from lmserve.models.config import DecoderConfig
from lmserve.models.llama import PreNormDecoderLayer

TOPK_METHODS = ("greedy", "group_limited_greedy")
LATENT_NORM_EPS = 1e-6


@dataclass
class DeepseekV2Config(DecoderConfig):
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int | None = None
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None,
                **overrides: Any) -> DecoderConfig:
        topk_method = cfg.get("topk_method") or "greedy"
        if topk_method not in TOPK_METHODS:
            raise ValueError(f"unsupported topk_method {topk_method!r} (supported: {', '.join(TOPK_METHODS)})")
        if (cfg.get("scoring_func") or "softmax") != "softmax":
            raise ValueError(f"unsupported scoring_func {cfg['scoring_func']!r} (DeepSeek-V2 routes with softmax)")
        group_limited = topk_method == "group_limited_greedy"
        return super().from_hf(
            cfg, generation_config,
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
            qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
            v_head_dim=int(cfg["v_head_dim"]),
            n_routed_experts=cfg.get("n_routed_experts"),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 1),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
            n_shared_experts=int(cfg.get("n_shared_experts") or 0),
            first_k_dense_replace=int(cfg.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(cfg.get("moe_layer_freq") or 1),
            topk_method=topk_method,
            n_group=cfg.get("n_group") if group_limited else None,
            topk_group=cfg.get("topk_group") if group_limited else None,
            routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            **overrides)


def softmax_scale(config: DeepseekV2Config) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    scaling = config.rope_scaling
    if scaling and scaling.get("mscale_all_dim"):
        m = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
        scale = scale * m * m
    return scale


class DeepseekV2Attention(nn.Module):
    def __init__(self, config: DeepseekV2Config, rotary: RotaryEmbedding):
        super().__init__()
        c = config
        self.nope, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        qk_head_dim = self.nope + self.rope_dim
        bias = c.qkv_bias  # `attention_bias`: q_a, kv_a and o
        # Tensor parallelism splits the heads (q/q_b and kv_b column-parallel, o row-parallel);
        # the latent path (q_a, kv_a) is replicated, so every rank caches the whole latent.
        if c.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(c.hidden_size, c.num_heads * qk_head_dim)
        else:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(c.q_lora_rank, c.num_heads * qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(c.kv_lora_rank, c.num_heads * (self.nope + self.v_dim))
        self.o_proj = RowParallelLinear(c.num_heads * self.v_dim, c.hidden_size, bias=bias)
        self.num_heads = self.kv_b_proj.output_size // (self.nope + self.v_dim)  # this rank's
        self.rotary = rotary
        self.attn = MLAAttention(self.num_heads, self.nope, self.rope_dim, self.v_dim, c.kv_lora_rank,
                                 softmax_scale(c))

    def forward(self, rope, x, kv_cache, meta):
        t = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, self.num_heads, self.nope + self.rope_dim)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        # Rotate every head's rope query and the one shared rope key in one call, in fp32 as
        # transformers does (its complex multiplication upcasts; the table is kept in fp32).
        pe = torch.cat((q[..., self.nope:], k_rope.unsqueeze(1)), dim=1)
        rotated = self.rotary.apply(pe.float(), *rope).to(x.dtype)
        q = torch.cat((q[..., :self.nope], rotated[:, :self.num_heads]), dim=-1)
        entry = torch.cat((self.kv_a_layernorm(latent), rotated[:, self.num_heads]), dim=-1)
        out = self.attn(q, entry, self.kv_b_proj, kv_cache, meta)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))


class DeepseekV2DecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: DeepseekV2Config, rotary: RotaryEmbedding, index: int):
        super().__init__()
        c = config
        self.self_attn = DeepseekV2Attention(c, rotary)
        if deepseek_is_sparse(index, c.n_routed_experts, c.first_k_dense_replace, c.moe_layer_freq):
            self.mlp = SparseMoE(
                c.hidden_size, c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.hidden_act,
                renormalize=c.norm_topk_prob and c.num_experts_per_tok > 1,
                scaling_factor=c.routed_scaling_factor, num_groups=c.n_group, topk_groups=c.topk_group,
                fp32_router=True, shared_intermediate=c.moe_intermediate_size * c.n_shared_experts,
                shared_name="shared_experts")
        else:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, c.mlp_bias)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class DeepseekV2ForCausalLM(CausalLM):
    config_class = DeepseekV2Config
    # Only the MLPs' gate/up pack; the attention projections keep the checkpoint's names.
    packed_modules = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    # The absorbed MLA decode multiplies by kv_b_proj's weight directly (split per head into
    # W_UK and W_UV): it stays dense when the rest is quantized (~0.4% of V2's weights).
    dense_modules = ("kv_b_proj",)

    def __init__(self, config: DeepseekV2Config, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.rotary = get_rope(config.qk_rope_head_dim, config.max_position_embeddings, config.rope_theta,
                               config.rope_scaling, style="interleaved", dtype=torch.float32, keep_dtype=True)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeepseekV2DecoderLayer(config, self.rotary, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def map_checkpoint_name(self, name: str):
        return map_expert_name(name) or super().map_checkpoint_name(name)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(rope, x, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)
