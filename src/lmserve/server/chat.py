"""POST /v1/chat/completions framing: a backend's chunks -> SSE events or one folded response.

Streaming is the primitive: the backend yields chat.completion.chunk dicts, and the
non-streamed response is built by folding those same chunks, so the two can never disagree.
Latency and token metrics are taken here, on what the client actually receives.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from lmserve.backends.base import PROMPT_SCORES, Backend, ChatJob
from lmserve.server.errors import APIError
from lmserve.server.metrics import Metrics
from lmserve.server.prompt_scores import vllm_prompt_logprobs


class Timing:
    """When the first token and the last chunk reached the client (perf_counter seconds)."""

    def __init__(self, arrival: float):
        self.arrival = arrival
        self.first_token: float | None = None
        self.last: float | None = None

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else (self.first_token - self.arrival) * 1000


async def completion_chunks(backend: Backend, job: ChatJob, metrics: Metrics, timing: Timing) -> AsyncIterator[dict]:
    """The backend's chunks as they come, then the usage chunk if asked."""
    async for chunk in backend.stream(job):
        if any(c.get("finish_reason") or _has_output(c) for c in chunk["choices"]):
            now = time.perf_counter()
            if timing.first_token is None:
                timing.first_token = now
                metrics.ttft.labels(job.model).observe(now - timing.arrival)
            else:
                metrics.itl.labels(job.model).observe(now - timing.last)
            timing.last = now
        yield chunk
    metrics.e2e.labels(job.model).observe(time.perf_counter() - timing.arrival)
    if job.include_usage:
        yield {"id": job.request_id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
               "choices": [], "usage": job.usage}


def _has_output(choice: dict) -> bool:
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("tool_calls") or choice.get("logprobs"))


async def collect_completion(backend: Backend, job: ChatJob, metrics: Metrics, timing: Timing) -> dict:
    """The non-streamed response: the same chunks, folded."""
    n = job.n
    texts = [""] * n
    calls: list[list] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    logprobs: list[list | None] = [None] * n
    scores = None
    async for chunk in completion_chunks(backend, job, metrics, timing):
        scores = chunk.get(PROMPT_SCORES, scores)
        for c in chunk["choices"]:
            i = c["index"]
            texts[i] += c["delta"].get("content") or ""
            calls[i] += [{k: v for k, v in call.items() if k != "index"} for call in c["delta"].get("tool_calls", [])]
            finish[i] = c["finish_reason"] or finish[i]
            if c.get("logprobs"):
                logprobs[i] = (logprobs[i] or []) + (c["logprobs"].get("content") or [])
    choices = [{"index": i, "message": _message(texts[i], calls[i]), "finish_reason": finish[i],
                "logprobs": {"content": logprobs[i] or []} if job.logprobs else None} for i in range(n)]
    body = {"id": job.request_id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": job.usage}
    if job.prompt_logprobs is not None:  # vLLM's field (the request asked for prompt_logprobs)
        body["prompt_logprobs"] = vllm_prompt_logprobs(scores or [], job.prompt_logprobs)
    return body


def _message(text: str, calls: list[dict]) -> dict:
    if calls:  # text around the calls (some formats allow it) stays the content
        return {"role": "assistant", "content": text or None, "tool_calls": calls}
    return {"role": "assistant", "content": text}


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def stream_error_event(err: APIError) -> bytes:
    return sse(err.body())
