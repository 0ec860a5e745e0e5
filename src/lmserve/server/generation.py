"""The two generation endpoints as the pipeline (server/pipeline.py) and the batch worker run
them: chat completions and legacy completions differ only in how the body is parsed, the checks
before the backend prepares it, and how the backend's chunks are framed (server/chat.py,
server/completions.py). Everything else is one path."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from lmserve.backends.base import Backend, ChatJob, completion_backend
from lmserve.chat.schemas import ChatCompletionRequest, CompletionRequest, parse_chat_request, validate
from lmserve.server.chat import Timing, collect_completion, completion_chunks
from lmserve.server.completions import collect_text, text_chunks
from lmserve.server.errors import bad_request
from lmserve.server.metrics import Metrics

Chunks = Callable[[Backend, ChatJob, Metrics, Timing], AsyncIterator[dict]]
Collect = Callable[[Backend, ChatJob, Metrics, Timing], Awaitable[dict]]


@dataclass
class Prepared:
    """A request the backend accepted: its job, and how its chunks reach the client (streamed
    framing, or folded into one response)."""

    job: ChatJob
    chunks: Chunks
    collect: Collect


class Endpoint:
    """One generation endpoint: `parse` a body (raises InvalidParameter), `prepare` the parsed
    request on a backend (raises APIError / InvalidParameter / BackendError)."""

    path: str
    id_prefix: str  # the response id's prefix (`chatcmpl-...`, `cmpl-...`)

    def parse(self, payload: dict) -> Any:
        raise NotImplementedError

    async def prepare(self, backend: Backend, req: Any, request_id: str) -> Prepared:
        raise NotImplementedError


class ChatEndpoint(Endpoint):
    path = "/v1/chat/completions"
    id_prefix = "chatcmpl"

    def parse(self, payload: dict) -> ChatCompletionRequest:
        return parse_chat_request(payload)

    async def prepare(self, backend: Backend, req: ChatCompletionRequest, request_id: str) -> Prepared:
        if req.prompt_logprobs is not None:
            check_prompt_logprobs(backend, req)
        return Prepared(await backend.prepare(req, request_id), completion_chunks, collect_completion)


class CompletionEndpoint(Endpoint):
    """Legacy prompt completion: one prompt (text or token ids), n, logprobs, echo."""

    path = "/v1/completions"
    id_prefix = "cmpl"

    def parse(self, payload: dict) -> CompletionRequest:
        return validate(CompletionRequest, payload)

    async def prepare(self, backend: Backend, req: CompletionRequest, request_id: str) -> Prepared:
        completions = completion_backend(backend)
        if completions is None:
            raise bad_request(f"model {req.model!r} does not serve legacy completions", "model")
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if req.max_tokens == 0 and not req.echo:
            raise bad_request("max_tokens must be at least 1 (0 only with echo: the prompt is scored, "
                              "nothing generated)", "max_tokens")
        if req.prompt_logprobs is not None:
            check_prompt_logprobs(backend, req)
        job = await completions.prepare_completion(req, request_id)
        framing: dict = {"echo": None}  # text_chunks' echo, echo_logprobs, prompt_logprobs
        if req.echo:
            framing["echo"] = req.prompt if isinstance(req.prompt, str) else \
                await asyncio.to_thread(completions.detokenize, req.prompt)
            framing["echo_logprobs"] = req.logprobs
        framing["prompt_logprobs"] = req.prompt_logprobs
        return Prepared(job, functools.partial(text_chunks, **framing), functools.partial(collect_text, **framing))


CHAT = ChatEndpoint()
COMPLETIONS = CompletionEndpoint()
ENDPOINTS: dict[str, Endpoint] = {e.path: e for e in (CHAT, COMPLETIONS)}


def check_prompt_logprobs(backend: Backend, req: ChatCompletionRequest | CompletionRequest) -> None:
    """vLLM's prompt_logprobs: local engines only, and (as in vLLM) not on a stream; a streamed
    completion scores its prompt with echo and logprobs."""
    if not backend.capabilities.prompt_scores:
        raise bad_request(f"model {req.model!r} does not score prompts (prompt_logprobs)", "prompt_logprobs")
    if req.stream:
        raise bad_request("prompt_logprobs is not available when stream is true", "prompt_logprobs")
