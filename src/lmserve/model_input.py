"""One step's work for the model as plain data: lists of ints, nothing request-shaped.

It sits below the layers that read it: the engine builds it (engine/batch.py flattens a
scheduled batch into one), the model runner and the attention backends read it, and a
tensor-parallel worker in another process receives it. Keeping it out of engine/ lets
attention/ depend on nothing above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelInput:
    """Sequences in batch order, decodes (one new token each) first, then prefill chunks."""

    token_ids: list[int]  # the new tokens of every sequence, flattened in batch order
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens already in the cache before this step, per sequence
    block_tables: list[list[int]]  # per sequence
    num_decodes: int  # the first num_decodes sequences decode (query_len 1)
    logit_rows: list[int]  # flattened rows whose next-token logits are wanted, in sampling order
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write before the step
    # Prompt logprobs (engine/prompt_logprobs.py): rows whose logprob of the next prompt token
    # (and top k alternatives) is wanted; empty in the steps of requests that do not ask.
    score_rows: list[int] = field(default_factory=list)
    score_targets: list[int] = field(default_factory=list)
    score_top_k: int = 0

    @property
    def positions(self) -> list[int]:
        return [p for c, q in zip(self.context_lens, self.query_lens) for p in range(c, c + q)]

    def decode_slots(self, block_size: int) -> list[int]:
        """The cache slot of each decoding sequence's new token (it sits right after its cached
        context: position context_len, in that position's block of the sequence's table)."""
        bs = block_size
        return [t[p // bs] * bs + p % bs
                for t, p in zip(self.block_tables[:self.num_decodes], self.context_lens[:self.num_decodes])]
