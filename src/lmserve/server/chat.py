"""POST /v1/chat/completions: request -> sampling params -> engine stream -> chunks.

Streaming is the primitive: `completion_chunks` turns the engine's per-step deltas into
chat.completion.chunk objects, and the non-streamed response is built by folding those same
chunks, so the two can never disagree.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from lmserve.backends.local import LocalBackend
from lmserve.errors import InvalidParameter
from lmserve.outputs import TokenLogprob
from lmserve.sampling_params import SamplingParams
from lmserve.server.errors import APIError, bad_request
from lmserve.server.metrics import Metrics
from lmserve.server.schemas import ChatCompletionRequest
from lmserve.server.tools import (
    ToolPlan,
    may_be_call,
    output_constraint,
    parse_tool_call,
    plan_tools,
    template_messages,
)


@dataclass
class PreparedChat:
    """A validated request bound to its backend, ready to run."""

    request_id: str
    model: str
    backend: LocalBackend
    prompt_ids: list[int]
    params: SamplingParams
    include_usage: bool
    tool_plan: ToolPlan | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    completion_tokens: int = 0


def prepare(req: ChatCompletionRequest, backend: LocalBackend, defaults: dict[str, Any], max_n: int,
            request_id: str) -> PreparedChat:
    tool_plan = plan_tools(req)
    structured = output_constraint(req, tool_plan)
    if structured is not None:
        try:
            backend.engine.grammar_backend().compile(structured)
        except InvalidParameter as e:
            raise bad_request(str(e), "tools" if tool_plan and tool_plan.forced else e.param) from None

    def pick(name: str):
        value = getattr(req, name)
        return defaults[name] if value is None else value

    n = pick("n")
    if n > max_n:
        raise bad_request(f"n must be at most {max_n}", "n")
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    messages, template_kwargs = template_messages([m.for_template() for m in req.messages], tool_plan,
                                                  backend.engine.tokenizer.chat_template)
    try:
        prompt_ids = backend.render_chat(messages, **template_kwargs)
    except Exception as e:  # a template that rejects this conversation (e.g. role order)
        raise bad_request(f"the messages cannot be rendered by the model's chat template: {e}", "messages") from None

    context = backend.context_len
    room = context - len(prompt_ids)
    if room < 1:
        raise bad_request(f"the prompt has {len(prompt_ids)} tokens, the model's context is {context} tokens",
                          "messages", "context_length_exceeded")
    max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    if max_tokens is not None and max_tokens > room:
        raise bad_request(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                          f"context of {context} tokens", "max_tokens", "context_length_exceeded")
    if max_tokens is None:
        # Not asked for: the platform default, cut to what the context leaves (then `length`).
        max_tokens = min(defaults["max_tokens"], room)
    stop = req.stop if isinstance(req.stop, list) else ([req.stop] if req.stop else [])
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"),
            min_p=pick("min_p"), frequency_penalty=pick("frequency_penalty"),
            presence_penalty=pick("presence_penalty"), n=n, seed=req.seed, stop=stop,
            logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0, structured_output=structured)
    except InvalidParameter as e:
        raise bad_request(str(e), e.param) from None
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return PreparedChat(request_id, req.model, backend, prompt_ids, params, include_usage, tool_plan)


async def completion_chunks(chat: PreparedChat, metrics: Metrics, arrival: float) -> AsyncIterator[dict]:
    """chat.completion.chunk dicts: a role chunk per choice, content deltas as the engine makes
    them, each choice's last chunk with its finish_reason, then the usage chunk if asked."""
    base = {"id": chat.request_id, "object": "chat.completion.chunk", "created": chat.created, "model": chat.model}
    report_eos_as_stop = chat.backend.deployment.report_eos_as_stop
    for i in range(chat.params.n):
        yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None, "logprobs": None}], "usage": None}
    chat.backend.in_flight += 1
    last = None
    choices = [_ChoiceText(chat.tool_plan) for _ in range(chat.params.n)]
    try:
        async for out in chat.backend.generate(chat.request_id, chat.prompt_ids, chat.params):
            now = time.perf_counter()
            if last is None:
                metrics.ttft.labels(chat.model).observe(now - arrival)
            else:
                metrics.itl.labels(chat.model).observe(now - last)
            last = now
            for o in out.outputs:
                chat.completion_tokens += len(o.token_ids)
                finish = o.finish_reason
                if finish == "eos" and report_eos_as_stop:
                    finish = "stop"
                text, call = choices[o.index].feed(o.text, finish)
                delta: dict[str, Any] = {}
                if call is not None:
                    delta["tool_calls"] = [call]
                    finish = "tool_calls"
                if text:
                    delta["content"] = text
                if not delta and finish is None and not (o.logprobs and chat.params.logprobs):
                    continue
                logprobs = ({"content": [_logprob_entry(chat.backend, lp) for lp in o.logprobs]}
                            if chat.params.logprobs and o.logprobs else None)
                yield {**base, "choices": [{"index": o.index, "delta": delta, "finish_reason": finish,
                                            "logprobs": logprobs}], "usage": None}
    finally:
        chat.backend.in_flight -= 1
        chat.backend.abort(chat.request_id)  # no-op when finished; frees the blocks when the client left
    metrics.e2e.labels(chat.model).observe(time.perf_counter() - arrival)
    metrics.prompt_tokens.labels(chat.model).inc(len(chat.prompt_ids))
    metrics.generation_tokens.labels(chat.model).inc(chat.completion_tokens)
    if chat.include_usage:
        yield {**base, "choices": [], "usage": usage(chat)}


