"""Verification: the target's own draws decide which proposed tokens stand.

A run of k proposed tokens d_1..d_k is verified by one forward over the last real token and the
proposals: row j holds the target's next-token logits after d_1..d_j. The sampler draws the
target's token t_j at every row exactly as the engine without speculation would at that output
position (same penalties, min_tokens, grammar state and counter-based noise: the noise of a
position depends only on the request's seed and the position, never on the batch). The run keeps
d_1..d_a, the longest prefix with d_j = t_j, and then t_{a+1}, the target's own token.

Greedy requests: t_j is the argmax, so the output is token for token the non-speculative one.
Sampled requests: a proposer that proposes one token per position (n-gram lookup) is a draft
distribution q = one-hot(d). Leviathan et al.'s rule accepts d with probability min(1, p(d)/q(d))
= p(d) and otherwise draws from norm(max(0, p - q)) = p without d. Drawing t ~ p and accepting
when t = d does exactly that: P(accept) = p(d), and a rejected draw is t ~ p conditioned on t != d.
So the output distribution is the target's, and since the draws are the ones the engine makes
without speculation, a seeded request even gets the same tokens with speculation on or off.
"""

from __future__ import annotations

import torch

from lmserve.engine.sequence import TokensSoFar


def accepted_prefix(proposed: list[int], target: list[int]) -> int:
    """How many of `proposed` stand: the longest prefix equal to the target's draws
    (target has one more entry, the token after the last proposal)."""
    a = 0
    for d, t in zip(proposed, target):
        if d != t:
            break
        a += 1
    return a


class FrozenMask:
    """A grammar's allowed-token bitmask at one proposed position, computed when the proposal was
    walked through the matcher; fills the sampler's bitmask as a matcher would."""

    __slots__ = ("row",)

    def __init__(self, row: torch.Tensor):
        self.row = row

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        bitmask[index] = self.row


def walk_grammar(matcher, backend, proposed: list[int]) -> tuple[list[int], list[FrozenMask]]:
    """The proposal cut where the grammar rejects a token, and the grammar's mask after each kept
    token (positions 1..len). The matcher is left as it was (rolled back)."""
    masks = []
    kept = 0
    for token in proposed:
        if not matcher.accept_token(token):
            break
        kept += 1
        bitmask = backend.allocate_bitmask(1)
        matcher.fill_next_token_bitmask(bitmask, 0)
        masks.append(FrozenMask(bitmask[0].clone()))
    if kept:
        matcher.rollback(kept)
    return proposed[:kept], masks


class DraftPosition(TokensSoFar):
    """Proposed position j of a sequence as the sampler sees it: the sequence with its first j
    proposed tokens appended (penalties, min_tokens and the noise's output position follow them),
    and the grammar's state after them."""

    __slots__ = ("request", "token_ids", "sampling_key", "grammar")

    def __init__(self, seq, prefix: list[int], grammar):
        self.request = seq.request
        self.token_ids = seq.token_ids + prefix
        self.sampling_key = seq.sampling_key
        self.grammar = grammar

    @property
    def params(self):
        return self.request.params


def sampling_rows(seq) -> list:
    """What the sampler draws from at each verified row of `seq`: itself, then its positions
    after each proposed token."""
    spec = seq.spec_token_ids
    masks = seq.spec_masks
    return [seq] + [DraftPosition(seq, spec[:j], masks[j - 1] if seq.grammar is not None else None)
                    for j in range(1, len(spec) + 1)]
