"""Prompt logprobs under tensor parallelism: the LM head is vocab-parallel, so scoring a prompt
takes every rank through the same slices (its gather is a collective) and rank 0 scores. The
scores at TP=2 must equal one rank's, which test_prompt_logprobs.py holds to transformers."""

from __future__ import annotations

from lmserve import LLM, SamplingParams
from tests.support.family_checkpoints import build_llama


def _scores(directory, **options):
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    # A 16-token budget splits the 40-token prompt into chunks: scoring runs chunk by chunk.
    with LLM(str(directory), dtype="float32", num_kv_blocks=64, block_size=4, max_num_batched_tokens=16,
             **options) as llm:
        (out,) = llm.generate([[(7 * i + 3) % 250 + 4 for i in range(40)]], params)
        assert llm.engine.num_free_blocks == llm.engine.num_blocks
    return out.prompt_logprobs, out.outputs[0].token_ids


def test_prompt_logprobs_at_tp2_equal_one_rank(tmp_path):
    build_llama(tmp_path)
    one, one_tokens = _scores(tmp_path)
    two, two_tokens = _scores(tmp_path, tensor_parallel_size=2)
    assert one[0] is None and two[0] is None and len(one) == len(two) == 40
    assert two_tokens == one_tokens
    for a, b in zip(one[1:], two[1:], strict=True):
        assert (a.token_id, a.rank) == (b.token_id, b.rank)
        assert abs(a.logprob - b.logprob) < 1e-4
        assert [t for t, _ in a.top] == [t for t, _ in b.top] and len(b.top) == 3
        assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a.top, b.top, strict=True))
