"""Speculative decoding against the engine without it: greedy output token for token, seeded
sampled output seed for seed, the sampled distribution (chi-square, with a mutation that must
fail it), logprobs, structured output, stop strings, max_tokens, n > 1, preemption, the prefix
cache, and the KV blocks all free afterwards (conftest checks that after every test)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmserve import LLM, SamplingParams
from lmserve.engine import llm_engine
from lmserve.engine.block_manager import hash_block
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.spec_decode.config import SpeculativeConfig
from lmserve.engine.spec_decode.cost_model import EXPLORE_EVERY, FixedCost, StepCostModel, tokens_worth_proposing
from lmserve.engine.spec_decode.ngram import propose_ngram
from lmserve.engine.spec_decode.speculator import Speculator, acceptance_estimate
from lmserve.models.loader import DEFAULT_MODEL_ID
from lmserve.sampling_params import StructuredOutput
from tests.conftest import chat_ids, track, untrack
from tests.support.family_checkpoints import WAVES, build_gemma2, build_llama, build_qwen2

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
PASSAGE = ("The keeper logged every ship that passed the cape: the Aurora on Monday, the Kestrel on Wednesday, "
           "and the Tidewater on Friday.")
COPY = f"Copy this text exactly, word for word:\n\n{PASSAGE}"


def always_speculate(engine: LLMEngine) -> LLMEngine:
    """Verified rows priced at nothing: the adaptive rule lets every request propose its full k
    (the tests below are about exactness, which must hold whatever the rule decides)."""
    engine.speculator.cost_model = FixedCost(0.0)
    return engine


@pytest.fixture(scope="module")
def spec_llm():
    llm = track(LLM(DEFAULT_MODEL_ID, dtype="float32", speculative_config=NGRAM, kv_cache_memory=64 << 20))
    always_speculate(llm.engine)
    yield llm
    untrack(llm)


def _outs(results):
    return [[(o.token_ids, o.text, o.finish_reason) for o in r.outputs] for r in results]


# ---- configuration and the proposer ------------------------------------------------------


def test_config_follows_vllm_keys_and_refuses_bad_ones():
    cfg = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}')
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (5, 4, 4)
    assert SpeculativeConfig.parse({"model": "[ngram]", "num_speculative_tokens": 2}).prompt_lookup_min == 5
    draft = SpeculativeConfig.parse({"model": "/some/draft", "num_speculative_tokens": 3})
    assert (draft.method, draft.model) == ("draft_model", "/some/draft")
    for bad, words in [({"num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "exceed"),
                       ({"num_speculative_tokens": 2, "lookahead": 1}, "unknown key"),
                       ({"method": "eagle", "model": "/some/draft", "num_speculative_tokens": 2}, "not supported"),
                       ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
                       ({"method": "ngram", "model": "/some/draft", "num_speculative_tokens": 2}, "does not go with"),
                       ("{nope", "not valid JSON")]:
        with pytest.raises(ValueError, match=words):
            SpeculativeConfig.parse(bad)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLMEngine(DEFAULT_MODEL_ID, speculative_config={"num_speculative_tokens": -1})


def test_ngram_lookup_takes_the_longest_suffix_then_the_earliest_match():
    tokens = [1, 2, 3, 9, 2, 3, 4, 5, 7, 2, 3]
    assert propose_ngram(tokens, 1, 2, 3) == [9, 2, 3]  # "2 3" first occurs at 1, followed by 9 2 3
    assert propose_ngram(tokens, 3, 3, 3) == []  # "7 2 3" never occurred before
    assert propose_ngram([5, 6, 5], 1, 1, 4) == [6, 5]  # cut at the end of what is known
    assert propose_ngram([5], 1, 1, 4) == []


# ---- the adaptive rule: what a proposal costs against how often it is accepted -------------


def test_step_cost_fit_recovers_fixed_per_row_and_per_context_cost():
    model = StepCostModel()
    assert model.shares() == (0.05, 0.0)  # the prior, before any step
    for _ in range(10):
        model.observe(16, 0, 0.030 + 0.002 * 16)
    assert model.coefficients() is None, "one row count cannot separate a row's cost from the fixed part"
    for i in range(60):  # steps of 16 sequences of ~100 cached tokens, some verifying 1 to 5 proposals
        runs = i % 9
        rows, context = 16 + runs * (1 + i % 5), runs * (90 + i % 20)
        model.observe(rows, context, 0.030 + 0.002 * rows + 0.0001 * context)
    fixed, per_row, per_context = model.coefficients()
    assert (fixed, per_row, per_context) == pytest.approx((0.030, 0.002, 0.0001), rel=0.02)
    assert model.shares() == pytest.approx((0.002 / 0.030, 0.0001 / 0.030), rel=0.03)
    for i in range(300):  # the machine changes (another job starts): the old steps fade out
        runs = i % 9
        rows, context = 16 + runs * (1 + i % 5), runs * (90 + i % 20)
        model.observe(rows, context, 0.030 + 0.006 * rows)
    fixed, per_row, per_context = model.coefficients()
    assert per_row == pytest.approx(0.006, rel=0.05) and per_context == pytest.approx(0.0, abs=1e-5)
    # Every EXPLORE_EVERY-th step proposes nothing: the fit's plain point at the current batch.
    assert [model.plain_step() for _ in range(2 * EXPLORE_EVERY)].count(True) == 2
    assert not any(FixedCost(0.0).plain_step() for _ in range(2 * EXPLORE_EVERY))


def test_proposals_shrink_with_acceptance_batch_size_and_verification_cost():
    cheap = (0.08, 0.0)  # a row costs 8% of a step's fixed part (about a 2-core CPU), verifying nothing more
    assert tokens_worth_proposing(1.0, cheap, 64, 5) == 5  # certain proposals pay at any batch
    assert tokens_worth_proposing(0.9, cheap, 1, 5) == 5
    assert tokens_worth_proposing(0.5, cheap, 1, 5) == 3  # 0.5^3 * 1.08 > 0.08 > 0.5^4 * 1.08
    assert tokens_worth_proposing(0.8, cheap, 16, 5) == 2  # 0.8^2 * 0.1425 > 0.08 > 0.8^3 * 0.1425
    assert tokens_worth_proposing(0.3, cheap, 16, 5) == 0
    assert tokens_worth_proposing(0.3, (0.0, 0.0), 256, 5) == 5  # free rows: always worth it
    # Verifying a long context costs more (another attention path): short runs stop paying first.
    assert tokens_worth_proposing(0.6, cheap, 4, 5, context=300) == 2
    assert tokens_worth_proposing(0.6, (0.08, 0.001), 4, 5, context=300) == 0
    assert tokens_worth_proposing(0.6, (0.08, 0.001), 1, 5, context=300) == 5
    assert tokens_worth_proposing(1.0, (0.08, 0.001), 16, 5, context=500) == 0
    assert tokens_worth_proposing(1.0, (0.08, 0.001), 16, 5, context=50) == 5


def test_what_proposing_costs_is_priced_per_position():
    """A draft model's forward per proposed position is part of a run's cost: a draft as costly as
    the target never pays, at any acceptance or batch; a tenth of it pays where acceptance is high."""
    cheap = (0.08, 0.0)
    assert tokens_worth_proposing(1.0, cheap, 1, 5, proposal_share=1.0) == 0
    assert tokens_worth_proposing(1.0, cheap, 16, 5, proposal_share=1.0) == 0
    assert tokens_worth_proposing(1.0, cheap, 1, 5, proposal_share=0.1) == 5
    # 0.6^3 * 1.08 > 0.08 + 0.1 > 0.6^4 * 1.08: the draft's cost shortens the run (3, not 5 without it)
    assert tokens_worth_proposing(0.6, cheap, 1, 5, proposal_share=0.1) == 3
    assert tokens_worth_proposing(0.6, cheap, 1, 5) == 5
    model = StepCostModel()
    assert model.proposal_share() == 0.0  # nothing proposed yet: free
    model.observe(1, 0, 0.040)
    model.observe_proposals(4, 4 * 0.010)
    assert model.proposal_share() == pytest.approx(0.25)  # against the last step while there is no fit
    for i in range(60):
        rows = 1 + i % 6
        model.observe(rows, 0, 0.030 + 0.002 * rows)
    assert model.proposal_share() == pytest.approx(0.010 / 0.030, rel=0.02)  # against the fitted fixed cost
    for _ in range(300):  # the draft got cheaper (another machine, a smaller draft): the mean follows
        model.observe_proposals(2, 2 * 0.003)
    assert model.proposal_share() == pytest.approx(0.003 / 0.030, rel=0.02)
    assert FixedCost(0.08, proposal_share=0.5).proposal_share() == 0.5


def _decoding(prompt_len: int = 8, max_tokens: int = 100):
    from types import SimpleNamespace

    request = SimpleNamespace(prompt_token_ids=list(range(prompt_len)),
                              params=SamplingParams(max_tokens=max_tokens, temperature=0.0))
    seq = llm_engine.Sequence(seq_id=0, request=request, index=0, token_ids=list(range(prompt_len)),
                              sampling_key=0, detok=None)
    seq.num_computed_tokens = prompt_len - 1
    return seq


def test_each_request_proposes_what_pays_at_this_batch_size():
    cfg = SpeculativeConfig.parse({"num_speculative_tokens": 5, "acceptance_window": 4})
    spec = Speculator(cfg, {2}, max_seq_len=1000, cost_model=FixedCost(0.08))
    copying, chatty = _decoding(), _decoding()
    for i in range(10):
        spec.record(copying, 5, 5, 6)  # every proposal accepted
        spec.record(chatty, 4, i % 2, 1 + i % 2)  # one accepted of every three tried
    assert acceptance_estimate(copying) > 0.95 and 0.2 < acceptance_estimate(chatty) < 0.4
    # One stream: a row is cheap next to the step, both propose, the middling one fewer tokens.
    assert spec.wanted_tokens(copying, 1) == 5
    assert 1 <= spec.wanted_tokens(chatty, 1) < 5
    # 16 streams: a verified row costs more than a 1-in-4 guess saves; copying still pays.
    assert spec.wanted_tokens(copying, 16) == 5
    assert [spec.wanted_tokens(chatty, 16) for _ in range(4)] == [0, 0, 0, 1], "a probe every 4 steps"
    # 64 streams: only near-certain proposals pay.
    assert spec.wanted_tokens(copying, 64) == 5 and spec.wanted_tokens(chatty, 64) == 0
    # When verifying its 8 cached tokens costs half a step, even a copying request stops at 16 streams.
    spec.cost_model = FixedCost(0.08, 0.5 / 8)
    assert spec.wanted_tokens(copying, 1) == 5 and spec.wanted_tokens(copying, 16) == 0
    # A fresh request starts from the optimistic prior; max_tokens bounds k.
    assert spec.wanted_tokens(_decoding(), 1) == 5 and spec.wanted_tokens(_decoding(max_tokens=3), 1) == 2
    # disable_by_batch_size stays vLLM's hard switch; min_acceptance_rate a floor under the rule.
    hard = Speculator(SpeculativeConfig.parse({"num_speculative_tokens": 5, "disable_by_batch_size": 4}), {2}, 1000,
                      cost_model=FixedCost(0.0))
    running = [_decoding() for _ in range(4)]
    hard.proposer = type("Echo", (), {"propose": lambda self, seq, k: [7] * k})()
    hard.propose(running, None)
    assert all(s.spec_token_ids == [] for s in running)
    hard.propose(running[:3], None)
    assert all(s.spec_token_ids == [7] * 5 for s in running[:3])
    floor = Speculator(SpeculativeConfig.parse({"num_speculative_tokens": 5, "min_acceptance_rate": 0.5}), {2}, 1000,
                       cost_model=FixedCost(0.0))
    assert floor.wanted_tokens(chatty, 1) == 0


def test_engine_feeds_its_step_times_to_the_cost_fit(spec_llm):
    engine = spec_llm.engine
    model = StepCostModel()
    engine.speculator.cost_model = model
    try:
        spec_llm.generate([[1, 2, 3, 1, 2, 3, 1, 2]] * 3, SamplingParams(max_tokens=6, temperature=0.0))
    finally:
        always_speculate(engine)
    assert model.weight > 3 and model.xty[0] > 0 and model.xtx[0][1] >= 3 * model.weight * 0.9


# ---- the bundled model --------------------------------------------------------------------


def test_greedy_and_seeded_output_equal_plain_decoding_on_the_bundled_model(smollm, spec_llm):
    """One batch of cases (the machine is small): greedy on a copying and a chat prompt, a stop
    string inside an accepted run, max_tokens at several offsets of a run, n > 1, seeded
    sampling with every truncation and penalty, and the target's logprobs."""
    copy, chat = chat_ids(smollm, COPY), chat_ids(smollm, "Name three colors.")
    cases = [(copy, SamplingParams(max_tokens=24, temperature=0.0)),
             (chat, SamplingParams(max_tokens=8, temperature=0.0)),
             (copy, SamplingParams(max_tokens=24, temperature=0.0, stop=["Kestrel"])),
             (copy, SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[smollm.engine.encode(" Kestrel",
                                                                                 False)[0]])),
             (copy, SamplingParams(max_tokens=5, temperature=0.0)),
             (copy, SamplingParams(max_tokens=10, temperature=0.0, n=2)),
             (copy, SamplingParams(max_tokens=16, temperature=0.8, top_k=40, top_p=0.95, min_p=0.02, seed=11, n=2,
                                   repetition_penalty=1.1, presence_penalty=0.2, logprobs=True, top_logprobs=2)),
             (copy, SamplingParams(max_tokens=12, temperature=0.0, logprobs=True, top_logprobs=3, min_tokens=5))]
    prompts, params = [c[0] for c in cases], [c[1] for c in cases]
    plain = smollm.generate(prompts, params)
    before = spec_llm.engine.spec_decode_stats.accepted
    spec = spec_llm.generate(prompts, params)
    assert _outs(spec) == _outs(plain)
    assert spec[2].outputs[0].finish_reason == "stop" and spec[3].outputs[0].finish_reason == "stop"
    assert spec_llm.engine.spec_decode_stats.accepted - before >= 8, "the copying prompt should accept proposals"
    for p, s in zip(plain[-2:], spec[-2:]):
        for a, b in zip(p.outputs, s.outputs):
            assert len(a.logprobs) == len(b.logprobs) == len(a.token_ids)
            for x, y in zip(a.logprobs, b.logprobs):  # the target's logprobs, as plain decoding reports them
                assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
                assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_structured_output_masks_every_proposed_position(smollm, spec_llm):
    pytest.importorskip("xgrammar")
    prompt = [chat_ids(smollm, 'Return exactly this JSON: {"ship": "Aurora", "day": "Monday", "ship2": "Aurora"}')]
    params = SamplingParams(max_tokens=24, temperature=0.0, structured_output=StructuredOutput("json_object"))
    plain, spec = smollm.generate(prompt, params), spec_llm.generate(prompt, params)
    assert _outs(spec) == _outs(plain)
    assert spec_llm.engine.spec_decode_stats.proposed > 0


