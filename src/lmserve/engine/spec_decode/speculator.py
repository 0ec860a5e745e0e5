"""The engine's speculation policy: who gets proposals this step, how many, and bookkeeping of
what verification accepted (the adaptive off-switches and the stats)."""

from __future__ import annotations

from lmserve.engine.spec_decode.config import SpeculativeConfig
from lmserve.engine.spec_decode.ngram import NgramProposer
from lmserve.engine.spec_decode.stats import SpecDecodeStats
from lmserve.engine.spec_decode.verify import walk_grammar


class Speculator:
    """`proposer` is the seam: any object with `propose(seq, k) -> list[int]` (at most k tokens
    guessed to follow `seq.token_ids`); n-gram lookup by default. Verification makes any
    proposer exact, so a bad one costs speed, never correctness."""

    def __init__(self, config: SpeculativeConfig, eos_token_ids: set[int], max_seq_len: int, proposer=None):
        self.config = config
        self.proposer = proposer or NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.eos_token_ids = eos_token_ids
        self.max_seq_len = max_seq_len
        self.stats = SpecDecodeStats()
        self.steps = 0

    def propose(self, running: list, grammar_backend) -> None:
        """Set `spec_token_ids` (and grammar masks) of every running sequence: proposals for those
        about to decode, none for the rest."""
        self.steps += 1
        cfg = self.config
        off = cfg.disable_by_batch_size is not None and len(running) >= cfg.disable_by_batch_size
        for seq in running:
            seq.spec_token_ids, seq.spec_masks = [], []
            if off or seq.num_computed_tokens != seq.num_tokens - 1 or seq.spec_paused_until > self.steps:
                continue
            params = seq.params
            # At most one token past the proposals is emitted: never propose past max_tokens or the context.
            k = min(cfg.num_speculative_tokens, params.max_tokens - seq.num_output_tokens - 1,
                    self.max_seq_len - seq.num_tokens - 1)
            if k < 1:
                continue
            proposed = list(self.proposer.propose(seq, k))[:k]
            # A proposal ends before an end token: what would follow it is never needed.
            ends = params.stop_token_ids if params.ignore_eos else (*self.eos_token_ids, *params.stop_token_ids)
            for i, token in enumerate(proposed):
                if token in ends:
                    proposed = proposed[:i]
                    break
            if proposed and seq.grammar is not None:
                proposed, seq.spec_masks = walk_grammar(seq.grammar, grammar_backend, proposed)
            seq.spec_token_ids = proposed

    def record(self, seq, proposed: int, accepted: int, emitted: int) -> None:
        """One verified run; a request whose window of proposals was mostly rejected stops
        proposing for a while (each rejected proposal cost a verified row for nothing)."""
        self.stats.record(proposed, accepted, emitted)
        seq.spec_window_proposed += proposed
        seq.spec_window_accepted += accepted
        window = self.config.acceptance_window
        if seq.spec_window_proposed >= window:
            if seq.spec_window_accepted < self.config.min_acceptance_rate * seq.spec_window_proposed:
                seq.spec_paused_until = self.steps + window
            seq.spec_window_proposed = seq.spec_window_accepted = 0
