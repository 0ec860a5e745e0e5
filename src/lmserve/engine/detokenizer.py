"""Incremental detokenization with stop strings.

Text is decoded over a small sliding window of tokens (as vLLM does), so the cost per token stays
constant, and a window that ends inside a multi-byte character (U+FFFD at the end) waits for the
next token: a half character is never emitted. Text that could still be the start of a stop
string is held back until it either completes the stop string (then it is cut) or cannot.

Special tokens are left out of the text, except a family's tool-call markers: a tokenizer may
flag DeepSeek-V2.5's `<｜tool▁calls▁begin｜>` special, and the tool-call reader needs to see it.
"""

from __future__ import annotations

from collections.abc import Iterable

_REPLACEMENT = "\ufffd"


def hidden_special_ids(tokenizer, visible: Iterable[str]) -> frozenset[int] | None:
    """The special token ids to leave out of decoded text when the `visible` ones must stay in;
    None when no visible token is special in this tokenizer (then plain skip_special_tokens)."""
    visible = list(visible)
    if tokenizer is None or not visible:
        return None
    vocab = tokenizer.get_vocab()
    keep = {vocab[t] for t in visible if t in vocab}
    special = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    special |= set(tokenizer.all_special_ids)
    if not keep & special:
        return None
    return frozenset(special - keep)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None, hidden_ids: frozenset[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.hidden_ids = hidden_ids  # None: every special token is hidden
        self.skip_special_tokens = skip_special_tokens  # False: show every special token (vLLM's field)
        self.stop = stop or []
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # decoded text so far (stop string cut off once matched)
        self.emitted = 0  # characters of `text` already handed out

    def _decode(self, ids: list[int]) -> str:
        if not self.skip_special_tokens:
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        if self.hidden_ids is None:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode([i for i in ids if i not in self.hidden_ids], skip_special_tokens=False)

    def add_token(self, token_id: int) -> str | None:
        """Append one generated token. Returns the stop string if one now matches."""
        if self.tokenizer is None:
            return None
        self.token_ids.append(token_id)
        window = self._decode(self.token_ids[self.prefix_offset:])
        if window.endswith(_REPLACEMENT):
            return None  # an incomplete UTF-8 sequence: wait for the rest of it
        return self._advance(window)

    def flush(self) -> str | None:
        """At the end of generation: decode tokens still waiting for a character to complete,
        dropping the incomplete tail. Returns the stop string if one now matches."""
        if self.tokenizer is None or self.read_offset == len(self.token_ids):
            return None
        return self._advance(self._decode(self.token_ids[self.prefix_offset:]).rstrip(_REPLACEMENT))

    def _advance(self, window: str) -> str | None:
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = window[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        if not new_text:
            return None
        search_from = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += new_text
        # The earliest match wins when several stop strings occur in the new text.
        matches = [(idx, s) for s in self.stop if (idx := self.text.find(s, search_from)) != -1]
        if not matches:
            return None
        idx, stop = min(matches)
        self.text = self.text[:idx]
        return stop

    def take_delta(self, finished: bool) -> str:
        """Text that is safe to emit now; everything left when the sequence has finished."""
        end = len(self.text)
        if not finished:
            end -= self._held_back()
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        if not self.stop:
            return 0
        best = 0
        tail = self.text[-self.max_stop_len:]
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best
