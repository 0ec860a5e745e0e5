"""The engine's logprobs as the API's entries: each token id with its text (and, for sampled
tokens, its raw bytes), for the local backend's chunks."""

from __future__ import annotations

from lmserve.engine.tokenizer import token_bytes
from lmserve.outputs import TokenLogprob


def prompt_entries(tokenizer, prompt_ids: list[int], scores: list[TokenLogprob | None]) -> list[dict]:
    """A scored prompt's entries (server/prompt_scores.py reads them); the first token has no score.
    Blocking for a long prompt (thousands of token texts): call it off the event loop."""
    texts: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in texts:
            texts[token_id] = tokenizer.decode([token_id]) if tokenizer else ""
        return texts[token_id]

    entries = [{"token_id": prompt_ids[0], "token": text(prompt_ids[0]), "logprob": None, "rank": None, "top": []}]
    for lp in scores[1:]:
        entries.append({"token_id": lp.token_id, "token": text(lp.token_id), "logprob": lp.logprob,
                        "rank": lp.rank, "top": [[t, text(t), v] for t, v in lp.top]})
    return entries


def logprob_entry(tokenizer, lp: TokenLogprob) -> dict:
    """A sampled token's chat logprobs entry, with its alternatives."""
    raw = token_bytes(tokenizer)

    def entry(token_id: int, logprob: float) -> dict:
        # `bytes` is the token's own bytes, so a client can rebuild text split mid-character.
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(raw[token_id]) if token_id < len(raw) else []}

    return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
