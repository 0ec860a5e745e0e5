"""Model shapes (config.json keys) and published anchors the parts measure against."""

from __future__ import annotations

from tests.support.family_checkpoints import WAVES

PROMPTS = [p for wave in WAVES for p in wave]

# Published anchor for the same shape and workload (SGLang on one H200, request rate 16,
# 1,024 in / 1,024 out) and the targets.
SGLANG_H200_TOK_S = 5355
TARGET_ROOFLINE_FRACTION = 0.80
TARGET_THROUGHPUT = {"H200": 5000, "H100": 3500}

# Llama-3.1-8B's config.json (the keys lmserve and transformers read).
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16"}
# A MoE shape for the capacity planner's check: Qwen2-57B-A14B's config.json keys (the engine reads no others).
QWEN2_57B_A14B = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 2560,
    "shared_expert_intermediate_size": 20480, "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "max_position_embeddings": 65536, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "bos_token_id": 151643,
    "eos_token_id": 151643, "tie_word_embeddings": False}
# Smoke mode's stand-in: the same family and rope, small enough for a CPU.
TINY_SPEED_MODEL = {**LLAMA_8B, "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "bos_token_id": 1, "eos_token_id": 2}
# DeepSeek-V2-Lite's config.json (deepseek-ai/DeepSeek-V2-Lite; the keys lmserve and transformers
# read): 27 layers (the first dense), MLA without q compression, 64 routed experts (top 6) + 2
# shared, YaRN x40. ~15.7B parameters, ~2.4B active per token.
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "num_experts_per_tok": 6, "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "topk_method": "greedy", "n_group": 1,
    "topk_group": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "rms_norm_eps": 1e-6, "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 100000,
    "eos_token_id": 100001, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
