"""The engine-client protocol: everything the HTTP layer may ask of whatever serves a model id
(vLLM's `EngineClient` plays this part there).

The server validates the body, asks the backend to `prepare` it (template, token count, context
checks: a bad request fails here, before any 200), admits it (limits), `open`s it (an upstream's
status arrives: still an HTTP error if it fails), then frames the chunks `stream` yields. It
never sees an engine, a tokenizer or an upstream URL; the local engine and an upstream vendor
are two implementations of these few methods.

What not every backend can do is declared, not probed: `capabilities` says which of the
sub-protocols below (`CompletionBackend`, `TokenizerBackend`) a backend also implements, and
`completion_backend` / `tokenizer_backend` hand it out typed as such (or None).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

from lmserve.chat.schemas import ChatCompletionRequest, CompletionRequest, TokenizeRequest

# The key of the chunk that carries a scored prompt (server/prompt_scores.py): internal, the
# framing consumes it and never sends it to a client as it is.
PROMPT_SCORES = "_prompt_scores"


@dataclass
class ChatJob:
    """One prepared chat request. The backend fills `prompt_tokens` at prepare (exact for the local
    engine, an estimate for an upstream until its usage arrives) and counts `completion_tokens`
    while streaming; the platform reserves `prompt_tokens + max_completion_tokens` against token
    limits at admission and settles with the final counts."""

    request_id: str
    model: str
    n: int
    max_completion_tokens: int  # over all n choices
    prompt_tokens: int
    include_usage: bool
    logprobs: bool = False
    # Alternatives per prompt token when the prompt is scored (vLLM's prompt_logprobs, or echo with
    # logprobs); None: not scored. The backend then sends the scores as one chunk of their own.
    prompt_logprobs: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    completion_tokens: int = 0
    state: Any = None  # the backend's own (prompt ids and sampling params, or the upstream body)

    @property
    def usage(self) -> dict[str, int]:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@dataclass
class Health:
    alive: bool
    detail: str = ""


@dataclass(frozen=True)
class Capabilities:
    """The optional abilities of a backend: what the routes check before using one."""

    completions: bool = False  # legacy /v1/completions: implements CompletionBackend (tokenizer too)
    tokenizer: bool = False  # /tokenize, /detokenize and echo: implements TokenizerBackend
    prompt_scores: bool = False  # prompt_logprobs (a local engine scores prompts during prefill)


@runtime_checkable
class Backend(Protocol):
    model_id: str
    defaults: dict[str, Any]  # values for the request fields a client leaves out (this deployment's)
    capabilities: Capabilities

    @property
    def context_len(self) -> int | None:
        """Prompt plus completion may not exceed this many tokens; None: the backend does not know
        (an upstream's own limit applies)."""
        ...

    def describe(self) -> str:
        """One line for the startup log: how the model is served (dtype, device, context, cache)."""
        ...

    def model_card(self, created: int) -> dict:
        """The /v1/models entry."""
        ...

    def health(self) -> Health:
        ...

    @property
    def overloaded(self) -> bool:
        """True when one more request should get 503 (its queue is full)."""
        ...

    async def prepare(self, req: ChatCompletionRequest, request_id: str) -> ChatJob:
        """Validate against the model (raises InvalidParameter for a 400) and count prompt tokens."""
        ...

    async def open(self, job: ChatJob) -> None:
        """Start the admitted request where failing is still an HTTP error for the client (an
        upstream's status arrives here); raises BackendError. A no-op for the local engine."""
        ...

    def stream(self, job: ChatJob) -> AsyncIterator[dict]:
        """chat.completion.chunk dicts: a role chunk per choice, deltas, each choice's finish
        chunk; no usage chunk (the server adds it from the job). Failures raise BackendError or
        InvalidParameter. Stopping the iteration aborts the request."""
        ...

    def abort(self, request_id: str) -> None:
        ...

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics (running, waiting, kv_cache_usage, prefix cache counters); may be empty."""
        ...

    async def close(self) -> None:
        """Release what the backend holds, on the event loop (the app's shutdown)."""
        ...

    def shutdown(self) -> None:
        """Stop the backend's threads and workers from any thread, also when no event loop ever
        ran (a failed start); safe to call twice and after `close`."""
        ...


@runtime_checkable
class TokenizerBackend(Backend, Protocol):
    """A backend that exposes its tokenizer (`capabilities.tokenizer`). Both calls block: run them
    off the event loop."""

    def tokenize(self, req: TokenizeRequest) -> list[int]:
        ...

    def detokenize(self, token_ids: list[int]) -> str:
        ...


@runtime_checkable
class CompletionBackend(TokenizerBackend, Protocol):
    """A backend that also serves legacy prompt completions (`capabilities.completions`); prompts
    come and are echoed as token ids too, so it exposes its tokenizer as well."""

    async def prepare_completion(self, req: CompletionRequest, request_id: str) -> ChatJob:
        """As `prepare`, for a prompt given as text or token ids (no template); `stream` then
        yields the same chunks as for chat."""
        ...


def completion_backend(backend: Backend) -> CompletionBackend | None:
    """`backend` as a CompletionBackend when it declares legacy completions, else None."""
    return cast(CompletionBackend, backend) if backend.capabilities.completions else None


def tokenizer_backend(backend: Backend) -> TokenizerBackend | None:
    """`backend` as a TokenizerBackend when it declares its tokenizer, else None."""
    return cast(TokenizerBackend, backend) if backend.capabilities.tokenizer else None
