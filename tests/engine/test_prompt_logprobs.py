"""Prompt logprobs (SamplingParams.prompt_logprobs) against transformers' log-softmax over the same
GGUF's dequantized model: one prefill, a prefill chunked over several steps (a one-token last
chunk included), requests of different k sharing steps, and a prompt whose prefix is cached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve import SamplingParams
from lmserve.engine import prompt_logprobs as scoring

TEXT = (Path(__file__).parents[1] / "data" / "perplexity_text.txt").read_text()
TOL = 2e-3  # both sides run float32; what is left is summation order


@pytest.fixture(scope="module")
def prompt(smollm) -> list[int]:
    ids = smollm.engine.encode(TEXT)
    assert len(ids) > scoring.SLICE_ROWS, "the prompt should span more than one scoring slice"
    return ids


def reference(hf_smollm, ids: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers: logprob of each token given the ones before, and the top k per position."""
    with torch.inference_mode():
        logits = hf_smollm(torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    values, top = logp.topk(max(k, 1), dim=-1)
    return logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1), top, values


def check(out, ids: list[int], ref, k: int) -> None:
    own, top, values = ref
    got = out.prompt_logprobs
    assert got is not None and len(got) == len(ids) and got[0] is None
    assert [e.token_id for e in got[1:]] == ids[1:]
    torch.testing.assert_close(torch.tensor([e.logprob for e in got[1:]]), own, atol=TOL, rtol=0)
    for pos, entry in enumerate(got[1:]):
        assert len(entry.top) == k
        if k:
            assert [t for t, _ in entry.top] == top[pos, :k].tolist(), f"top {k} differ at position {pos + 1}"
            torch.testing.assert_close(torch.tensor([v for _, v in entry.top]), values[pos, :k], atol=TOL, rtol=0)
    # The engine's own best guess is transformers' argmax everywhere (asked with k >= 1 or not).
    if k:
        assert [e.top[0][0] for e in got[1:]] == top[:, 0].tolist()
    assert [e.rank == 1 for e in got[1:]] == (torch.tensor(ids[1:]) == top[:, 0]).tolist()


def test_one_prefill_matches_transformers(smollm, hf_smollm, prompt):
    params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=3)
    out = smollm.generate(prompt, params)[0]
    check(out, prompt, reference(hf_smollm, prompt, 3), 3)
    # Scoring the prompt changes nothing about what is generated.
    plain = smollm.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids
    assert plain.prompt_logprobs is None


def test_chunked_prefill_and_shared_steps_match_transformers(make_llm, hf_smollm, prompt):
    # A 40-token budget: the prompt is prefilled over several steps; its length leaves a last
    # chunk of one token (scheduled as a decode). Three requests share those steps.
    budget = 40
    ids = prompt[:2 * budget + 1]
    llm = make_llm(max_num_batched_tokens=budget, long_prefill_token_threshold=0, num_kv_blocks=64)
    other = prompt[len(prompt) // 2:]
    outs = llm.generate([ids, other, ids], [SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=0),
                                            SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=5),
                                            SamplingParams(max_tokens=2, temperature=0.0)])
    check(outs[0], ids, reference(hf_smollm, ids, 0), 0)
    check(outs[1], other, reference(hf_smollm, other, 5), 5)
    assert outs[2].prompt_logprobs is None


def test_cached_prefix_is_scored_not_skipped(make_llm, hf_smollm, prompt):
    llm = make_llm(num_kv_blocks=64)
    head = prompt[:96]
    llm.generate(head, SamplingParams(max_tokens=1))  # the prefix cache now holds head's blocks
    warm = llm.generate(head, SamplingParams(max_tokens=1))[0]
    assert warm.num_cached_tokens > 0
    out = llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    check(out, prompt, reference(hf_smollm, prompt, 2), 2)
    assert out.num_cached_tokens == 0  # read nothing from the cache...
    again = llm.generate(prompt, SamplingParams(max_tokens=1))[0]
    assert again.num_cached_tokens >= len(prompt) - llm.engine.block_manager.block_size  # ...but wrote it


def test_one_token_prompt_and_bounds(smollm):
    out = smollm.generate([1], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert out.prompt_logprobs == [None]
    from lmserve.errors import InvalidParameter
    with pytest.raises(InvalidParameter):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(InvalidParameter):
        SamplingParams(prompt_logprobs=-1)


def test_scoring_memory_is_bounded_per_slice(smollm, prompt, monkeypatch):
    """Every LM-head call while scoring sees at most SLICE_ROWS rows, however long the chunk."""
    monkeypatch.setattr(scoring, "SLICE_ROWS", 16)
    model = smollm.engine.model
    seen = []
    compute = model.compute_logits

    def recording(hidden):
        seen.append(hidden.shape[0])
        return compute(hidden)

    monkeypatch.setattr(model, "compute_logits", recording)
    out = smollm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    assert len(out.prompt_logprobs) == len(prompt)
    assert max(seen) <= 16 and sum(seen) >= len(prompt) - 1


def test_preempted_request_keeps_one_score_per_position(make_llm, hf_smollm, prompt):
    # Eight 16-token blocks for two growing requests: the younger (the scored one) is preempted and
    # recomputed; its prompt is scored once, every position exactly once.
    llm = make_llm(num_kv_blocks=8, max_num_batched_tokens=40, long_prefill_token_threshold=0)
    ids = prompt[:81]
    outs = llm.generate([prompt[100:116], ids],
                        [SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True),
                         SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, prompt_logprobs=1)])
    assert llm.engine.scheduler.num_preemptions >= 1
    assert len(outs[1].outputs[0].token_ids) == 30
    check(outs[1], ids, reference(hf_smollm, ids, 1), 1)
