"""POST /v1/completions framing (the legacy prompt API): the backend's chat chunks, re-shaped as
text_completion objects. The backend runs the prompt exactly as for chat (same engine stream,
same sampling), so only the envelope differs: `text` instead of `delta.content`, the legacy
logprobs shape, and `echo` putting the prompt in front of each choice (with `logprobs`: the
prompt's own scores in the legacy shape, so `max_tokens: 0` scores a text)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from lmserve.backends.base import PROMPT_SCORES, Backend, ChatJob
from lmserve.server.chat import Timing, completion_chunks
from lmserve.server.metrics import Metrics
from lmserve.server.prompt_scores import legacy_prompt_logprobs, vllm_prompt_logprobs


async def text_chunks(backend: Backend, job: ChatJob, metrics: Metrics, timing: Timing, echo: str | None,
                      echo_logprobs: int | None = None, prompt_logprobs: int | None = None) -> AsyncIterator[dict]:
    """`echo_logprobs`: the echoed prompt carries legacy logprobs with this many alternatives (the
    echo then waits for the prompt's scores); `prompt_logprobs`: vLLM's field, in a chunk of its
    own that the collected response puts on every choice (where vLLM has it)."""
    base = {"id": job.request_id, "object": "text_completion", "created": job.created, "model": job.model}
    # Character offset of each choice's next token in the text the client sees (legacy logprobs).
    offsets = [len(echo or "")] * job.n
    scored = echo_logprobs is not None and echo is not None
    async for chunk in completion_chunks(backend, job, metrics, timing):
        entries = chunk.get(PROMPT_SCORES)
        if entries is not None:
            if prompt_logprobs is not None:  # only for a collected response (not on a stream, as in vLLM)
                yield {**base, "choices": [], "usage": None,
                       "prompt_logprobs": vllm_prompt_logprobs(entries, prompt_logprobs)}
            if scored:
                legacy = legacy_prompt_logprobs(entries, echo_logprobs)
                for i in range(job.n):
                    yield {**base, "choices": [_choice(i, echo, legacy, None)], "usage": None}
            continue
        if not chunk["choices"]:  # the usage chunk
            yield {**base, "choices": [], "usage": chunk["usage"]}
            continue
        for c in chunk["choices"]:
            i = c["index"]
            delta = c.get("delta") or {}
            if "role" in delta:  # a choice opens: its echo, if asked (and not waiting for scores)
                if echo and not scored:
                    yield {**base, "choices": [_choice(i, echo, None, None)], "usage": None}
                continue
            logprobs = _legacy_logprobs(c.get("logprobs"), offsets, i) if job.logprobs else None
            yield {**base, "choices": [_choice(i, delta.get("content") or "", logprobs, c.get("finish_reason"))],
                   "usage": None}


async def collect_text(backend: Backend, job: ChatJob, metrics: Metrics, timing: Timing, echo: str | None,
                       echo_logprobs: int | None = None, prompt_logprobs: int | None = None) -> dict:
    """The non-streamed response: the same chunks, folded."""
    n = job.n
    texts = [""] * n
    finish: list[str | None] = [None] * n
    logprobs: list[dict | None] = [_empty_logprobs() if job.logprobs else None for _ in range(n)]
    scores = None
    async for chunk in text_chunks(backend, job, metrics, timing, echo, echo_logprobs, prompt_logprobs):
        scores = chunk.get("prompt_logprobs", scores)
        for c in chunk["choices"]:
            i = c["index"]
            texts[i] += c["text"]
            finish[i] = c["finish_reason"] or finish[i]
            if c["logprobs"]:
                for key, values in c["logprobs"].items():
                    logprobs[i][key] += values
    choices = [_choice(i, texts[i], logprobs[i], finish[i]) for i in range(n)]
    if prompt_logprobs is not None:
        for c in choices:
            c["prompt_logprobs"] = scores
    return {"id": job.request_id, "object": "text_completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": job.usage}


def _choice(index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _empty_logprobs() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _legacy_logprobs(chat_logprobs: dict | None, offsets: list[int], index: int) -> dict:
    """Chat logprob entries -> {tokens, token_logprobs, top_logprobs, text_offset}; each
    top_logprobs dict holds the sampled token and its alternatives."""
    out = _empty_logprobs()
    for entry in (chat_logprobs or {}).get("content") or []:
        out["tokens"].append(entry["token"])
        out["token_logprobs"].append(entry["logprob"])
        top = {entry["token"]: entry["logprob"]}
        top.update({alt["token"]: alt["logprob"] for alt in entry.get("top_logprobs") or []})
        out["top_logprobs"].append(top)
        out["text_offset"].append(offsets[index])
        offsets[index] += len(entry["token"])
    return out
