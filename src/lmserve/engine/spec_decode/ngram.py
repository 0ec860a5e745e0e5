"""N-gram prompt lookup (vLLM's `ngram` method): the next tokens are guessed by finding the
sequence's last n tokens earlier in its own prompt and output, and proposing what followed them.

Answers that copy their input (summaries, extraction, code edits, RAG) repeat long runs of the
prompt, which this finds for the price of a substring search: no second model, no extra forward.
"""

from __future__ import annotations

import numpy as np


class NgramProposer:
    """The proposer seam's n-gram implementation: `propose(seq, k)` -> up to k token ids."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seq, k: int) -> list[int]:
        return propose_ngram(seq.token_ids, self.min_n, self.max_n, k)


def propose_ngram(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens following the earliest earlier occurrence of the longest suffix of
    `tokens` of length in [min_n, max_n] (longer matches first, as vLLM); [] when none matches."""
    length = len(tokens)
    if k < 1 or length <= min_n:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = arr[length - n:]
        # Windows that start before the suffix itself and leave at least one token after them.
        windows = np.lib.stride_tricks.sliding_window_view(arr[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[0]) + n
            return tokens[start:start + k]
    return []
