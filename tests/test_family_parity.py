"""Every family against transformers' own implementation, through the paged, batched engine.

Each spec builds a tiny random-weight checkpoint from the family's real config shape rules with
its features switched on (GQA, biases, YaRN, softcaps, a sliding window shorter than the
prompts), saved under the family's real tensor names and config keys. The engine then serves
several prompts of different lengths at once with chunked prefill (a small token budget) and a
second wave that hits the prefix cache; the logits of every request at prefill and at each of
32 decode steps must match transformers' on the same tokens, and the greedy tokens must agree.

Adding a family is one `FamilySpec` here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from lmserve import SamplingParams
from lmserve.engine.llm_engine import LLMEngine

STEPS = 32


def _widen(model: torch.nn.Module) -> torch.nn.Module:
    """Random init has tiny weights: widen them so the comparison has teeth."""
    torch.manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
            elif "norm" in name:
                p.normal_(0, 0.1) if model.config.model_type == "gemma2" else p.normal_(1.0, 0.1)
    return model.eval()


def _rewrite_config(directory: Path, **changes) -> None:
    """Store config keys as released checkpoints spell them (transformers 5 rewrites some)."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def build_llama(directory: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64})
    model = _widen(LlamaForCausalLM(config))
    model.save_pretrained(directory)
    return model


QWEN2_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def build_qwen2(directory: Path, yarn: bool = True, tie: bool = False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32} \
        if yarn else {"rope_type": "default", "rope_theta": 1e6}
    config = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-6, tie_word_embeddings=tie, use_sliding_window=False,
                         rope_parameters=rope, bos_token_id=1, eos_token_id=2)
    model = _widen(Qwen2ForCausalLM(config))
    model.save_pretrained(directory)
    # Released Qwen2.5 configs spell the 128K recipe as rope_theta + rope_scaling {"type": "yarn"}.
    _rewrite_config(directory, rope_parameters=None, rope_theta=1e6, rope_scaling=QWEN2_YARN if yarn else None)
    return model


def build_qwen2_gguf(directory: Path):
    """The Qwen2 checkpoint written as a GGUF file the way llama.cpp names qwen2 tensors (gguf-py's
    own name map; qwen2's q/k rows are not permuted). Returns the reference and the file."""
    import gguf

    model = build_qwen2(directory, yarn=False)
    c = model.config
    path = directory / "tiny-qwen2.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(1e6)
    writer.add_vocab_size(c.vocab_size)
    writer.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, path


def build_gemma2(directory: Path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # head_dim 24 is not hidden / heads (64 / 4), as in gemma-2-27b; query_pre_attn_scalar is
    # not head_dim either; the window (8) is shorter than every prompt.
    config = Gemma2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=18,
                          max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=8,
                          attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                          hidden_activation="gelu_pytorch_tanh", bos_token_id=1, eos_token_id=2, pad_token_id=0,
                          attn_implementation="eager")
    model = _widen(Gemma2ForCausalLM(config))
    model.save_pretrained(directory)
    # Released gemma-2 configs carry no layer_types: the alternation must come from the family.
    _rewrite_config(directory, layer_types=None)
    return model


@dataclass
class FamilySpec:
    name: str
    build: Callable  # directory -> reference model, or (reference, file to serve)
    engine_options: dict = field(default_factory=dict)
    atol: float = 2e-4


FAMILIES = [
    FamilySpec("llama", build_llama),
    FamilySpec("qwen2-yarn", build_qwen2),
    FamilySpec("qwen2-tied", lambda d: build_qwen2(d, yarn=False, tie=True)),
    FamilySpec("qwen2-gguf", build_qwen2_gguf),
    FamilySpec("gemma2", build_gemma2),
]

# Wave 1: three prompts of different lengths, prefilled in chunks (token budget 16).
# Wave 2: a prompt sharing wave 1's first 16 tokens (a prefix-cache hit) and a short one.
_G = torch.Generator().manual_seed(7)
_BASE = torch.randint(3, 320, (64,), generator=_G).tolist()
WAVES = [
    [_BASE[:21], _BASE[20:27], _BASE[30:60]],
    [_BASE[:16] + _BASE[40:52], _BASE[5:9]],
]


def _serve_and_capture(engine: LLMEngine, prompts: list[list[int]]):
    """Run prompts together; return per prompt (generated tokens, logits per sampled step)."""
    captured: dict[str, list[torch.Tensor]] = {}
    sampler = engine.sampler

    def recording_sampler(logits, seqs):
        for row, seq in zip(logits, seqs):
            captured.setdefault(seq.request.request_id, []).append(row.clone())
        return sampler(logits, seqs)

    engine.sampler = recording_sampler
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
    ids = [f"p{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    cached: dict[str, int] = {}
    while engine.has_unfinished():
        for out in engine.step():
            cached[out.request_id] = out.num_cached_tokens
            for o in out.outputs:
                tokens[out.request_id] += o.token_ids
    engine.sampler = sampler
    return [(tokens[r], captured[r], cached.get(r, 0)) for r in ids]


@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.name)
def test_family_matches_transformers(spec: FamilySpec, tmp_path):
    built = spec.build(tmp_path)
    reference, source = built if isinstance(built, tuple) else (built, tmp_path)
    engine = LLMEngine(str(source), dtype="float32", num_kv_blocks=96, block_size=4,
                       max_num_batched_tokens=16, **spec.engine_options)
    hits = 0
    for wave in WAVES:
        for prompt, (tokens, logits, cached) in zip(wave, _serve_and_capture(engine, wave)):
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
    assert engine.num_free_blocks == engine.num_blocks
