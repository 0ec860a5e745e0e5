"""Sampling parameters on the real model, and the sampler's arithmetic on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from lmserve import SamplingParams
from lmserve.engine.detokenizer import IncrementalDetokenizer
from lmserve.engine.sampler import Sampler, sample_inverse_cdf
from lmserve.engine.sequence import Request, Sequence
from tests.conftest import assert_logprobs_match, chat_ids, reference_logprobs

STORY = "Write a short poem about the moon."


def _text(llm, params, prompt=STORY):
    return llm.generate([chat_ids(llm, prompt)], params)[0].outputs[0]


def test_same_seed_same_text_different_seed_different_text(smollm):
    a = _text(smollm, SamplingParams(max_tokens=32, temperature=1.0, seed=11))
    b = _text(smollm, SamplingParams(max_tokens=32, temperature=1.0, seed=11))
    c = _text(smollm, SamplingParams(max_tokens=32, temperature=1.0, seed=12))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_seeded_request_is_independent_of_its_batch(smollm):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=5)
    alone = _text(smollm, params).token_ids
    others = [chat_ids(smollm, q) for q in ("Count to five.", "Say hello in French.", "What is 2+2?")]
    batched = smollm.generate(others[:2] + [chat_ids(smollm, STORY)] + others[2:],
                              [SamplingParams(max_tokens=24, temperature=1.0)] * 2 + [params]
                              + [SamplingParams(max_tokens=24, temperature=1.0)])
    assert batched[2].outputs[0].token_ids == alone


def test_top_k_one_equals_greedy(smollm):
    greedy = _text(smollm, SamplingParams(max_tokens=32, temperature=0.0))
    top1 = _text(smollm, SamplingParams(max_tokens=32, temperature=1.3, top_k=1, seed=3))
    assert top1.token_ids == greedy.token_ids


def test_max_tokens_gives_length(smollm):
    out = _text(smollm, SamplingParams(max_tokens=5, temperature=0.0))
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_eos_gives_eos(smollm):
    out = _text(smollm, SamplingParams(max_tokens=200, temperature=0.0), "Say just the word yes.")
    assert out.finish_reason == "eos"
    assert out.token_ids[-1] in smollm.engine.eos_token_ids
    assert "<|im_end|>" not in out.text


def test_stop_string_split_across_tokens_is_cut_and_never_leaked(smollm):
    engine = smollm.engine
    ids = chat_ids(smollm, STORY)
    full = _text(smollm, SamplingParams(max_tokens=40, temperature=0.0))
    tok = smollm.tokenizer
    # Pick a stop string that starts inside one token and ends inside the next.
    pieces = [tok.decode(full.token_ids[:i + 1]) for i in range(len(full.token_ids))]
    boundary = next(len(pieces[i]) for i in range(3, len(pieces))
                    if len(pieces[i]) - len(pieces[i - 1]) >= 3 and len(pieces[i + 1]) - len(pieces[i]) >= 3)
    stop = full.text[boundary - 2:boundary + 2]
    cut = full.text.index(stop)

    engine.add_request("stop", ids, SamplingParams(max_tokens=40, temperature=0.0, stop=[stop]))
    deltas = []
    while engine.has_unfinished():
        for out in engine.step():
            deltas += [o for o in out.outputs]
    text = "".join(d.text for d in deltas)
    assert text == full.text[:cut]
    assert deltas[-1].finish_reason == "stop"
    for i in range(len(deltas)):  # no prefix of the stream ever ran past the final text
        assert full.text[:cut].startswith("".join(d.text for d in deltas[:i + 1]))


def test_stop_token_id_gives_stop(smollm):
    full = _text(smollm, SamplingParams(max_tokens=20, temperature=0.0))
    out = _text(smollm, SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[full.token_ids[5]]))
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:6]


def test_logprobs_equal_transformers_teacher_forced(smollm, hf_smollm):
    """Sampled-token and top logprobs are the model's log-softmax (before temperature and
    truncation), checked against transformers on prompt + the sampled tokens, at 1e-4."""
    ids = chat_ids(smollm, STORY)
    for params in (SamplingParams(max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=5),
                   SamplingParams(max_tokens=8, temperature=1.3, top_p=0.9, seed=4, logprobs=True, top_logprobs=5)):
        out = smollm.generate([ids], params)[0].outputs[0]
        assert len(out.token_ids) == 8
        assert_logprobs_match(out.logprobs, out.token_ids, reference_logprobs(hf_smollm, ids, out.token_ids), 5)
        if params.greedy:  # greedy: the sampled token is the top one
            assert all(lp.top[0][0] == t for lp, t in zip(out.logprobs, out.token_ids))


def test_utf8_never_split_in_deltas(smollm):
    tok = smollm.tokenizer
    text = "Grüße aus Köln! 你好，世界 🌍🚀 naïve café"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    deltas = []
    for t in ids:
        detok.add_token(t)
        deltas.append(detok.take_delta(False))
    detok.flush()
    deltas.append(detok.take_delta(True))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def _seqs(outputs: list[list[int]], params: SamplingParams, prompt=(1, 2, 3)) -> list[Sequence]:
    seqs = []
    for i, out in enumerate(outputs):
        req = Request(f"r{i}", list(prompt), params, 0.0, seed=i)
        seqs.append(Sequence(i, req, 0, list(prompt) + out, sampling_key=i, detok=IncrementalDetokenizer(None)))
    return seqs


def test_frequency_and_presence_penalties_lower_repeated_tokens():
    logits = torch.zeros(1, 8)
    logits[0, 4] = 3.0  # token 4 wins unless penalized
    # token 4 generated three times: frequency 0.5*3 + presence 1.0 = 2.5 off -> still 0.5 ahead
    seq = _seqs([[4, 4, 4]], SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=1.0))
    assert Sampler()(logits, seq).token_ids == [4]
    seq = _seqs([[4, 4, 4, 4]], SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=1.0))
    assert Sampler()(logits, seq).token_ids != [4]  # 3 - 2.0 - 1.0 = 0: no longer strictly ahead


def test_repetition_penalty_applies_to_prompt_and_output():
    logits = torch.tensor([[0.0, 2.0, 1.5, -1.0, 0.5]])
    # token 1 is in the prompt: 2.0 / 2 = 1.0 < 1.5, so token 2 wins
    seq = _seqs([[]], SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=(1,))
    assert Sampler()(logits, seq).token_ids == [2]
    seq = _seqs([[]], SamplingParams(temperature=0.0), prompt=(1,))
    assert Sampler()(logits, seq).token_ids == [1]


def test_top_p_and_min_p_restrict_candidates():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for seed in range(40):
        seq = _seqs([[]], SamplingParams(temperature=1.0, top_p=0.6, seed=seed))
        seq[0].sampling_key = seed
        assert Sampler()(logits, seq).token_ids[0] in (0, 1)  # 0.5 < 0.6, so token 1 is kept
        seq[0].sampling_key = seed + 1000
        seq[0].request.params = SamplingParams(temperature=1.0, min_p=0.5)
        assert Sampler()(logits, seq).token_ids[0] in (0, 1)  # 0.15 < 0.5 * 0.5
    drawn = set()
    for seed in range(200):
        seq = _seqs([[]], SamplingParams(temperature=1.0))
        seq[0].sampling_key = seed
        drawn.add(Sampler()(logits, seq).token_ids[0])
    assert drawn == {0, 1, 2, 3}


def test_masked_tokens_never_win_the_race():
    # Over a full vocabulary, a draw of E ~ Exp(1) close to 0 happens every few hundred rows; a
    # masked token (p = 0) must lose even then (0 / E was once NaN, which won the argmax).
    vocab, rows = 49152, 256
    allowed = torch.tensor([7, 40000])
    logits = torch.full((rows, vocab), float("-inf"))
    logits[:, allowed] = 0.0
    sampler = Sampler()
    for step in range(8):
        seqs = _seqs([[5] * step] * rows, SamplingParams(temperature=1.0))
        for i, s in enumerate(seqs):
            s.sampling_key = 1000 * step + i
        tokens = sampler(logits.clone(), seqs).token_ids
        assert set(tokens) <= {7, 40000}


def _draw_many(logits_row: torch.Tensor, params: SamplingParams, rows: int = 4000) -> torch.Tensor:
    """Token counts over `rows` independent draws (one row per stream key) of one distribution."""
    seqs = _seqs([[]] * rows, params)
    for i, s in enumerate(seqs):
        s.sampling_key = 7919 * i + 17
    tokens = Sampler()(logits_row.expand(rows, -1).clone(), seqs).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=logits_row.shape[-1]).float()


def _assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Empirical frequencies within 5 standard errors of the expected probabilities, and tokens of
    probability 0 never drawn."""
    n = counts.sum()
    expected = probs * n
    assert (counts[probs == 0] == 0).all()
    se = (n * probs * (1 - probs)).sqrt().clamp(min=1.0)
    assert ((counts - expected).abs() <= 5 * se).all(), (counts, expected)


