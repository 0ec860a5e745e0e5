"""Prompt logprobs in the two shapes clients know.

The local backend sends a request's prompt scores once, as a chunk of its own (`PROMPT_SCORES`
key, no choices) ahead of the first generated text: one entry per prompt token, the first with no
logprob, each `{"token_id", "token", "logprob", "rank", "top": [[token_id, token, logprob], ...]}`.
The framing turns them into:
- vLLM's `prompt_logprobs` response field: `[null, {"<token id>": {"logprob", "rank",
  "decoded_token"}, ...}, ...]`, the prompt token first, then the top k (ranks 1..k);
- OpenAI's legacy completion logprobs over the echoed prompt: `tokens`, `token_logprobs` (null
  first), `top_logprobs` (null first; else the token and its top k alternatives by text),
  `text_offset`.
"""

from __future__ import annotations

from lmserve.backends.base import PROMPT_SCORES

__all__ = ["PROMPT_SCORES", "legacy_prompt_logprobs", "vllm_prompt_logprobs"]


def vllm_prompt_logprobs(entries: list[dict], k: int) -> list[dict | None]:
    out: list[dict | None] = [None]
    for e in entries[1:]:
        d = {str(e["token_id"]): {"logprob": e["logprob"], "rank": e["rank"], "decoded_token": e["token"]}}
        for rank, (token_id, token, logprob) in enumerate(e["top"][:k], start=1):
            d.setdefault(str(token_id), {"logprob": logprob, "rank": rank, "decoded_token": token})
        out.append(d)
    return out


def legacy_prompt_logprobs(entries: list[dict], k: int) -> dict:
    """The echoed prompt's legacy logprobs (offsets: the tokens' texts end to end)."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for i, e in enumerate(entries):
        out["tokens"].append(e["token"])
        out["text_offset"].append(offset)
        offset += len(e["token"])
        if i == 0:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(e["logprob"])
        top = {e["token"]: e["logprob"]}
        for _, token, logprob in e["top"][:k]:
            top.setdefault(token, logprob)
        out["top_logprobs"].append(top)
    return out