# ---- tiny checkpoints of three families: any proposer, preemption, the prefix cache --------


class OracleProposer:
    """Proposes the reference greedy continuation: every proposal must be accepted."""

    def __init__(self, references: dict[tuple, list[int]]):
        self.references = references

    def propose(self, seq, k):
        full = self.references[tuple(seq.request.prompt_token_ids)]
        n = len(seq.token_ids)
        return full[n:n + k] if full[:n] == seq.token_ids else []


class RandomProposer:
    """Random tokens: almost none can be accepted, so nearly every run rolls slots back."""

    def __init__(self, vocab: int):
        self.gen = torch.Generator().manual_seed(5)
        self.vocab = vocab

    def propose(self, seq, k):
        return torch.randint(3, self.vocab, (k,), generator=self.gen).tolist()


def _check_hashes(engine: LLMEngine) -> None:
    """Every hashed block of a running sequence holds its final tokens (no rejected proposal)."""
    bs = engine.block_manager.block_size
    for seq in engine.scheduler.running:
        parent = None
        assert len(seq.block_hashes) <= seq.num_computed_tokens // bs
        for i, h in enumerate(seq.block_hashes):
            parent = hash_block(parent, seq.token_ids[i * bs:(i + 1) * bs])
            assert h == parent


def _serve(engine: LLMEngine, steps: int, check_hashes: bool = False) -> list[list[int]]:
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    tokens = {}
    for w, wave in enumerate(WAVES):
        for i, prompt in enumerate(wave):
            engine.add_request(f"w{w}p{i}", prompt, params)
            tokens[f"w{w}p{i}"] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] += out.outputs[0].token_ids
            if check_hashes:
                _check_hashes(engine)
    assert engine.num_free_blocks == engine.num_blocks
    return list(tokens.values())


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma2"])
def family(request, tmp_path_factory):
    build = {"llama": build_llama, "qwen2": build_qwen2, "gemma2": build_gemma2}[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    build(directory)
    return directory


def test_any_proposer_gives_plain_greedy_on_three_families(family):
    steps = 16
    options = dict(dtype="float32", block_size=4, max_num_batched_tokens=16, max_num_seqs=6)
    spec_options = dict(options, speculative_config=dict(NGRAM, min_acceptance_rate=0.0))
    reference = _serve(LLMEngine(str(family), num_kv_blocks=96, **options), steps)
    references = {tuple(p): p + t for p, t in zip([p for wave in WAVES for p in wave], reference)}
    cases = {"ngram": None, "oracle": OracleProposer(references), "random": RandomProposer(320)}
    for name, proposer in cases.items():
        engine = always_speculate(LLMEngine(str(family), num_kv_blocks=96, **spec_options))
        if proposer is not None:
            engine.speculator.proposer = proposer
        assert _serve(engine, steps, check_hashes=True) == reference, name
        stats = engine.spec_decode_stats
        assert engine.block_manager.prefix_hits >= 16, "the second wave should hit the prefix cache"
        assert stats.proposed > 0, name
        if name == "oracle":
            assert stats.accepted == stats.proposed
        if name == "random":
            assert stats.accepted <= 0.1 * stats.proposed
    # A cache too small for the first wave: sequences are preempted and recomputed mid-speculation.
    small = always_speculate(LLMEngine(str(family), num_kv_blocks=18, **spec_options))
    small.speculator.proposer = OracleProposer(references)
    assert _serve(small, steps, check_hashes=True) == reference
    assert small.scheduler.num_preemptions > 0


# ---- the sampled distribution ----------------------------------------------------------


def _chi_square_p(a: Counter, b: Counter) -> float:
    """Two-sample chi-square test of homogeneity; bins with few counts are pooled."""
    keys = [k for k in set(a) | set(b) if a[k] + b[k] >= 10]
    rows = [(a[k], b[k]) for k in keys]
    rest = (sum(a.values()) - sum(r[0] for r in rows), sum(b.values()) - sum(r[1] for r in rows))
    if sum(rest):
        rows.append(rest)
    obs = torch.tensor(rows, dtype=torch.float64)
    expected = obs.sum(1, keepdim=True) * obs.sum(0, keepdim=True) / obs.sum()
    stat = ((obs - expected) ** 2 / expected).sum()
    df = len(rows) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


def test_sampled_distribution_is_the_targets_and_naive_acceptance_is_not(tmp_path, monkeypatch):
    build_llama(tmp_path)
    # A sharper LM head, so the tiny model is as confident as a real one and its own greedy text
    # (the prompt) makes n-gram proposals that are accepted often and rejected often.
    weights = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["lm_head.weight"] *= 6.0
    save_file(tensors, weights, metadata={"format": "pt"})
    options = dict(dtype="float32", num_kv_blocks=2000, block_size=16, max_num_seqs=64)
    plain = LLMEngine(str(tmp_path), **options)
    spec = always_speculate(LLMEngine(str(tmp_path), speculative_config=dict(NGRAM, min_acceptance_rate=0.0),
                                      **options))
    prompt = [5, 17, 100] + _generate(plain, [([5, 17, 100], SamplingParams(max_tokens=80, temperature=0.0,
                                                                                 ignore_eos=True))])[0]
    draws = 200
    cases = [dict(temperature=1.0), dict(temperature=0.9, top_k=20, top_p=0.9, presence_penalty=0.5)]

    def sample(engine, seeds, p):
        return _generate(engine, [(prompt, SamplingParams(max_tokens=3, seed=s, ignore_eos=True, **p))
                                  for s in seeds])

    references = []
    for p in cases:
        reference = sample(plain, range(draws, 2 * draws), p)  # other seeds: independent draws
        references.append(reference)
        proposed, accepted = spec.spec_decode_stats.proposed, spec.spec_decode_stats.accepted
        got = sample(spec, range(draws), p)
        proposed, accepted = spec.spec_decode_stats.proposed - proposed, spec.spec_decode_stats.accepted - accepted
        assert 15 <= accepted <= proposed - 15, "the rule should both accept and reject often"
        for pos in (1, 2):
            assert _chi_square_p(Counter(t[pos] for t in got), Counter(t[pos] for t in reference)) > 1e-3, (p, pos)
    # The mutation: accepting every proposal unchecked must be caught by the same test.
    monkeypatch.setattr(llm_engine, "accepted_prefix", lambda proposed, target: len(proposed))
    naive = sample(spec, range(draws), cases[0])
    assert _chi_square_p(Counter(t[1] for t in naive), Counter(t[1] for t in references[0])) < 1e-3


def _generate(engine: LLMEngine, requests: list) -> list[list[int]]:
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
    got = {f"r{i}": [] for i in range(len(requests))}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.outputs[0].token_ids
    return list(got.values())


# ---- interfaces: the config file, the CLI flag, /metrics ----------------------------------


def test_config_file_and_cli_flag_carry_the_speculative_config(tmp_path):
    from lmserve.cli import build_parser
    from lmserve.config import ConfigError, load_config

    f = tmp_path / "c.yaml"
    f.write_text('models:\n  - {id: a, path: x.gguf, engine: {speculative_config: {method: ngram, '
                 'num_speculative_tokens: 3, prompt_lookup_max: 2}}}\n')
    assert load_config(str(f)).models[0].engine.options()["speculative_config"]["num_speculative_tokens"] == 3
    f.write_text('models:\n  - {id: a, path: x.gguf, engine: {speculative_config: {num_speculative_tokens: 0}}}\n')
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        load_config(str(f))
    flag = '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}'
    args = build_parser().parse_args(["serve", "--speculative-config", flag])
    cfg = load_config(None, speculative_config=args.speculative_config)
    assert cfg.models[0].engine.options()["speculative_config"] == json.loads(flag)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--speculative-config", '{"num_speculative_tokens": "many"}'])


def test_metrics_count_proposed_accepted_and_emitted_tokens(spec_llm):
    from types import SimpleNamespace

    from lmserve.backends.local import LocalBackend
    from lmserve.server.metrics import Metrics

    backend = SimpleNamespace(engine=spec_llm.engine)
    backend.stats = lambda: LocalBackend.stats(backend)  # the real snapshot of the real engine
    stats = spec_llm.engine.spec_decode_stats
    if not stats.runs:
        spec_llm.generate([[1, 2, 3, 1, 2, 3, 1, 2]], SamplingParams(max_tokens=4, temperature=0.0))
    text = Metrics({"m": backend}).render().decode()
    assert f'lmserve_spec_decode_num_draft_tokens_total{{model="m"}} {float(stats.proposed)}' in text
    assert f'lmserve_spec_decode_num_accepted_tokens_total{{model="m"}} {float(stats.accepted)}' in text
    assert f'lmserve_spec_decode_acceptance_rate_count{{model="m"}} {float(stats.runs)}' in text