def test_temperature_only_sampling_draws_from_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, float("-inf"), 0.0, -1.0, float("-inf"), 1.5]])
    counts = _draw_many(logits[0], SamplingParams(temperature=0.7))
    _assert_matches(counts, torch.softmax(logits[0] / 0.7, dim=-1))


def test_top_k_then_top_p_draws_from_the_renormalized_nucleus():
    logits = torch.log(torch.tensor([0.30, 0.25, 0.20, 0.15, 0.06, 0.04]))
    # top_k 4 keeps 0.30..0.15 (mass 0.9), renormalized 1/3, 0.278, 0.222, 0.167; top_p 0.7 then
    # keeps the first three (mass before the third is 0.611 < 0.7, before the fourth 0.833).
    counts = _draw_many(logits, SamplingParams(temperature=1.0, top_k=4, top_p=0.7))
    kept = torch.tensor([0.30, 0.25, 0.20, 0, 0, 0])
    _assert_matches(counts, kept / kept.sum())


def test_nucleus_outside_the_first_candidates_widens_to_the_whole_vocabulary():
    # A nearly flat distribution over 3,000 tokens: top_p 0.95 needs ~2,800 of them, more than
    # any candidate width short of a full sort, and the draws still follow the nucleus.
    vocab = 3000
    logits = -torch.arange(vocab) * 1e-4
    params = SamplingParams(temperature=1.0, top_p=0.95)
    counts = _draw_many(logits, params, rows=6000)
    probs = torch.softmax(logits, dim=-1)
    order = probs.argsort(descending=True)
    nucleus = order[(probs[order].cumsum(0) - probs[order]) < 0.95]
    assert counts[nucleus].sum() == counts.sum()
    assert len(counts.nonzero()) > 2000  # drawn across the nucleus, not only the first candidates


