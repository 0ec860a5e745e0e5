"""`lmserve plan` (cli/plan.py, engine/capacity.py, models/inventory.py): its numbers for three
catalog models against arithmetic written out here by hand from their public shapes, and its
prediction against what a dummy-weight engine of every family really holds on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmserve.cli import main
from lmserve.engine import capacity
from lmserve.engine.llm_engine import LLMEngine
from lmserve.models.inventory import inventory

GiB = 1 << 30
MiB = 1 << 20


def plan_json(capsys, *args: str) -> tuple[int, dict]:
    rc = main(["plan", *args, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def candidate(result: dict, tp: int) -> dict:
    return next(c for c in result["candidates"] if c["tensor_parallel_size"] == tp)


# ---- catalog models, by hand -----------------------------------------------------------------

def test_qwen25_72b_on_8x80gib_bf16_by_hand(capsys):
    rc, out = plan_json(capsys, "Qwen/Qwen2.5-72B-Instruct", "--gpus", "8", "--gpu-memory", "80GiB")
    assert rc == 0 and out["fits"] and out["tensor_parallel_size"] == 4
    assert out["options"]["max_model_len"] == 32768
    tp4 = candidate(out, 4)
    # Qwen2.5-72B: hidden 8192, 80 layers, 64 heads / 8 KV heads of 128, intermediate 29568,
    # vocab 152064, q/k/v biases, untied. At TP=4 a rank holds 16 query heads (2048 rows), 2 KV
    # heads (256 rows each), a quarter of the intermediate (7392) and of the vocabulary (38016).
    layer = (2048 + 256 + 256) * 8192 + (2048 + 256 + 256)  # qkv weight + bias
    layer += 8192 * 2048  # o_proj (row-parallel, no bias)
    layer += 2 * 7392 * 8192 + 8192 * 7392  # gate_up + down
    layer += 2 * 8192  # two norms
    weights = 2 * (80 * layer + 2 * 38016 * 8192 + 8192)  # bf16; embedding, LM head, final norm
    assert tp4["weight_bytes"] == weights == 36_355_080_192
    assert tp4["weight_bytes_by_group"]["embedding"] == tp4["weight_bytes_by_group"]["lm_head"] == 2 * 38016 * 8192
    # KV: 80 layers x 2 KV heads x 128 x (K + V) x 2 bytes.
    assert tp4["kv_bytes_per_token"] == 80 * 2 * 128 * 2 * 2 == 81920
    assert candidate(out, 1)["kv_bytes_per_token"] == 4 * 81920 and candidate(out, 8)["kv_bytes_per_token"] == 40960
    # The cache: 0.9 x 80 GiB less weights, rope table (32768 x 128 bf16), the activation
    # estimate (the sampler's 256 rows x 152064 x 56 bytes outweighs 2048 tokens through a layer)
    # and the overhead (800 MiB + 512 MiB NCCL).
    rope = 32768 * 128 * 2
    activation = 256 * 152064 * 56
    assert 2048 * (max(3 * 8192 + 2560 + 2304 + 2048, 5 * 8192 + 3 * 7392) + 128) * 2 < activation
    assert tp4["activation_bytes"] == activation
    kv_cache = int(80 * GiB * 0.9) - (weights + rope + activation + 800 * MiB + 512 * MiB)
    assert tp4["kv_cache_bytes"] == kv_cache
    blocks = kv_cache // (16 * 81920)
    assert tp4["kv_cache_tokens"] == blocks * 16 and tp4["full_context_requests"] == blocks // (32768 // 16)
    # TP 1 and 2 do not: 135 GiB of weights > 72 GiB, and at TP=2 no room for one 32K request.
    assert not candidate(out, 1)["fits"] and "weights need" in candidate(out, 1)["why_not"]
    assert not candidate(out, 2)["fits"] and "less than one 32768-token request" in candidate(out, 2)["why_not"]
    assert candidate(out, 3) == {"tensor_parallel_size": 3, "valid": False,
                                 "invalid": "3 ranks do not divide the 64 attention heads"}


def test_qwen25_72b_fp8_weights_by_hand(capsys):
    rc, out = plan_json(capsys, "Qwen/Qwen2.5-72B-Instruct", "--gpus", "8", "--gpu-memory", "80GiB",
                        "--quantization", "fp8", "-tp", "2")
    assert rc == 0 and out["tensor_parallel_size"] == 2
    assert [c["tensor_parallel_size"] for c in out["candidates"]] == [2]
    # fp8: every linear weight 1 byte + a float32 scale per output row; biases, norms, the
    # embedding and the LM head stay bf16. TP=2: 32 heads (4096 rows), 4 KV heads (512 rows each).
    qkv_rows, inter = 4096 + 1024, 29568 // 2
    linear = [(qkv_rows, 8192), (8192, 4096), (2 * inter, 8192), (8192, inter)]
    layer = sum(r * c + 4 * r for r, c in linear) + 2 * (qkv_rows + 2 * 8192)
    weights = 80 * layer + 2 * (2 * 76032 * 8192 + 8192)
    assert candidate(out, 2)["weight_bytes"] == weights
    assert any("no fp8 weights" in n for n in out["notes"])


def test_llama_405b_bf16_on_one_node_does_not_fit_and_says_why(capsys):
    rc = main(["plan", "meta-llama/Meta-Llama-3.1-405B-Instruct", "--gpus", "8", "--gpu-memory", "80GiB"])
    text = capsys.readouterr().out
    assert rc == 1
    # TP=8: 16 of 128 query heads (2048 rows), 1 of 8 KV heads (128 rows each), 53248 / 8 = 6656
    # intermediate rows, 128256 / 8 = 16032 vocabulary rows; hidden 16384, 126 layers, no biases.
    layer = (2048 + 2 * 128) * 16384 + 16384 * 2048 + 3 * 6656 * 16384 + 2 * 16384
    weights = 2 * (126 * layer + 2 * 16032 * 16384 + 16384)
    assert weights == 101_470_601_216  # 94.50 GiB
    assert (f"Nothing fits: at TP=8 (the most ranks these GPUs allow for this model), the weights need "
            f"{weights / GiB:.2f} GiB per rank > 72.00 GiB available (0.9 x 80.00 GiB).") in text


def test_llama_405b_on_two_nodes_and_in_fp8(capsys):
    rc, out = plan_json(capsys, "meta-llama/Meta-Llama-3.1-405B-Instruct", "--gpus", "8", "--gpu-memory", "80GiB",
                        "--nnodes", "2")
    assert rc == 0 and out["tensor_parallel_size"] == 16
    tp16 = candidate(out, 16)
    # TP=16 > 8 KV heads: each rank holds one KV head (replicated over 2 ranks), 8 query heads.
    layer = (1024 + 2 * 128) * 16384 + 16384 * 1024 + 3 * 3328 * 16384 + 2 * 16384
    assert tp16["weight_bytes"] == 2 * (126 * layer + 2 * 8016 * 16384 + 16384)
    assert tp16["kv_bytes_per_token"] == 126 * 1 * 128 * 2 * 2 == candidate(out, 8)["kv_bytes_per_token"]
    assert candidate(out, 12)["invalid"] == "TP 12 spans nodes but is not a whole number of 8-GPU nodes"
    # fp8 weights on one node: 1 byte per weight (+ row scales) brings TP=8 to ~48 GiB per rank.
    rc, fp8 = plan_json(capsys, "meta-llama/Meta-Llama-3.1-405B-Instruct", "--gpus", "8", "--gpu-memory", "80GiB",
                        "--quantization", "fp8")
    assert rc == 0 and fp8["tensor_parallel_size"] == 8
    linear = [(2048 + 256, 16384), (16384, 2048), (2 * 6656, 16384), (16384, 6656)]
    layer = sum(r * c + 4 * r for r, c in linear) + 2 * 2 * 16384
    assert candidate(fp8, 8)["weight_bytes"] == 126 * layer + 2 * (2 * 16032 * 16384 + 16384)


def test_deepseek_v2_chat_mla_and_experts_by_hand(capsys):
    rc, out = plan_json(capsys, "deepseek-ai/DeepSeek-V2-Chat", "--gpus", "8", "--gpu-memory", "80GiB")
    assert rc == 0 and out["tensor_parallel_size"] == 8
    assert out["options"]["max_model_len"] == 131072  # the catalog's context, not the config's 163840
    tp8 = candidate(out, 8)
    # MLA: q_a (1536 x 5120) and kv_a (576 x 5120) and their norms replicated; q_b (128 heads x 192
    # over 1536), kv_b (128 heads x 256 over 512) split by head: 16 heads per rank; o_proj row-split.
    attention = 1536 * 5120 + 1536 + 16 * 192 * 1536 + 576 * 5120 + 512 + 16 * 256 * 512 + 5120 * 16 * 128
    dense_mlp = 2 * 1536 * 5120 + 5120 * 1536  # layer 0: intermediate 12288 / 8
    # Layers 1-59: router 160 x 5120 (replicated); 160 experts of 1536 / 8 = 192; two shared
    # experts as one MLP of 3072 / 8 = 384.
    moe = 160 * 5120 + 160 * (2 * 192 * 5120 + 5120 * 192) + 2 * 384 * 5120 + 5120 * 384
    params = 60 * (attention + 2 * 5120) + dense_mlp + 59 * moe + 2 * 12800 * 5120 + 5120
    assert tp8["weight_bytes"] == 2 * params
    assert tp8["weight_bytes_by_group"]["moe experts"] == 2 * 59 * 160 * 3 * 192 * 5120
    # The latent cache is every rank's whole: 60 layers x (512 + 64) x 2 bytes, at every TP size.
    assert tp8["kv_bytes_per_token"] == 60 * 576 * 2 == candidate(out, 1)["kv_bytes_per_token"] == 69120
    assert out["parameters"] == pytest.approx(235.7e9, rel=1e-3)


def test_json_shape(capsys):
    rc, out = plan_json(capsys, "Qwen/Qwen2.5-7B-Instruct", "--gpus", "2", "--gpu-memory", "24GiB",
                        "--max-model-len", "8192", "--kv-cache-dtype", "fp8")
    assert rc == 0
    assert set(out) == {"model", "source", "architecture", "parameters", "hardware", "options", "candidates",
                        "tensor_parallel_size", "fits", "reason", "notes"}
    assert out["hardware"] == {"gpus_per_node": 2, "nnodes": 1, "gpu_memory_bytes": 24 * GiB}
    assert out["options"]["kv_cache_dtype"] == "fp8" and out["options"]["max_model_len"] == 8192
    one = candidate(out, 1)
    assert set(one) == {"tensor_parallel_size", "valid", "weight_bytes", "weight_bytes_by_group", "rope_table_bytes",
                        "activation_bytes", "overhead_bytes", "usable_bytes", "kv_bytes_per_token", "kv_cache_bytes",
                        "kv_cache_blocks", "kv_cache_tokens", "full_context_requests", "fits", "why_not"}
    assert one["kv_bytes_per_token"] == 28 * 4 * 128 * 2 * 1  # fp8: 1 byte per value
    assert one["weight_bytes"] == sum(one["weight_bytes_by_group"].values())
    assert out["tensor_parallel_size"] == 1 and out["reason"] is None


def test_a_checkpoint_directory_is_read_by_its_family(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(FAMILY_CONFIGS["chatglm"]))
    rc, out = plan_json(capsys, str(tmp_path), "--gpus", "1", "--gpu-memory", "4GiB")
    assert rc == 0 and out["source"] == str(tmp_path) and out["architecture"] == "ChatGLMModel"
    assert out["options"]["max_model_len"] == 512  # its seq_length
    # 3 layers x 2 KV heads (multi_query_group_num) x kv_channels 24 x (K + V) x 2 bytes.
    assert candidate(out, 1)["kv_bytes_per_token"] == 3 * 2 * 24 * 2 * 2


def test_bad_inputs_answer_in_one_line(capsys):
    assert main(["plan", "no/such-model", "--gpus", "8", "--gpu-memory", "80GiB"]) == 2
    assert "neither a checkpoint directory nor a catalog model id" in capsys.readouterr().err
    assert main(["plan", "TeleAI/TeleChat2", "--gpus", "8", "--gpu-memory", "80GiB"]) == 2
    assert "pass the directory of the checkpoint" in capsys.readouterr().err
    rc, out = plan_json(capsys, "meta-llama/Meta-Llama-3.1-70B-Instruct", "--gpus", "8", "--gpu-memory", "80GiB",
                        "-tp", "16")
    assert rc == 1 and out["reason"] == "TP 16 needs more than the 8 GPUs of 1 node(s) x 8"
    with pytest.raises(SystemExit):
        main(["plan", "Qwen/Qwen2.5-7B-Instruct", "--gpus", "8", "--gpu-memory", "lots"])


# ---- against the engine ----------------------------------------------------------------------

BASE = {"vocab_size": 333, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "max_position_embeddings": 256, "bos_token_id": 1,
        "eos_token_id": 2}
FAMILY_CONFIGS = {
    "llama": {**BASE, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": True,
              "mlp_bias": True, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "qwen2-tied": {**BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True,
                   "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    "gemma2": {**BASE, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "head_dim": 24,
               "num_hidden_layers": 4, "sliding_window": 8, "query_pre_attn_scalar": 18},
    "glm-hf": {**BASE, "architectures": ["GlmForCausalLM"], "model_type": "glm", "head_dim": 24,
               "attention_bias": True, "partial_rotary_factor": 0.5, "rope_theta": 20000.0},
    "chatglm": {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": 3, "hidden_size": 64,
                "num_attention_heads": 4, "multi_query_attention": True, "multi_query_group_num": 2,
                "kv_channels": 24, "ffn_hidden_size": 96, "padded_vocab_size": 320, "seq_length": 512,
                "add_qkv_bias": True, "add_bias_linear": False, "eos_token_id": [2, 5]},
    "internlm2": {**BASE, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": True,
                  "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    "telechat2": {"architectures": ["TeleChat2ForCausalLM"], "model_type": "telechat", "hidden_size": 96,
                  "n_layer": 3, "n_head": 4, "num_key_value_heads": 2, "ffn_hidden_size": 160, "vocab_size": 320,
                  "training_seqlen": 64, "base_seqlen": 64, "max_position_embeddings": 256, "eos_token_id": 2},
    "qwen2-moe": {**BASE, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_experts": 8,
                  "num_experts_per_tok": 3, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
                  "decoder_sparse_step": 1, "mlp_only_layers": [1]},
    "deepseek-v2": {**BASE, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                    "num_key_value_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 20, "qk_nope_head_dim": 12,
                    "qk_rope_head_dim": 8, "v_head_dim": 10, "n_routed_experts": 8, "num_experts_per_tok": 3,
                    "moe_intermediate_size": 24, "n_shared_experts": 2, "first_k_dense_replace": 1,
                    "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                     "mscale": 0.9, "mscale_all_dim": 0.7}},
    "deepseek-v2-lite": {**BASE, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                         "num_key_value_heads": 4, "q_lora_rank": None, "kv_lora_rank": 20, "qk_nope_head_dim": 12,
                         "qk_rope_head_dim": 8, "v_head_dim": 12, "n_routed_experts": 8, "num_experts_per_tok": 2,
                         "moe_intermediate_size": 24, "n_shared_experts": 1, "first_k_dense_replace": 1},
}
KV_CACHE_MEMORY = 3 * MiB + 12345  # not a whole number of blocks


def dummy_engine(tmp_path, config: dict, **options) -> LLMEngine:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return LLMEngine(str(tmp_path), dtype="bfloat16", device="cpu", load_format="dummy",
                     kv_cache_memory=KV_CACHE_MEMORY, **options)


def held_bytes(engine: LLMEngine) -> int:
    """Every weight the model holds: its parameters, and the quantized layers' stored tensors
    (which are attributes, not parameters)."""
    total = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    for module in engine.model.modules():
        for name in ("qweight", "scales", "scales_zeros"):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        # a MoE layer's quantized experts: per expert, an int4 pack or an int8 (weight, scale) pair
        for per_expert in getattr(getattr(module, "quant_method", None), "weights", {}).values():
            for stored in per_expert:
                parts = (stored.qweight, stored.scales_zeros) if hasattr(stored, "qweight") else stored
                total += sum(t.numel() * t.element_size() for t in parts)
    return total


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_prediction_at_tp1_is_what_a_dummy_engine_holds(tmp_path, family):
    engine = dummy_engine(tmp_path, FAMILY_CONFIGS[family])
    inv = inventory(engine.model_config)
    block_size = engine.engine_config.block_size
    assert sum(capacity.weight_bytes(inv, 1, "none", torch.bfloat16).values()) == held_bytes(engine)
    assert inv.num_parameters() == sum(p.numel() for p in engine.model.parameters())
    assert capacity.rope_table_bytes(inv, torch.bfloat16) == sum(
        b.numel() * b.element_size() for b in engine.model.buffers())
    per_block = engine.runner.kv_bytes_per_block(engine.model, block_size, engine.dtype)
    assert capacity.kv_bytes_per_token(inv, 1, torch.bfloat16) * block_size == per_block
    # The blocks an explicit kv_cache_memory buys: the planner's token capacity.
    blocks = capacity.cache_blocks(KV_CACHE_MEMORY, per_block)
    assert engine.num_blocks == blocks == KV_CACHE_MEMORY // per_block
    # Plus the decode graphs' scratch block (their padding rows write there; MoE models decode
    # eager), outside the budget.
    held = sum(t.numel() * t.element_size() for cache in engine.runner.kv_caches for t in cache)
    assert engine.runner.scratch_blocks == (engine.runner.cpu_graphs is not None)
    assert held == (blocks + engine.runner.scratch_blocks) * per_block


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "qwen2-moe", "deepseek-v2"])
def test_quantized_prediction_is_what_the_engine_stores(tmp_path, family, quantization):
    config = {**FAMILY_CONFIGS[family], "hidden_size": 128, "intermediate_size": 96}
    engine = dummy_engine(tmp_path, config, quantization=quantization)
    inv = inventory(engine.model_config)
    assert sum(capacity.weight_bytes(inv, 1, quantization, torch.bfloat16).values()) == held_bytes(engine)
    assert held_bytes(engine) < sum(capacity.weight_bytes(inv, 1, "none", torch.bfloat16).values())


def test_tensor_parallel_splits(tmp_path):
    """The split rules on a shape with 2 KV heads and an odd vocabulary (333): KV heads replicate
    at TP=4, the vocabulary pads to ceil(333 / 4) rows per rank, row-parallel biases stay whole."""
    engine = dummy_engine(tmp_path, FAMILY_CONFIGS["llama"])
    inv = inventory(engine.model_config)
    by_name = {t.name: t for t in inv.tensors}
    assert by_name["self_attn.qkv_proj.weight"].shape_per_rank(4) == (16 + 16 + 16, 64)  # 1 q head, 1 kv head
    assert by_name["self_attn.qkv_proj.weight"].shape_per_rank(2) == (32 + 16 + 16, 64)
    assert by_name["self_attn.o_proj.weight"].shape_per_rank(4) == (64, 16)
    assert by_name["self_attn.o_proj.bias"].shape_per_rank(4) == (64, 0)
    assert by_name["mlp.gate_up_proj.bias"].shape_per_rank(4) == (48, 0)
    assert by_name["embed_tokens.weight"].shape_per_rank(4) == (math.ceil(333 / 4), 64)
    assert capacity.kv_bytes_per_token(inv, 4, torch.bfloat16) == capacity.kv_bytes_per_token(inv, 2, torch.bfloat16)
    assert inv.invalid_reason(3) == "3 ranks do not divide the 4 attention heads"
    assert inv.invalid_reason(8) == "8 ranks do not divide the 4 attention heads"


@pytest.mark.parametrize("family", ["llama", "qwen2-moe", "deepseek-v2"])
def test_prediction_at_tp2_is_what_rank_0_holds(tmp_path, family):
    """The split rules against the tensor-parallel layers themselves: rank 0 of a TP=2 dummy
    engine (gloo, a worker process for rank 1) holds exactly the planner's per-rank weights and
    KV bytes per block."""
    engine = dummy_engine(tmp_path, FAMILY_CONFIGS[family], tensor_parallel_size=2)
    try:
        inv = inventory(engine.model_config)
        assert sum(capacity.weight_bytes(inv, 2, "none", torch.bfloat16).values()) == held_bytes(engine)
        block_size = engine.engine_config.block_size
        per_block = engine.runner.kv_bytes_per_block(engine.model, block_size, engine.dtype)
        assert capacity.kv_bytes_per_token(inv, 2, torch.bfloat16) * block_size == per_block
    finally:
        engine.shutdown()
