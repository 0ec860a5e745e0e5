"""The engine's speculation policy: who gets proposals this step, how many, and bookkeeping of
what verification accepted (each request's acceptance estimate, the step-cost fit, the stats).

How many tokens a request proposes (the adaptive rule, cost_model.py): each request keeps an
estimate of its per-token acceptance (decayed counts of accepted and rejected proposals: recent
runs weigh most), the engine keeps a fit of its step time against query rows and what the
verifying sequences attend to, and a request proposes the number of tokens whose expected gain at this batch size
most exceeds what verifying them costs (none if no number gains). `disable_by_batch_size`
(vLLM's) stays a hard switch on top when given.
"""

from __future__ import annotations

import time

from lmserve.engine.spec_decode.config import SpeculativeConfig
from lmserve.engine.spec_decode.cost_model import StepCostModel, tokens_worth_proposing
from lmserve.engine.spec_decode.ngram import NgramProposer
from lmserve.engine.spec_decode.stats import SpecDecodeStats
from lmserve.engine.spec_decode.verify import walk_grammar

# A request's acceptance estimate: accepted and tried proposal counts, both decayed by this per
# verified run (about the last five runs count), starting from the Sequence's defaults (1.6 of
# 2: an optimistic guess worth two proposals, so a new request tries speculation before its own
# evidence decides).
ACCEPTANCE_DECAY = 0.8


def acceptance_estimate(seq) -> float:
    return seq.spec_accepted / seq.spec_tried


def update_acceptance(seq, proposed: int, accepted: int) -> None:
    """One verified run: `accepted` proposals stood, and if fewer than all, the next one was a
    rejection (the ones after it were never tested: they say nothing about the acceptance)."""
    seq.spec_accepted = ACCEPTANCE_DECAY * seq.spec_accepted + accepted
    seq.spec_tried = ACCEPTANCE_DECAY * seq.spec_tried + accepted + (accepted < proposed)


class PerSequence:
    """Adapts a proposer with `propose(seq, k) -> tokens` (one sequence at a time, as n-gram
    lookup) to the batched seam `propose_all([(seq, k), ...]) -> [tokens, ...]`."""

    def __init__(self, proposer):
        self.proposer = proposer

    def propose_all(self, wanted: list) -> list[list[int]]:
        return [list(self.proposer.propose(seq, k))[:k] for seq, k in wanted]


class Speculator:
    """`proposer` is the seam: `propose_all([(seq, k), ...])` returning at most k tokens guessed
    to follow each `seq.token_ids` (a draft model batches them), or `propose(seq, k)` for one
    (n-gram lookup, the default). Verification makes any proposer exact, so a bad one costs
    speed, never correctness. `cost_model` is the step-time fit (tests inject a fixed one)."""

    def __init__(self, config: SpeculativeConfig, eos_token_ids: set[int], max_seq_len: int, proposer=None,
                 cost_model=None):
        self.config = config
        self.proposer = proposer or NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.cost_model = cost_model or StepCostModel()
        self.eos_token_ids = eos_token_ids
        self.max_seq_len = max_seq_len
        self.stats = SpecDecodeStats()

    def wanted_tokens(self, seq, batch_size: int, shares: tuple[float, float] | None = None,
                      proposal_share: float | None = None) -> int:
        """How many tokens `seq` should propose this step (0: decode without); `shares` and
        `proposal_share` are the cost model's reading (taken once per step by `propose`)."""
        cfg = self.config
        params = seq.params
        # At most one token past the proposals is emitted: never propose past max_tokens or the context.
        most = min(cfg.num_speculative_tokens, params.max_tokens - seq.num_output_tokens - 1,
                   self.max_seq_len - seq.num_tokens - 1)
        if most < 1:
            return 0
        acceptance = acceptance_estimate(seq)
        k = 0
        if acceptance >= cfg.min_acceptance_rate:
            shares = shares if shares is not None else self.cost_model.shares()
            if proposal_share is None:
                proposal_share = self.cost_model.proposal_share()
            k = tokens_worth_proposing(acceptance, shares, batch_size, most, seq.num_tokens, proposal_share)
        if k:
            seq.spec_idle_steps = 0
            return k
        # Not worth it on the evidence so far; but the text may turn to copying later, and the
        # estimate only learns from runs: every acceptance_window steps it gets one probe token.
        seq.spec_idle_steps += 1
        if seq.spec_idle_steps >= cfg.acceptance_window:
            seq.spec_idle_steps = 0
            return 1
        return 0

    def propose(self, running: list, grammar_backend) -> None:
        """Set `spec_token_ids` (and grammar masks) of every running sequence: proposals for those
        about to decode, none for the rest."""
        cfg = self.config
        off = cfg.disable_by_batch_size is not None and len(running) >= cfg.disable_by_batch_size
        off = self.cost_model.plain_step() or off
        shares, proposal_share = self.cost_model.shares(), self.cost_model.proposal_share()
        wanted = []
        for seq in running:
            seq.spec_token_ids, seq.spec_masks = [], []
            if off or seq.num_computed_tokens != seq.num_tokens - 1:
                continue
            k = self.wanted_tokens(seq, len(running), shares, proposal_share)
            if k:
                wanted.append((seq, k))
        if not wanted:
            return
        proposer = self.proposer if hasattr(self.proposer, "propose_all") else PerSequence(self.proposer)
        started = time.perf_counter()
        proposals = proposer.propose_all(wanted)
        # What making them cost (a draft's forwards): priced per position by the adaptive rule.
        self.cost_model.observe_proposals(max(k for _, k in wanted), time.perf_counter() - started)
        for (seq, k), proposed in zip(wanted, proposals):
            proposed = list(proposed)[:k]
            params = seq.params
            # A proposal ends before an end token: what would follow it is never needed.
            ends = params.stop_token_ids if params.ignore_eos else (*self.eos_token_ids, *params.stop_token_ids)
            for i, token in enumerate(proposed):
                if token in ends:
                    proposed = proposed[:i]
                    break
            if proposed and seq.grammar is not None:
                proposed, seq.spec_masks = walk_grammar(seq.grammar, grammar_backend, proposed)
            seq.spec_token_ids = proposed

    def observe_step(self, rows: int, context: int, seconds: float) -> None:
        """A step of decodes and verifications only (no prompt chunk) took `seconds` for `rows`
        query rows, the sequences verifying proposals having `context` cached tokens."""
        self.cost_model.observe(rows, context, seconds)

    def record(self, seq, proposed: int, accepted: int, emitted: int) -> None:
        """One verified run: the stats, and the request's acceptance estimate."""
        self.stats.record(proposed, accepted, emitted)
        update_acceptance(seq, proposed, accepted)

    def release(self, seq) -> None:
        """`seq` finished, was aborted or preempted: a proposer with per-sequence state drops it."""
        release = getattr(self.proposer, "release", None)
        if release is not None:
            release(seq)