def test_sparse_penalties_equal_the_dense_rule():
    torch.manual_seed(0)
    vocab = 300
    logits = torch.randn(3, vocab) * 3
    outputs = [[5, 5, 9, 299, 5], [], [1, 2, 3, 2]]
    params = SamplingParams(temperature=0.0, frequency_penalty=0.4, presence_penalty=0.7, repetition_penalty=1.3)
    seqs = _seqs(outputs, params, prompt=(9, 10, 11))
    got = Sampler._apply_penalties(logits.clone(), seqs, vocab)
    expected = logits.clone()
    for i, out in enumerate(outputs):
        counts = torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=vocab).float()
        expected[i] = expected[i] - 0.4 * counts - 0.7 * (counts > 0).float()
        seen = torch.tensor([9, 10, 11] + out)
        vals = expected[i, seen]
        expected[i, seen] = torch.where(vals > 0, vals / 1.3, vals * 1.3)
    assert torch.equal(got, expected)
    # Through the sampler, float32 logits the caller passed in are left as they were.
    before = logits.clone()
    Sampler()(logits, seqs)
    assert torch.equal(logits, before)


def test_a_wide_top_k_beside_a_nucleus_row_keeps_all_its_candidates():
    # In one batch with a top_p-only row, a top_k row wider than the first candidate width (64)
    # still draws from all of its k tokens, and from none beyond.
    vocab, rows = 1000, 3000
    logits = -torch.arange(vocab, dtype=torch.float32) * 1e-3  # nearly flat, distinct
    wide = SamplingParams(temperature=1.0, top_k=200)
    seqs = _seqs([[]] * (rows + 1), wide)
    seqs[-1].request.params = SamplingParams(temperature=1.0, top_p=0.05)  # a nucleus of ~50 tokens
    for i, s in enumerate(seqs):
        s.sampling_key = 7919 * i + 3
    tokens = torch.tensor(Sampler()(logits.expand(rows + 1, -1).clone(), seqs).token_ids[:rows])
    assert tokens.max() < 200
    assert (tokens >= 64).sum() > rows // 2  # the top 64 hold a third of the top-200 mass


# On an accelerator the sampler avoids reading tensors back mid-step (`sync_free`). These tests
# force that path on CPU tensors and hold it to the CPU path's exact draws.

