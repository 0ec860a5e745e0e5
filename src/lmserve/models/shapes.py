"""The architecture shapes of the catalog's models, as the config.json keys their checkpoints
publish, for planning capacity (`lmserve plan`) without the weights on disk.

Only what sizes memory is here (dimensions, layer counts, vocabulary, MoE and MLA ranks, rope
settings that set the context length); each dict goes through the family's own config reader,
the one the engine loads a checkpoint with. Values are the public config.json values
(../shared/MODEL_FAMILIES.md cites the sources; tests/engine/test_plan.py checks the planner's
arithmetic on three of them by hand). A checkpoint directory, when there is one, always wins.
"""

from __future__ import annotations

from typing import Any

from lmserve.models.catalog import CATALOG

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, context: int,
           rope_scaling: dict | None = None) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "intermediate_size": intermediate, "vocab_size": vocab, "max_position_embeddings": context,
            "rope_scaling": rope_scaling, "tie_word_embeddings": False}


def _qwen2(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int = 152064,
           context: int = 32768, tie: bool = False, rope_theta: float = 1e6) -> dict[str, Any]:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "intermediate_size": intermediate, "vocab_size": vocab, "max_position_embeddings": context,
            "rope_theta": rope_theta, "tie_word_embeddings": tie, "use_sliding_window": False}


def _gemma2(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
            query_pre_attn_scalar: int) -> dict[str, Any]:
    return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "intermediate_size": intermediate, "vocab_size": 256000,
            "max_position_embeddings": 8192, "sliding_window": 4096, "query_pre_attn_scalar": query_pre_attn_scalar,
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "tie_word_embeddings": True}


def _internlm2(hidden: int, layers: int, heads: int, intermediate: int) -> dict[str, Any]:
    return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 8,
            "intermediate_size": intermediate, "vocab_size": 92544, "max_position_embeddings": 32768,
            "rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False}


def _chatglm(layers: int, vocab: int, context: int, rope_ratio: float = 1.0) -> dict[str, Any]:
    return {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "hidden_size": 4096, "num_layers": layers,
            "num_attention_heads": 32, "multi_query_attention": True, "multi_query_group_num": 2,
            "kv_channels": 128, "ffn_hidden_size": 13696, "padded_vocab_size": vocab, "seq_length": context,
            "rope_ratio": rope_ratio, "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True,
            "post_layer_norm": True, "apply_residual_connection_post_layernorm": False}


def _deepseek_v2(mscale: float) -> dict[str, Any]:
    return {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 5120,
            "num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128,
            "intermediate_size": 12288, "vocab_size": 102400, "q_lora_rank": 1536, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 160,
            "num_experts_per_tok": 6, "n_shared_experts": 2, "moe_intermediate_size": 1536,
            "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "group_limited_greedy", "n_group": 8,
            "topk_group": 3, "norm_topk_prob": False, "routed_scaling_factor": 16.0, "scoring_func": "softmax",
            "max_position_embeddings": 163840, "rope_theta": 10000,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                             "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale},
            "tie_word_embeddings": False}


_QWEN25_72B = _qwen2(8192, 80, 64, 8, 29568)
_QWEN25_7B = _qwen2(3584, 28, 28, 4, 18944)

SHAPES: dict[str, dict[str, Any]] = {
    "deepseek-ai/DeepSeek-V2-Chat": _deepseek_v2(0.707),
    "deepseek-ai/DeepSeek-Coder-V2-Instruct": _deepseek_v2(1.0),
    "deepseek-ai/DeepSeek-V2.5": _deepseek_v2(1.0),
    "Qwen/Qwen2.5-72B-Instruct-128K": {**_QWEN25_72B, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    "Qwen/Qwen2.5-72B-Instruct": _QWEN25_72B,
    "Qwen/Qwen2.5-32B-Instruct": _qwen2(5120, 64, 40, 8, 27648),
    "Qwen/Qwen2.5-14B-Instruct": _qwen2(5120, 48, 40, 8, 13824),
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "Qwen/Qwen2.5-Math-72B-Instruct": {**_QWEN25_72B, "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "Qwen/Qwen2.5-Coder-7B-Instruct": _QWEN25_7B,
    "Qwen/Qwen2-72B-Instruct": _qwen2(8192, 80, 64, 8, 29568),
    "Qwen/Qwen2-7B-Instruct": _qwen2(3584, 28, 28, 4, 18944),
    "Qwen/Qwen2-1.5B-Instruct": _qwen2(1536, 28, 12, 2, 8960, vocab=151936, tie=True),
    "Qwen/Qwen2-57B-A14B-Instruct": {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 3584,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
        "vocab_size": 151936, "num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 2560,
        "shared_expert_intermediate_size": 20480, "norm_topk_prob": False, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "max_position_embeddings": 65536, "rope_theta": 1e6, "tie_word_embeddings": False},
    "01-ai/Yi-1.5-34B-Chat-16K": _llama(7168, 60, 56, 8, 20480, 64000, 16384),
    "01-ai/Yi-1.5-9B-Chat-16K": _llama(4096, 48, 32, 4, 11008, 64000, 16384),
    "01-ai/Yi-1.5-6B-Chat": _llama(4096, 32, 32, 4, 11008, 64000, 4096),
    "THUDM/chatglm3-6b": _chatglm(28, 65024, 8192),
    "THUDM/glm-4-9b-chat": _chatglm(40, 151552, 131072, rope_ratio=500),
    "internlm/internlm2_5-7b-chat": _internlm2(4096, 32, 32, 14336),
    "internlm/internlm2_5-20b-chat": _internlm2(6144, 48, 48, 16384),
    "meta-llama/Meta-Llama-3.1-405B-Instruct": _llama(16384, 126, 128, 8, 53248, 128256, 131072, _LLAMA31_ROPE),
    "meta-llama/Meta-Llama-3.1-70B-Instruct": _llama(8192, 80, 64, 8, 28672, 128256, 131072, _LLAMA31_ROPE),
    "meta-llama/Meta-Llama-3.1-8B-Instruct": _llama(4096, 32, 32, 8, 14336, 128256, 131072, _LLAMA31_ROPE),
    "meta-llama/Meta-Llama-3-8B-Instruct": _llama(4096, 32, 32, 8, 14336, 128256, 8192),
    "meta-llama/Meta-Llama-3-70B-Instruct": _llama(8192, 80, 64, 8, 28672, 128256, 8192),
    "google/gemma-2-27b-it": _gemma2(4608, 46, 32, 16, 128, 36864, 144),
    "google/gemma-2-9b-it": _gemma2(3584, 42, 16, 8, 256, 14336, 256),
}

# Catalog ids that name no single shape.
NO_SHAPE = {"TeleAI/TeleChat2": "it covers every TeleChat2 size (3B/7B/35B/115B); pass the directory of the "
                                "checkpoint you serve (its config.json)"}


def catalog_shape(model_id: str) -> dict[str, Any] | None:
    """The config.json keys of a catalog id (a Pro/ or Vendor-A/ id: its weights' id), or None."""
    entry = CATALOG.get(model_id)
    base = (entry.weights_id or entry.id) if entry else model_id
    if base in NO_SHAPE:
        raise ValueError(f"{model_id!r} has no one shape: {NO_SHAPE[base]}")
    shape = SHAPES.get(base)
    return dict(shape) if shape is not None else None