class _ChoiceText:
    """One choice's text on its way out. With tools in play, text is held back while it may
    still be a tool call: a forced call until the end, an `auto` reply until it is clearly prose."""

    def __init__(self, plan: ToolPlan | None):
        self.plan = plan
        self.held = ""
        self.streaming = plan is None

    def feed(self, text: str, finish: str | None) -> tuple[str, dict | None]:
        """Returns (text to emit now, the tool call once the choice has ended as one)."""
        if self.streaming:
            return text, None
        self.held += text
        if finish is not None:
            call = parse_tool_call(self.held, self.plan) if finish != "length" else None
            return ("", call) if call is not None else (self.held, None)
        if not self.plan.forced and not may_be_call(self.held):
            self.streaming = True  # plain text after all: release what was held
            return self.held, None
        return "", None


def usage(chat: PreparedChat) -> dict[str, int]:
    p, c = len(chat.prompt_ids), chat.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def collect_completion(chat: PreparedChat, metrics: Metrics, arrival: float) -> dict:
    """The non-streamed response: the same chunks, folded."""
    n = chat.params.n
    texts = [""] * n
    calls: list[list] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    logprobs: list[list | None] = [None] * n
    async for chunk in completion_chunks(chat, metrics, arrival):
        for c in chunk["choices"]:
            i = c["index"]
            texts[i] += c["delta"].get("content", "")
            calls[i] += [{k: v for k, v in call.items() if k != "index"} for call in c["delta"].get("tool_calls", [])]
            finish[i] = c["finish_reason"] or finish[i]
            if c.get("logprobs"):
                logprobs[i] = (logprobs[i] or []) + c["logprobs"]["content"]
    choices = [{"index": i, "message": _message(texts[i], calls[i]), "finish_reason": finish[i],
                "logprobs": {"content": logprobs[i] or []} if chat.params.logprobs else None} for i in range(n)]
    return {"id": chat.request_id, "object": "chat.completion", "created": chat.created, "model": chat.model,
            "choices": choices, "usage": usage(chat)}


def _message(text: str, calls: list[dict]) -> dict:
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}
    return {"role": "assistant", "content": text}


def _logprob_entry(backend: LocalBackend, lp: TokenLogprob) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = backend.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def stream_error_event(err: APIError) -> bytes:
    return sse(err.body())
