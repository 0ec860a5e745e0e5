"""lmserve's models against transformers' own implementations."""

from __future__ import annotations

import pytest
import torch

from lmserve import SamplingParams
from lmserve.engine.llm_engine import LLMEngine
from tests.conftest import chat_ids

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works, step by step.",
    "List ten facts about the planet Mars.",
    "Describe your ideal weekend in detail.",
    "What are the main causes of the French Revolution?",
]


def test_smollm2_greedy_matches_transformers(smollm, hf_smollm):
    prompts = [chat_ids(smollm, p) for p in PROMPTS]
    outs = smollm.generate(prompts, SamplingParams(max_tokens=64, temperature=0.0))
    long_answers = 0
    for ids, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = hf_smollm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=64, do_sample=False)
        ref_new = ref[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref_new
        long_answers += len(ref_new) == 64
        expected_reason = "length" if len(ref_new) == 64 and ref_new[-1] != 2 else "eos"
        assert out.outputs[0].finish_reason == expected_reason
    assert long_answers >= 3, "the prompts should exercise the full 64 tokens"


def _tiny_llama_dir(tmp_path, tie: bool, rope_scaling: dict | None, shard: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=rope_scaling, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init has tiny weights: widen them so the test has teeth
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "100MB")
    return model


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@pytest.mark.parametrize("tie,rope_scaling,shard", [
    (False, LLAMA3_ROPE, True),
    (True, None, False),
])
def test_tiny_llama_logits_match_transformers(tmp_path, tie, rope_scaling, shard):
    ref = _tiny_llama_dir(tmp_path, tie, rope_scaling, shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    engine = LLMEngine(str(tmp_path), dtype="float32", num_kv_blocks=16, block_size=4)
    captured = []
    execute = engine.runner.execute

    def recording_execute(batch):
        logits = execute(batch)
        captured.append(logits.clone())
        return logits

    engine.runner.execute = recording_execute
    prompt = [1, 17, 250, 33, 9, 101, 77, 5, 64, 300, 12]  # 11 tokens: spans several 4-token blocks
    engine.add_request("r", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.outputs[0].token_ids if out.outputs else []
    assert len(captured) == 12 and len(tokens) == 12

    with torch.inference_mode():
        full = ref(torch.tensor([prompt + tokens])).logits[0]
    for step, logits in enumerate(captured):
        expected = full[len(prompt) - 1 + step]
        torch.testing.assert_close(logits[0], expected, atol=2e-4, rtol=1e-4)
        assert tokens[step] == int(expected.argmax())
    assert engine.num_free_blocks == engine.num_blocks
