"""Speculative decoding with a draft model against the engine without it: a draft equal to the
target (every proposal accepted) and a random draft of the same tokenizer (almost none) both give
plain greedy decoding token for token on three families, through chunked prefill, the prefix
cache, preemption, n > 1, stop tokens and max_tokens; seeded sampling gives the same tokens seed
for seed; stop strings on the bundled model; a draft of another tokenizer is refused in one line.
The draft's KV blocks are all free afterwards (the engine counts them in its free blocks)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmserve import SamplingParams
from lmserve.engine.llm_engine import LLMEngine
from lmserve.models.loader import DEFAULT_MODEL_ID, bundled_model_path
from tests.conftest import chat_ids
from tests.support.family_checkpoints import WAVES, build_gemma2, build_llama, build_qwen2

from .test_spec_decode import COPY, _generate, _outs, _serve, always_speculate

OPTIONS = dict(dtype="float32", block_size=4, max_num_batched_tokens=32, max_num_seqs=6)


def _draft(target, k: int = 4) -> dict:
    return {"model": str(target), "num_speculative_tokens": k}


def _randomized(src, dst):
    """The same checkpoint with other random weights: same tokenizer, unrelated predictions."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    weights = next(dst.glob("*.safetensors"))
    gen = torch.Generator().manual_seed(99)
    tensors = {name: (torch.randn(t.shape, generator=gen) * 0.08 if t.dim() > 1 else t)
               for name, t in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma2"])
def family(request, tmp_path_factory):
    build = {"llama": build_llama, "qwen2": build_qwen2, "gemma2": build_gemma2}[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    build(directory)
    return directory, _randomized(directory, tmp_path_factory.mktemp(request.param + "-random"))


def _check_draft_free(engine: LLMEngine) -> None:
    draft = engine.draft
    assert not draft.states and draft.num_free_blocks == draft.num_blocks, "draft KV blocks leaked"


def test_a_draft_equal_to_the_target_or_random_gives_plain_greedy(family):
    target, random_draft = family
    steps = 10
    reference = _serve(LLMEngine(str(target), num_kv_blocks=96, **OPTIONS), steps)
    same = always_speculate(LLMEngine(str(target), num_kv_blocks=96, speculative_config=_draft(target), **OPTIONS))
    assert _serve(same, steps, check_hashes=True) == reference
    stats = same.spec_decode_stats
    assert stats.proposed > 20 and stats.accepted == stats.proposed, "the target as its own draft: all accepted"
    assert same.draft.runner.cpu_graphs.steps > 0, "the draft's proposal steps were replayed from CPU graphs"
    assert same.block_manager.prefix_hits >= 16, "the second wave should hit the prefix cache"
    _check_draft_free(same)
    noise = always_speculate(LLMEngine(str(target), num_kv_blocks=96, speculative_config=_draft(random_draft),
                                       **OPTIONS))
    assert _serve(noise, steps, check_hashes=True) == reference
    stats = noise.spec_decode_stats
    assert stats.proposed > 20 and stats.accepted <= 0.15 * stats.proposed
    _check_draft_free(noise)


def test_preemption_n_stop_tokens_max_tokens_and_seeded_sampling_with_a_draft(tmp_path):
    build_llama(tmp_path)
    # A cache too small for the wave: sequences are preempted (their draft blocks freed) and recomputed.
    steps = 8
    wide = dict(OPTIONS, max_num_batched_tokens=64, max_num_seqs=24)
    plain = LLMEngine(str(tmp_path), num_kv_blocks=200, **wide)
    reference = _serve(plain, steps)
    small = always_speculate(LLMEngine(str(tmp_path), num_kv_blocks=18, speculative_config=_draft(tmp_path),
                                       **OPTIONS))
    assert _serve(small, steps) == reference
    assert small.scheduler.num_preemptions > 0
    _check_draft_free(small)
    # n > 1, a stop token inside an accepted run, max_tokens at several offsets of a run, seeded
    # sampling with truncation and penalties: the same tokens as plain decoding.
    spec = always_speculate(LLMEngine(str(tmp_path), num_kv_blocks=200, speculative_config=_draft(tmp_path, 5),
                                      **wide))
    prompt = WAVES[0][0]
    greedy = _generate(plain, [(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))])[0]
    cases = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (1, 2, 5, 6, 7, 11)]
    cases += [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[greedy[7]]),
              SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, n=3),
              SamplingParams(max_tokens=10, temperature=0.9, top_k=30, top_p=0.9, presence_penalty=0.3,
                             ignore_eos=True, seed=5, n=2)]
    cases += [SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True, seed=s) for s in range(6)]

    def run(engine):
        for i, params in enumerate(cases):
            engine.add_request(f"r{i}", prompt, params)
        got = {}
        while engine.has_unfinished():
            for out in engine.step():
                for o in out.outputs:
                    got.setdefault((out.request_id, o.index), []).extend(o.token_ids)
        return got

    expected, actual = run(plain), run(spec)
    assert actual == expected
    assert len(actual[("r6", 0)]) <= 8, "cut at the stop token"
    assert spec.spec_decode_stats.proposed > 30
    _check_draft_free(spec)


def test_a_stop_string_inside_an_accepted_run_on_the_bundled_model_as_its_own_draft(smollm, make_llm):
    spec = make_llm(speculative_config=_draft(bundled_model_path(), 3), kv_cache_memory=16 << 20)
    always_speculate(spec.engine)
    copy = [chat_ids(smollm, COPY)]
    params = SamplingParams(max_tokens=10, temperature=0.0, stop=[" ship"])
    plain, got = smollm.generate(copy, params), spec.generate(copy, params)
    assert _outs(got) == _outs(plain)
    assert got[0].outputs[0].finish_reason == "stop" and got[0].outputs[0].text.endswith("every")
    stats = spec.engine.spec_decode_stats
    assert stats.proposed >= 3 and stats.accepted == stats.proposed
    _check_draft_free(spec.engine)


def test_a_draft_of_another_tokenizer_or_on_tensor_parallel_is_refused(tmp_path):
    target, other = tmp_path / "t", tmp_path / "o"
    target.mkdir()
    build_llama(target)
    shutil.copytree(target, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, vocab_size=321)))
    with pytest.raises(ValueError, match=r"not share the target.s tokenizer: vocabulary sizes differ \(321 vs 320"):
        LLMEngine(str(target), speculative_config=_draft(other), **OPTIONS)
    with pytest.raises(ValueError, match="does not share the target's tokenizer: one of the two checkpoints has a "
                                         "tokenizer"):
        LLMEngine(str(target), speculative_config=_draft(DEFAULT_MODEL_ID), **OPTIONS)
    with pytest.raises(ValueError, match="not supported with tensor_parallel_size > 1"):
        LLMEngine(str(target), speculative_config=_draft(target), tensor_parallel_size=2, **OPTIONS)
