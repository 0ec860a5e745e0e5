"""Every tensor a family's model holds, as shapes and tensor-parallel split rules, read from the
family's config (the same config object the engine builds the model from): what the capacity
planner (engine/capacity.py) counts bytes over, for any rank count, without building a model.

The split rules are tensor parallelism as vLLM and nano-vllm do it (and as issue 19 specifies):
- column-parallel layers (q/k/v, gate/up, MLA's q_b/kv_b) split their output rows by head or
  evenly; KV heads are replicated when there are fewer of them than ranks (one per rank);
- row-parallel layers (o_proj, down_proj) split their input columns; their bias is whole on
  every rank (it is added on one);
- the embedding and the LM head split the vocabulary, the last rank padded (ceil(V / ranks));
- norms, MoE routers and MLA's down-projections to the latent (q_a, kv_a) are replicated;
- MoE experts split each expert's intermediate size (every rank holds every expert's slice).

tests/engine/test_plan.py proves the inventory against the parameters of each family's real model
(built with dummy weights), so a family that changes its layers must change this too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from lmserve.attention.spec import KVCacheSpec, KVSpec, MLAKVCacheSpec
from lmserve.layers.moe import deepseek_is_sparse, qwen2_moe_is_sparse
from lmserve.layers.rotary import rope_context_length
from lmserve.models.config import DecoderConfig

# How tensor parallelism splits a run of output rows.
REPLICATED = "replicated"
HEADS = "heads"  # by attention head (units of `unit` rows); ranks must divide the heads
KV_HEADS = "kv_heads"  # by KV head, one per rank when fewer heads than ranks
EVEN = "even"  # evenly (an MLP's intermediate size); ranks must divide it
VOCAB = "vocab"  # vocabulary rows, the last rank padded

# Which weight-only methods convert a tensor. lmserve's int8/int4 convert its `Linear` layers
# and MoE experts but the LM head and a family's dense modules (layers/quantization/); an fp8
# checkpoint (as vLLM serves them) also holds those dense modules in fp8.
LINEAR = frozenset({"int8", "int4", "fp8"})
FP8_ONLY = frozenset({"fp8"})
NEVER: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Rows:
    """A run of a tensor's output rows (a packed layer has one per shard: q, k, v)."""

    size: int
    split: str = REPLICATED
    unit: int = 1  # rows per indivisible unit (a head's head_dim)

    def per_rank(self, ranks: int) -> int:
        units = self.size // self.unit
        if self.split == REPLICATED or ranks == 1:
            return self.size
        if self.split == VOCAB:
            return math.ceil(self.size / ranks)
        if self.split == KV_HEADS:
            return max(1, units // ranks) * self.unit
        return units // ranks * self.unit  # HEADS, EVEN: divisibility is checked by `invalid_reason`

    def invalid_reason(self, ranks: int, what: str) -> str | None:
        units = self.size // self.unit
        if self.split in (HEADS, EVEN) and units % ranks:
            kind = "attention heads" if self.split == HEADS else "rows"
            return f"{ranks} ranks do not divide the {units} {kind} of {what}"
        if self.split == KV_HEADS and units % ranks and ranks % units:
            return f"{units} KV heads neither split over nor replicate evenly onto {ranks} ranks"
        return None


@dataclass(frozen=True)
class Tensor:
    """`count` tensors alike (one per layer), each `experts` x rows x cols (cols 0: a vector)."""

    group: str  # the line of the per-rank breakdown it is counted under
    name: str  # the parameter, as the model names it
    rows: tuple[Rows, ...]
    cols: int = 0
    row_parallel: bool = False  # the input columns split over ranks
    count: int = 1
    experts: int = 1
    quantized_by: frozenset[str] = NEVER

    def shape_per_rank(self, ranks: int) -> tuple[int, int]:
        rows = sum(r.per_rank(ranks) for r in self.rows)
        return rows, (self.cols // ranks if self.row_parallel and ranks > 1 else self.cols)

    def invalid_reason(self, ranks: int) -> str | None:
        for run in self.rows:
            reason = run.invalid_reason(ranks, self.name)
            if reason:
                return reason
        if self.row_parallel and self.cols % ranks:
            return f"{ranks} ranks do not divide the {self.cols} input columns of {self.name}"
        return None


@dataclass(frozen=True)
class Inventory:
    """What a model holds: its tensors, its KV cache per layer, its rope table, and what a
    layer's forward keeps alive per token (for the activation estimate)."""

    architecture: str
    hidden_size: int
    vocab_size: int
    num_heads: int
    context_length: int
    tensors: list[Tensor]
    kv_specs: Callable[[int], list[KVSpec]]  # ranks -> one rank's specs, one per layer
    rope_table: tuple[int, int, bool]  # (positions, values per position, kept in float32)
    peak_width: Callable[[int], int]  # ranks -> values per token a layer holds at its widest
    notes: list[str] = field(default_factory=list)

    def invalid_reason(self, ranks: int) -> str | None:
        if self.num_heads % ranks:
            return f"{ranks} ranks do not divide the {self.num_heads} attention heads"
        for tensor in self.tensors:
            reason = tensor.invalid_reason(ranks)
            if reason:
                return reason
        return None

    def num_parameters(self) -> int:
        return sum(t.count * t.experts * max(t.cols, 1) * sum(r.size for r in t.rows) for t in self.tensors)


def _linear(group: str, name: str, rows: tuple[Rows, ...] | Rows, cols: int, count: int, bias: bool = False,
            row_parallel: bool = False, quantized_by: frozenset[str] = LINEAR) -> list[Tensor]:
    rows = rows if isinstance(rows, tuple) else (rows,)
    out = [Tensor(group, f"{name}.weight", rows, cols, row_parallel, count, quantized_by=quantized_by)]
    if bias:
        # A column-parallel bias splits with its rows; a row-parallel one is whole on every rank.
        bias_rows = (Rows(sum(r.size for r in rows)),) if row_parallel else rows
        out.append(Tensor(group, f"{name}.bias", bias_rows, count=count))
    return out


def _gated_mlp(group: str, name: str, hidden: int, intermediate: int, count: int, bias: bool = False,
               down_bias: bool | None = None, quantized_by: frozenset[str] = LINEAR) -> list[Tensor]:
    down_bias = bias if down_bias is None else down_bias
    return (_linear(group, f"{name}.gate_up_proj", (Rows(intermediate, EVEN), Rows(intermediate, EVEN)), hidden,
                    count, bias, quantized_by=quantized_by)
            + _linear(group, f"{name}.down_proj", Rows(hidden), intermediate, count, down_bias, row_parallel=True,
                      quantized_by=quantized_by))


def _norms(name: str, dim: int, count: int, group: str = "norms") -> Tensor:
    return Tensor(group, name, (Rows(dim),), count=count)


def _embeddings(c: DecoderConfig) -> list[Tensor]:
    return [Tensor("embedding", "embed_tokens.weight", (Rows(c.vocab_size, VOCAB),), c.hidden_size)]


def _head(c: DecoderConfig) -> list[Tensor]:
    """The final norm and the LM head (none of its own when tied to the embedding)."""
    out = [_norms("norm.weight", c.hidden_size, 1)]
    if not c.tie_word_embeddings:
        out.append(Tensor("lm_head", "lm_head.weight", (Rows(c.vocab_size, VOCAB),), c.hidden_size))
    return out


def _heads(c: DecoderConfig) -> tuple[Rows, Rows, Rows]:
    return (Rows(c.num_heads * c.head_dim, HEADS, c.head_dim), Rows(c.num_kv_heads * c.head_dim, KV_HEADS, c.head_dim),
            Rows(c.num_kv_heads * c.head_dim, KV_HEADS, c.head_dim))


def _attention(c: DecoderConfig, count: int) -> list[Tensor]:
    return (_linear("attention", "self_attn.qkv_proj", _heads(c), c.hidden_size, count, c.qkv_bias)
            + _linear("attention", "self_attn.o_proj", Rows(c.hidden_size), c.num_heads * c.head_dim, count,
                      c.o_bias, row_parallel=True))


def _gqa_specs(c: DecoderConfig, windows: list[int | None]):
    def specs(ranks: int) -> list[KVCacheSpec]:
        kv_heads = Rows(c.num_kv_heads, KV_HEADS).per_rank(ranks)
        return [KVCacheSpec(kv_heads, c.head_dim, window) for window in windows]
    return specs


# What a layer keeps alive per token, in values of the compute dtype (the activation estimate of
# engine/capacity.py). Measured on an H200 for the Llama-3.1-8B shape: 63,629 values per token
# against the 63,488 + 128 of `_gqa_width` (docs/capacity_planning.md).

def _gqa_width(c: DecoderConfig, mlp_intermediate: int):
    """A dense decoder layer at its widest, per token. Attention: the layer's input (held by
    the caller), its normed copy and output (3 x hidden), q/k/v, the rotated q/k and the
    attention output. MLP: the input, attention's output, their sum and its norm (4 x hidden),
    gate/up, the gated product and the down projection's output (hidden). Plus the rope lookup."""
    def width(ranks: int) -> int:
        q, k, _ = (r.per_rank(ranks) for r in _heads(c))
        h = c.hidden_size
        attention = 3 * h + (q + 2 * k) + (q + k) + q
        mlp = 5 * h + 3 * mlp_intermediate // ranks
        return max(attention, mlp) + c.head_dim
    return width


def decoder_inventory(c: DecoderConfig) -> Inventory:
    """Llama-shaped families: Llama/Yi, Qwen2, Gemma-2, GLM/ChatGLM, InternLM2, TeleChat2."""
    layers = c.num_layers
    norms_per_layer = 4 if hasattr(c, "query_pre_attn_scalar") else 2  # Gemma-2's sandwich norms
    down_bias = True if hasattr(c, "base_seqlen") else None  # TeleChat2: a bias on down_proj only
    tensors = (_embeddings(c) + _attention(c, layers)
               + _gated_mlp("mlp", "mlp", c.hidden_size, c.intermediate_size, layers, c.mlp_bias, down_bias)
               + [_norms("layer norms", c.hidden_size, norms_per_layer * layers)] + _head(c))
    layer_types = getattr(c, "layer_types", None)
    windows = [getattr(c, "sliding_window", None) if layer_types and layer_types[i] == "sliding_attention" else None
               for i in range(layers)]
    rotary = int(c.head_dim * getattr(c, "partial_rotary_factor", 1.0))
    return Inventory(c.architecture, c.hidden_size, c.vocab_size, c.num_heads,
                     rope_context_length(c.max_position_embeddings, c.rope_scaling), tensors, _gqa_specs(c, windows),
                     (rope_context_length(c.max_position_embeddings, c.rope_scaling), rotary, False),
                     _gqa_width(c, c.intermediate_size))


def qwen2_moe_inventory(c) -> Inventory:
    sparse = [qwen2_moe_is_sparse(i, c.num_experts, c.decoder_sparse_step, c.mlp_only_layers)
              for i in range(c.num_layers)]
    moe, dense = sum(sparse), c.num_layers - sum(sparse)
    tensors = (_embeddings(c) + _attention(c, c.num_layers)
               + _gated_mlp("mlp", "mlp", c.hidden_size, c.intermediate_size, dense)
               + _experts(c.hidden_size, c.num_experts, c.moe_intermediate_size, moe)
               + _gated_mlp("shared experts", "mlp.shared_expert", c.hidden_size, c.shared_expert_intermediate_size,
                            moe)
               + [Tensor("moe router", "mlp.shared_expert_gate.weight", (Rows(1),), c.hidden_size, count=moe),
                  _norms("layer norms", c.hidden_size, 2 * c.num_layers)] + _head(c))
    tensors = [t for t in tensors if t.count]
    base = decoder_inventory(c)
    dense_width = _gqa_width(c, c.intermediate_size if dense else 0)
    return Inventory(c.architecture, c.hidden_size, c.vocab_size, c.num_heads, base.context_length, tensors,
                     base.kv_specs, base.rope_table,
                     _moe_width(c.hidden_size, c.num_experts_per_tok, c.num_experts, c.shared_expert_intermediate_size,
                                dense_width))


def _experts(hidden: int, num_experts: int, intermediate: int, count: int) -> list[Tensor]:
    return [Tensor("moe router", "mlp.gate.weight", (Rows(num_experts),), hidden, count=count),
            Tensor("moe experts", "mlp.experts.gate_up_proj", (Rows(intermediate, EVEN), Rows(intermediate, EVEN)),
                   hidden, count=count, experts=num_experts, quantized_by=LINEAR),
            Tensor("moe experts", "mlp.experts.down_proj", (Rows(hidden),), intermediate, row_parallel=True,
                   count=count, experts=num_experts, quantized_by=LINEAR)]


def _moe_width(hidden: int, top_k: int, num_experts: int, shared_intermediate: int, other_width):
    """An MoE layer at its widest, per token: as a dense MLP's 4 x hidden, plus the experts'
    summed output (hidden), plus the larger of two phases that run one after the other: the
    routed experts (the router's float32 logits and the token copies gathered for them, top_k x
    hidden; an expert's own intermediate tensors hold only its tokens) and the shared experts
    (gate/up, product and output at the rank's share). Measured on an H200 for the
    Qwen2-57B-A14B shape: 83,124 values per token against the rule's 82,944 + 128."""
    def width(ranks: int) -> int:
        routed = 2 * num_experts + top_k * hidden
        shared = 3 * shared_intermediate // ranks + hidden if shared_intermediate else 0
        return max(5 * hidden + max(routed, shared), other_width(ranks))
    return width


def deepseek_v2_inventory(c) -> Inventory:
    layers, heads = c.num_layers, c.num_heads
    qk_head = c.qk_nope_head_dim + c.qk_rope_head_dim
    sparse = [deepseek_is_sparse(i, c.n_routed_experts, c.first_k_dense_replace, c.moe_layer_freq)
              for i in range(layers)]
    moe, dense = sum(sparse), layers - sum(sparse)
    bias = c.qkv_bias
    attention = []
    if c.q_lora_rank is None:
        attention += _linear("attention", "self_attn.q_proj", Rows(heads * qk_head, HEADS, qk_head), c.hidden_size,
                             layers)
    else:
        attention += (_linear("attention", "self_attn.q_a_proj", Rows(c.q_lora_rank), c.hidden_size, layers, bias)
                      + [_norms("self_attn.q_a_layernorm.weight", c.q_lora_rank, layers, "attention")]
                      + _linear("attention", "self_attn.q_b_proj", Rows(heads * qk_head, HEADS, qk_head),
                                c.q_lora_rank, layers))
    kv_head = c.qk_nope_head_dim + c.v_head_dim
    attention += (_linear("attention", "self_attn.kv_a_proj_with_mqa", Rows(c.kv_lora_rank + c.qk_rope_head_dim),
                          c.hidden_size, layers, bias)
                  + [_norms("self_attn.kv_a_layernorm.weight", c.kv_lora_rank, layers, "attention")]
                  + _linear("attention", "self_attn.kv_b_proj", Rows(heads * kv_head, HEADS, kv_head), c.kv_lora_rank,
                            layers, quantized_by=FP8_ONLY)  # a dense module of lmserve's int8/int4
                  + _linear("attention", "self_attn.o_proj", Rows(c.hidden_size), heads * c.v_head_dim, layers, bias,
                            row_parallel=True))
    shared = c.moe_intermediate_size * c.n_shared_experts
    tensors = (_embeddings(c) + attention
               + _gated_mlp("mlp", "mlp", c.hidden_size, c.intermediate_size, dense, c.mlp_bias)
               + (_experts(c.hidden_size, c.n_routed_experts, c.moe_intermediate_size, moe) if moe else [])
               + (_gated_mlp("shared experts", "mlp.shared_experts", c.hidden_size, shared, moe) if shared else [])
               + [_norms("layer norms", c.hidden_size, 2 * layers)] + _head(c))
    tensors = [t for t in tensors if t.count]

    def specs(ranks: int) -> list[MLAKVCacheSpec]:
        # The latent is every head's: each rank caches all of it (vLLM does the same).
        return [MLAKVCacheSpec(c.kv_lora_rank, c.qk_rope_head_dim) for _ in range(layers)]

    def attention_width(ranks: int) -> int:
        # The input, its norm and the output (3 x hidden), the latent entry twice (projected,
        # normed), the queries twice (projected, rope applied), and what a prefill expands the
        # latent to: per head k_nope and v, the full keys, and the output. Not measured on a GPU
        # (DeepSeek-V2-Lite's dense first layer is wider: its measured peak checks that one).
        per_rank = heads // ranks
        entry = c.kv_lora_rank + c.qk_rope_head_dim
        return (3 * c.hidden_size + 2 * entry + per_rank * (2 * qk_head + kv_head + qk_head + c.v_head_dim)
                + 2 * c.qk_rope_head_dim)  # the float32 rope lookup

    def dense_width(ranks: int) -> int:
        return max(attention_width(ranks), 5 * c.hidden_size + (3 * c.intermediate_size // ranks if dense else 0))

    context = rope_context_length(c.max_position_embeddings, c.rope_scaling)
    return Inventory(c.architecture, c.hidden_size, c.vocab_size, heads, context, tensors, specs,
                     (context, c.qk_rope_head_dim, True),  # the MLA rope table stays float32
                     _moe_width(c.hidden_size, c.num_experts_per_tok, c.n_routed_experts, shared, dense_width)
                     if moe else dense_width)


def inventory(config) -> Inventory:
    """The inventory of a model config read by its family (models/loader.read_config)."""
    if hasattr(config, "kv_lora_rank"):
        return deepseek_v2_inventory(config)
    if hasattr(config, "num_experts") and getattr(config, "num_experts", 0):
        return qwen2_moe_inventory(config)
    if isinstance(config, DecoderConfig):
        return decoder_inventory(config)
    raise ValueError(f"no capacity inventory for {type(config).__name__} ({config.architecture})")
