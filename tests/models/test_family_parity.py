"""Every family against transformers' own implementation, through the paged, batched engine.

Each spec builds a tiny random-weight checkpoint from the family's real config shape rules with
its features switched on (GQA, biases, YaRN, softcaps, a sliding window shorter than the
prompts), saved under the family's real tensor names and config keys. The engine then serves
several prompts of different lengths at once with chunked prefill (a small token budget) and a
second wave that hits the prefix cache; the logits of every request at prefill and at each of
32 decode steps must match transformers' on the same tokens, and the greedy tokens must agree.

The checkpoints, the waves and the serving loop live in family_checkpoints.py (no pytest there:
benchmarks/gpu_check.py runs the same on a GPU). Adding a family is one `FamilySpec` there.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmserve.engine.llm_engine import LLMEngine
from tests.support.family_checkpoints import (
    BASE_PROMPT,
    FAMILIES,
    STEPS,
    WAVES,
    FamilySpec,
    build_deepseek_v2,
    build_qwen2_moe,
    greedy_tokens,
    serve_and_capture,
)


@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.name)
def test_family_matches_transformers(spec: FamilySpec, tmp_path):
    built = spec.build(tmp_path)
    reference, source = built if isinstance(built, tuple) else (built, tmp_path)
    options = {"num_kv_blocks": 96, "block_size": 4, "max_num_batched_tokens": 16, **spec.engine_options}
    engine = LLMEngine(str(source), dtype="float32", **options)
    hits = 0
    for wave in WAVES:
        for prompt, (tokens, logits, cached) in zip(wave, serve_and_capture(engine, wave)):
            assert len(tokens) == STEPS and len(logits) == STEPS
            hits += cached
            with torch.inference_mode():
                full = reference(torch.tensor([prompt + tokens])).logits[0]
            for step, row in enumerate(logits):
                expected = full[len(prompt) - 1 + step]
                torch.testing.assert_close(row, expected, atol=spec.atol, rtol=1e-4,
                                           msg=lambda m, s=step: f"{spec.name} step {s}: {m}")
                assert tokens[step] == int(expected.argmax()), f"{spec.name}: greedy token differs at step {step}"
    assert hits >= 16, "the second wave should have hit the prefix cache"
    # Decode steps replayed from CPU graphs were among the compared ones (MoE layers run eager).
    graphs = engine.runner.cpu_graphs
    assert (graphs is not None and graphs.steps > 0) == ("moe" not in spec.name and "deepseek" not in spec.name)
    assert (engine.scheduler.num_preemptions > 0) == spec.preempts
    assert engine.num_free_blocks == engine.num_blocks


# DeepSeek-V2-Chat's config.json (the keys the family reads; the model weighs 236B parameters).
DEEPSEEK_V2_CHAT = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 60,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 2, "n_routed_experts": 160,
    "routed_scaling_factor": 16.0, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "group_limited_greedy", "n_group": 8,
    "topk_group": 3, "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": False,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"}}


@pytest.mark.parametrize("mscale, scale", [(0.707, 0.114721), (1.0, 0.135234)])
def test_deepseek_v2_caches_576_values_per_token_per_layer(mscale, scale):
    """The real model's shape (built on the meta device: no memory): every layer's KV spec is the
    latent + rope key, and the block sizing the engine uses counts exactly that."""
    from lmserve.attention import MLAKVCacheSpec
    from lmserve.attention.spec import kv_bytes_per_block
    from lmserve.models.deepseek_v2 import DeepseekV2ForCausalLM

    cfg = json.loads(json.dumps(DEEPSEEK_V2_CHAT))
    cfg["rope_scaling"].update(mscale=mscale, mscale_all_dim=mscale)  # V2-Chat 0.707, V2.5 1.0
    config = DeepseekV2ForCausalLM.config_from_hf(cfg, None)
    assert config.context_length == 163840
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config, torch.bfloat16)
    specs = model.kv_cache_specs()
    assert specs == [MLAKVCacheSpec(512, 64)] * 60
    assert specs[0].cache_shape(10, 16) == (10, 16, 576)
    assert kv_bytes_per_block(specs, 16, torch.bfloat16) == 16 * 60 * 576 * 2  # 1.1 MB per 16 tokens
    attn = model.layers[0].self_attn.attn
    assert attn.scale == pytest.approx(scale, abs=1e-6)
    assert not hasattr(model.layers[0].mlp, "experts") and model.layers[1].mlp.experts.num_experts == 160
    assert model.layers[1].mlp.gate.num_groups == 8 and model.layers[1].mlp.gate.scaling_factor == 16.0


def test_telechat2_ntk_rope_past_base_seqlen():
    """Past base_seqlen TeleChat2 stretches the rope base by NTK (alpha = 2^ceil(log2(L/base) + 1) - 1)
    and scales cos/sin by 0.1 ln(L/training_seqlen) + 1; inside it, plain rope with base 10000."""
    import math

    from lmserve.models.telechat2 import TeleChat2Config, TeleChat2ForCausalLM

    cfg = TeleChat2Config.from_hf({"n_layer": 1, "n_head": 2, "hidden_size": 32, "ffn_hidden_size": 64,
                                   "vocab_size": 16, "training_seqlen": 64, "base_seqlen": 64,
                                   "max_position_embeddings": 256})
    table = TeleChat2ForCausalLM(cfg, torch.float32).rotary.cos_sin
    d = 16
    for pos in (0, 63, 64, 255):
        alpha = 2 ** math.ceil(math.log2(256 / 64) + 1) - 1 if pos >= 64 else 1
        mscale = 0.1 * math.log(256 / 64) + 1 if pos >= 64 else 1.0
        base = 10000.0 * alpha ** (d / (d - 2))
        angles = pos / base ** (torch.arange(0, d, 2).float() / d)
        torch.testing.assert_close(table[pos], torch.cat([angles.cos(), angles.sin()]) * mscale)


def test_deepseek_v2_quantized_keeps_the_latent_up_projection_dense(tmp_path):
    """Weight-only int8 quantizes every linear layer but kv_b_proj, whose weight the absorbed
    MLA decode reads itself; generation then runs through prefill and decode."""
    build_deepseek_v2(tmp_path, q_lora_rank=32, v_head_dim=8)  # the int8 kernel takes inputs of 16k values
    engine = LLMEngine(str(tmp_path), dtype="float32", num_kv_blocks=32, block_size=4, quantization="int8")
    attn = engine.model.layers[1].self_attn
    assert attn.kv_b_proj.weight is not None and attn.q_b_proj.weight is None
    tokens = greedy_tokens(engine, BASE_PROMPT[:10], 6)
    assert len(tokens) == 6 and engine.num_free_blocks == engine.num_blocks


def test_decode_groups_pad_each_sequence_at_most_to_twice_its_blocks():
    from lmserve.attention.reference import _decode_groups

    tables = [[1], [2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    groups = _decode_groups(tables, torch.tensor([2, 33, 5, 9]), torch.float32, 4)
    seen = []
    for g in groups:
        rows = g.rows.tolist()
        seen += rows
        width = g.block_tables.shape[1]
        assert all(len(tables[i]) <= width < 2 * len(tables[i]) or width == 1 for i in rows)
        for j, i in enumerate(rows):
            assert g.block_tables[j, :len(tables[i])].tolist() == tables[i]
    assert sorted(seen) == [0, 1, 2, 3]
    assert len(_decode_groups([[1, 2], [3, 4]], torch.tensor([5, 6]), torch.float32, 4)) == 1


def test_qwen2_moe_int4_keeps_the_shared_expert_gate_dense(tmp_path):
    """int4 packs rows in 16s: the shared expert's one-row gate stays dense, the rest quantizes."""
    build_qwen2_moe(tmp_path, shared_size=64)  # int4 groups inputs by 32
    engine = LLMEngine(str(tmp_path), dtype="float32", num_kv_blocks=32, block_size=4, quantization="int4")
    mlp = engine.model.layers[0].mlp
    assert mlp.shared_expert_gate.weight is not None and mlp.shared_expert.down_proj.weight is None
    tokens = greedy_tokens(engine, BASE_PROMPT[:10], 6)
    assert len(tokens) == 6 and engine.num_free_blocks == engine.num_blocks