def _spread_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Odd seeds: rows from nearly flat (a nucleus far wider than the first candidate width) to
    peaked; even seeds: all peaked (the CPU path stops at its first candidate width)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.05 if seed % 2 else 5.0, 8.0, rows).unsqueeze(1)
    logits = torch.randn(rows, vocab, generator=gen) * scale
    logits[::7, -vocab // 10:] = float("-inf")  # masked tails
    return logits


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.7, top_k=20),
    SamplingParams(temperature=1.3, top_k=100, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.9, top_p=0.95, min_p=0.01, logprobs=True, top_logprobs=5),
])
def test_sync_free_sampling_draws_what_the_cpu_path_draws(params):
    vocab, rows = 3000, 48
    for trial in range(6):
        seqs = _seqs([[3, 5] * trial] * rows, params)
        for i, s in enumerate(seqs):
            s.sampling_key = 1009 * trial + 31 * i
        logits = _spread_logits(rows, vocab, seed=trial)
        cpu = Sampler(sync_free=False)(logits.clone(), seqs)
        free = Sampler(sync_free=True)(logits.clone(), seqs)
        assert free.token_ids == cpu.token_ids
        assert free.logprobs == cpu.logprobs


def test_sync_free_mixed_batch_matches_and_each_row_is_batch_invariant():
    vocab = 2000
    kinds = [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
             SamplingParams(temperature=0.9, seed=1),
             SamplingParams(temperature=1.0, top_p=0.85, presence_penalty=0.5, frequency_penalty=0.3),
             SamplingParams(temperature=1.1, top_k=80, repetition_penalty=1.2, logprobs=True),
             SamplingParams(temperature=1.0, min_p=0.02, min_tokens=4, stop_token_ids=[7, 8]),
             SamplingParams(temperature=0.6, top_k=5, top_p=0.5)]
    rows = 4 * len(kinds)
    seqs = _seqs([[7, 9, 9, 11][:i % 5] for i in range(rows)], kinds[0])
    for i, s in enumerate(seqs):
        s.request.params = kinds[i % len(kinds)]
        s.sampling_key = 7919 * i + 5
    sampler = Sampler(sync_free=True)
    sampler.eos_token_ids = [0]
    for trial in range(4):
        logits = _spread_logits(rows, vocab, seed=100 + trial)
        expected = Sampler(sync_free=False)
        expected.eos_token_ids = [0]
        cpu = expected(logits.clone(), seqs)
        free = sampler(logits.clone(), seqs)
        assert free.token_ids == cpu.token_ids and free.logprobs == cpu.logprobs
        for i in range(0, rows, 5):  # the same row alone draws the same token
            assert sampler(logits[i:i + 1].clone(), seqs[i:i + 1]).token_ids == [free.token_ids[i]]


def test_inverse_cdf_target_past_the_end_takes_the_last_possible_token_on_both_paths():
    probs = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.2, 0.3, 0.5]])
    uniforms = torch.tensor([1 - 1e-12, 0.25, 1 - 1e-12], dtype=torch.float64)
    # Row 0's target rounds to the total in float32 and no cumulative value passes it.
    assert torch.searchsorted(probs[:1].cumsum(-1), torch.tensor([[1.0]]), right=True)[0, 0] == 4
    assert sample_inverse_cdf(probs, uniforms).tolist() == [1, 0, 3]
    assert sample_inverse_cdf(probs, uniforms, no_sync=True).tolist() == [1, 0, 3]


def test_plain_greedy_on_bf16_logits_equals_the_float32_path():
    """All-greedy batches without logprobs take the argmax of bf16 logits as they are (no float32
    copy): the same tokens as the float32 path, ties (first wins) and NaN (the maximum) included."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 49152, generator=g).to(torch.bfloat16)
    logits[1, 100] = logits[1, 30000] = 50.0  # a tie across chunks: the first
    logits[2, 7] = float("nan")
    logits[3] = 0.0
    plain = _seqs([[]] * 6, SamplingParams(temperature=0.0))
    reported = _seqs([[]] * 6, SamplingParams(temperature=0.0, logprobs=True))  # the float32 path
    fast = Sampler()(logits, plain)
    assert fast.logprobs == [None] * 6
    assert fast.token_ids == Sampler()(logits, reported).token_ids == logits.float().argmax(-1).tolist()
    assert fast.token_ids[1:4] == [100, 7, 0]
