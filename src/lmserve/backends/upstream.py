"""A model served by an upstream OpenAI-compatible API (`Vendor-A/<id>` deployments).

The request is forwarded as validated (model renamed to the upstream's id, always streamed with
usage, so the platform settles real token counts), and the upstream's chunks are re-framed into
ours: our chunk id (with our trace id), our model id, our `created`.

Failures, as the client sees them:
- connection refused/reset, or a 5xx, before the first byte: retried (`retries` times per URL,
  short backoff), then the next URL in `base_urls` (failover); when every one fails: 502.
- connect or read timeout: 504 (a read timeout is not retried: the upstream may be working on it).
- upstream 429: 429 with its Retry-After; other 4xx: the same status with the upstream's message.
- the stream breaks after the first byte (dropped connection, no [DONE]): an error event (502)
  after what was already sent; nothing is retried once the client has output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from lmserve.backends.base import Capabilities, ChatJob, Health
from lmserve.chat.schemas import ChatCompletionRequest
from lmserve.config import ModelDeployment
from lmserve.errors import BackendError, InvalidParameter

log = logging.getLogger("lmserve.backends.upstream")

_RETRY_BACKOFF_S = 0.2


@dataclass
class _UpstreamState:
    body: dict[str, Any]
    response: httpx.Response | None = None


class UpstreamBackend:
    """Implements Backend only (backends/base.py): chat completions, forwarded."""

    capabilities = Capabilities()  # no legacy completions, no tokenizer, no prompt scores

    def __init__(self, deployment: ModelDeployment, defaults: dict[str, Any], max_n: int):
        up = deployment.upstream or {}
        self.model_id = deployment.id
        self.deployment = deployment
        self.defaults = defaults
        self.max_n = max_n
        self.base_urls: list[str] = up["base_urls"]
        # Without `model`, the id after the vendor prefix: Vendor-A/Qwen/X -> Qwen/X.
        self.upstream_model = up.get("model") or deployment.id.split("/", 1)[-1]
        key = up.get("api_key") or (os.environ.get(up["api_key_env"]) if up.get("api_key_env") else None)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.retries = int(up.get("retries", 2))
        connect = float(up.get("connect_timeout", 5.0))
        read = float(up.get("read_timeout", 60.0))
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(connect=connect, read=read, write=read, pool=connect))

    @property
    def context_len(self) -> int | None:
        return None  # the upstream's own; its 400 tells a client that went over it

    def describe(self) -> str:
        return f"upstream {', '.join(self.base_urls)}"

    def model_card(self, created: int) -> dict:
        return {"id": self.model_id, "object": "model", "created": created, "owned_by": self.deployment.owned_by}

    def health(self) -> Health:
        # An upstream outage is the upstream's: it fails its own requests (502/504), not /health.
        return Health(True, "upstream")

    @property
    def overloaded(self) -> bool:
        return False  # max_pending_requests is enforced by the server's admission, atomically

    async def prepare(self, req: ChatCompletionRequest, request_id: str) -> ChatJob:
        n = req.n if req.n is not None else self.defaults["n"]
        if n > self.max_n:
            raise InvalidParameter("n", f"n must be at most {self.max_n}")
        body = req.model_dump(mode="json", by_alias=True, exclude_none=True)
        body.pop("priority", None)  # our engine's scheduling field: an upstream schedules its own way
        body.update(model=self.upstream_model, stream=True, stream_options={"include_usage": True})
        max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.defaults["max_tokens"]
            body["max_tokens"] = max_tokens  # what the reservation assumes is what the upstream may use
        # An estimate for the reservation (about 3 characters a token, plus each message's
        # framing); the upstream's usage replaces it when the request ends.
        estimate = sum(len(m.text()) for m in req.messages) // 3 + 4 * len(req.messages)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return ChatJob(request_id, req.model, n, n * max_tokens, estimate, include_usage,
                       logprobs=bool(req.logprobs), state=_UpstreamState(body))

    async def open(self, job: ChatJob) -> None:
        """Send the request and wait for the upstream's status: every failure before the first
        byte is still an HTTP error for our client, and is retried or failed over here."""
        state: _UpstreamState = job.state
        failure: BackendError | None = None
        for url in self.base_urls:
            for attempt in range(self.retries + 1):
                if attempt:
                    await asyncio.sleep(_RETRY_BACKOFF_S * attempt)
                try:
                    request = self.client.build_request("POST", f"{url}/chat/completions", json=state.body,
                                                        headers=self.headers)
                    response = await self.client.send(request, stream=True)
                except httpx.TimeoutException as e:
                    log.warning("upstream %s timed out (%s) for %s", url, type(e).__name__, job.request_id)
                    raise BackendError(504, "the upstream did not answer in time", "upstream_timeout") from None
                except httpx.TransportError as e:
                    log.warning("upstream %s unreachable (%s) for %s", url, type(e).__name__, job.request_id)
                    failure = BackendError(502, "the upstream is unreachable", "upstream_unavailable")
                    continue
                if response.status_code == 200:
                    state.response = response
                    return
                detail = await _error_message(response)
                if response.status_code >= 500:
                    log.warning("upstream %s answered %d for %s", url, response.status_code, job.request_id)
                    failure = BackendError(502, f"the upstream failed ({response.status_code})", "upstream_error")
                    continue
                if response.status_code == 429:
                    retry = _retry_after(response.headers.get("retry-after"))
                    raise BackendError(429, f"the upstream's rate limit was hit: {detail}", "upstream_rate_limited",
                                       retry_after=retry)
                if response.status_code in (401, 403):
                    # Our client's key is fine; ours at the upstream is not. Their problem is ours.
                    log.error("upstream %s refused our credentials (%d)", url, response.status_code)
                    raise BackendError(502, "the upstream refused this server's credentials", "upstream_auth")
                raise BackendError(response.status_code, detail, "upstream_rejected")
        raise failure or BackendError(502, "the upstream is unreachable", "upstream_unavailable")

    async def stream(self, job: ChatJob) -> AsyncIterator[dict]:
        state: _UpstreamState = job.state
        if state.response is None:
            await self.open(job)
        response = state.response
        base = {"id": job.request_id, "object": "chat.completion.chunk", "created": job.created, "model": job.model}
        seen_done = False
        counted = 0  # content chunks, standing in for tokens until the upstream's usage arrives
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    seen_done = True
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    raise BackendError(502, "the upstream sent a malformed stream", "upstream_error") from None
                if "error" in chunk:
                    err = chunk["error"] if isinstance(chunk["error"], dict) else {}
                    raise BackendError(502, f"the upstream failed mid-stream: {err.get('message', 'error')}",
                                       "upstream_error")
                usage = chunk.get("usage")
                if usage:
                    job.prompt_tokens = int(usage.get("prompt_tokens", job.prompt_tokens))
                    job.completion_tokens = int(usage.get("completion_tokens", counted))
                choices = chunk.get("choices") or []
                if not choices:
                    continue
                for c in choices:
                    if (c.get("delta") or {}).get("content"):
                        counted += 1
                if not usage:
                    job.completion_tokens = max(job.completion_tokens, counted)
                yield {**base, "choices": choices, "usage": None}
        except httpx.TimeoutException:
            raise BackendError(504, "the upstream stopped sending (read timeout)", "upstream_timeout") from None
        except httpx.TransportError:
            raise BackendError(502, "the upstream dropped the stream", "upstream_error") from None
        finally:
            await response.aclose()
        if not seen_done:
            raise BackendError(502, "the upstream dropped the stream", "upstream_error")

    def abort(self, request_id: str) -> None:
        pass  # closing the response (stream's finally) is the abort: the upstream sees the disconnect

    def stats(self) -> dict[str, float]:
        return {}

    async def close(self) -> None:
        await self.client.aclose()

    def shutdown(self) -> None:
        pass  # no threads; the HTTP client is closed by `close`, on the loop that owns it


async def _error_message(response: httpx.Response) -> str:
    try:
        raw = await asyncio.wait_for(response.aread(), timeout=5)
        body = json.loads(raw)
        err = body.get("error") if isinstance(body, dict) else None
        message = err.get("message") if isinstance(err, dict) else (body.get("message") if isinstance(body, dict)
                                                                     else None)
        return str(message)[:500] if message else f"HTTP {response.status_code}"
    except Exception:
        return f"HTTP {response.status_code}"
    finally:
        await response.aclose()


def _retry_after(value: str | None) -> float:
    try:
        return max(1.0, float(value)) if value else 1.0
    except ValueError:
        return 1.0
