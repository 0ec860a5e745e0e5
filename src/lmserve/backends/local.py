"""A model served by the in-process engine: chat template, context limits, sampling params, and
the engine's per-step deltas turned into chat.completion.chunk dicts."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from lmserve.backends.base import PROMPT_SCORES, Capabilities, ChatJob, Health
from lmserve.backends.logprob_entries import logprob_entry, prompt_entries
from lmserve.chat.prompt import encode_chat
from lmserve.chat.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, TokenizeRequest
from lmserve.chat.tool_parsers import tool_call_stream
from lmserve.chat.tools import ToolPlan, output_constraint, plan_tools, template_messages
from lmserve.config import ModelDeployment
from lmserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineStepError
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.serving_defaults import serving_options
from lmserve.engine.tokenizer import max_token_chars
from lmserve.errors import BackendError, CheckpointError, ContextLengthExceeded, InvalidParameter
from lmserve.models import catalog
from lmserve.models.loader import read_config, resolve_checkpoint
from lmserve.sampling_params import SamplingParams

log = logging.getLogger("lmserve.backends.local")


@dataclass
class _LocalState:
    prompt_ids: list[int]
    params: SamplingParams
    tool_plan: ToolPlan | None
    score_only: bool = False  # max_tokens 0: the prompt's scores, then finish (nothing generated)


class LocalBackend:
    """Implements Backend, CompletionBackend and TokenizerBackend (backends/base.py)."""

    capabilities = Capabilities(completions=True, tokenizer=True, prompt_scores=True)

    def __init__(self, deployment: ModelDeployment, defaults: dict[str, Any], max_n: int):
        self.model_id = deployment.id
        self.deployment = deployment
        self.defaults = defaults
        self.max_n = max_n
        # A catalog id must be served by weights of its family: checked on the config alone,
        # before seconds or minutes of loading.
        architecture = read_config(resolve_checkpoint(deployment.source)).architecture
        try:
            catalog.check_weights(deployment.id, architecture)
        except ValueError as e:
            raise CheckpointError(f"{deployment.source}: {e}") from None
        options = serving_options(deployment.source, deployment.dtype, deployment.engine.options())
        self.engine = LLMEngine(deployment.source, deployment.dtype, **options)
        self.tokenizer = self.engine.tokenizer  # None for a checkpoint without one (ids in, ids out)
        # A configured template replaces the checkpoint's for this deployment only (the tokenizer
        # is shared with other deployments of the same weights).
        self.chat_template: str | None = deployment.chat_template_text() or getattr(
            self.tokenizer, "chat_template", None)
        self.async_engine = AsyncEngine(self.engine)
        self._max_token_chars = max_token_chars(self.tokenizer) if self.tokenizer is not None else 1

    def checkpoint_generation_config(self) -> dict[str, Any]:
        """The sampling values the checkpoint recommends (generation_config.json), if it has any."""
        ckpt = self.engine.checkpoint
        path = ckpt.path / "generation_config.json" if ckpt.format == "hf" else None
        if path is None or not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def model_card(self, created: int) -> dict:
        return {"id": self.model_id, "object": "model", "created": created, "owned_by": self.deployment.owned_by}

    def health(self) -> Health:
        alive = self.async_engine.alive
        return Health(alive, "" if alive else "engine loop stopped")

    @property
    def overloaded(self) -> bool:
        return False  # max_pending_requests is enforced by the server's admission, atomically

    @property
    def context_len(self) -> int:
        """Prompt plus completion may not exceed this (the model's context, capped by the cache)."""
        return self.engine.max_seq_len

    def describe(self) -> str:
        engine = self.engine
        return (f"{engine.dtype}, {engine.device}, context {self.context_len} tokens, "
                f"KV cache {engine.num_blocks} blocks")

    async def prepare(self, req: ChatCompletionRequest, request_id: str) -> ChatJob:
        tool_plan = plan_tools(req)
        schema_param = "tools" if tool_plan and tool_plan.forced else None
        try:
            structured = output_constraint(req, tool_plan)
        except InvalidParameter as e:
            raise InvalidParameter(schema_param or e.param, str(e)) from None

        if req.top_logprobs and not req.logprobs:
            raise InvalidParameter("top_logprobs", "top_logprobs requires logprobs to be true")
        if structured is not None:
            try:
                # Building the grammar backend reads the whole vocabulary: off the loop as well.
                grammar = await asyncio.to_thread(self.engine.grammar_backend)
                await grammar.compile_async(structured, self.deployment.structured_output_timeout_s)
            except InvalidParameter as e:
                raise InvalidParameter(schema_param or e.param, str(e)) from None
        messages, template_kwargs = template_messages([m.for_template() for m in req.messages], tool_plan,
                                                      self.chat_template)
        if self.chat_template is not None:
            template_kwargs["chat_template"] = self.chat_template
        self._reject_hopeless_length(messages, template_kwargs)
        # Rendering and tokenizing megabytes take seconds: never on the event loop.
        prompt_ids = await asyncio.to_thread(self._encode_chat, messages, template_kwargs)

        max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        return self._job(req, request_id, prompt_ids, "messages", max_tokens, bool(req.logprobs),
                         req.top_logprobs or 0, structured, tool_plan, prompt_logprobs=req.prompt_logprobs)

    async def prepare_completion(self, req: CompletionRequest, request_id: str) -> ChatJob:
        """A legacy completion: the prompt as given (text is tokenized with the tokenizer's own
        special tokens, e.g. BOS), no template. `stream` then yields the same chunks as for chat."""
        if isinstance(req.prompt, str):
            if self.tokenizer is None:
                raise InvalidParameter("prompt", "this model has no tokenizer; send token ids")
            self._reject_by_characters(len(req.prompt), "prompt")
            prompt_ids = await asyncio.to_thread(self.engine.encode, req.prompt, True)
            if not prompt_ids:
                raise InvalidParameter("prompt", "the prompt is empty")
        else:
            self.engine.check_token_ids(req.prompt)
            prompt_ids = list(req.prompt)
        logprobs = req.logprobs is not None
        # The prompt is scored for echo with logprobs (the legacy shape) and for vLLM's
        # prompt_logprobs; one scoring serves both, with the larger k.
        asked = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs) if k is not None]
        score_only = req.max_tokens == 0
        return self._job(req, request_id, prompt_ids, "prompt", 1 if score_only else req.max_tokens, logprobs,
                         req.logprobs or 0, prompt_logprobs=max(asked) if asked else None, score_only=score_only)

    def _job(self, req: SamplingFields, request_id: str, prompt_ids: list[int], prompt_param: str,
             max_tokens: int | None, logprobs: bool, top_logprobs: int, structured=None, tool_plan=None,
             prompt_logprobs: int | None = None, score_only: bool = False) -> ChatJob:
        """Context checks and sampling params, the same for chat and legacy completions."""
        def pick(name: str):
            value = getattr(req, name)
            return self.defaults[name] if value is None else value

        n = pick("n")
        if n > self.max_n:
            raise InvalidParameter("n", f"n must be at most {self.max_n}")
        context = self.context_len
        room = context - len(prompt_ids)
        if room < 1:
            raise ContextLengthExceeded(prompt_param, f"the prompt has {len(prompt_ids)} tokens, the model's context "
                                                      f"is {context} tokens")
        if max_tokens is not None and max_tokens > room:
            raise ContextLengthExceeded("max_tokens", f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) "
                                                      f"exceeds the model's context of {context} tokens")
        if max_tokens is None:
            # Not asked for: the platform default, cut to what the context leaves (then `length`).
            max_tokens = min(self.defaults["max_tokens"], room)
        stop = req.stop if isinstance(req.stop, list) else ([req.stop] if req.stop else [])
        params = SamplingParams(
            max_tokens=max_tokens, temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"),
            min_p=pick("min_p"), frequency_penalty=pick("frequency_penalty"),
            presence_penalty=pick("presence_penalty"), repetition_penalty=pick("repetition_penalty"), n=n,
            seed=req.seed, stop=stop, logprobs=logprobs, top_logprobs=top_logprobs,
            structured_output=structured, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
            stop_token_ids=req.stop_token_ids or [], skip_special_tokens=req.skip_special_tokens,
            prompt_logprobs=prompt_logprobs, priority=req.priority or 0)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return ChatJob(request_id, req.model, n, 0 if score_only else n * max_tokens, len(prompt_ids), include_usage,
                       logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                       state=_LocalState(prompt_ids, params, tool_plan, score_only))

    def tokenize(self, req: TokenizeRequest) -> list[int]:
        """Token ids of a text, or of a conversation rendered by this deployment's template the way a
        chat request's prompt is (blocking: call it off the event loop)."""
        if self.tokenizer is None:
            raise InvalidParameter("model", "this model has no tokenizer")
        if req.prompt is not None:
            return self.engine.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        kwargs: dict[str, Any] = {"add_generation_prompt": req.add_generation_prompt}
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        return self._encode_chat([m.for_template() for m in req.messages], kwargs)

    def detokenize(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            raise InvalidParameter("tokens", "this model has no tokenizer")
        self.engine.check_token_ids(token_ids, "tokens", "token ids")
        return self.tokenizer.decode(token_ids)

    async def open(self, job: ChatJob) -> None:
        pass  # the engine starts the request when the stream is first read

    async def stream(self, job: ChatJob) -> AsyncIterator[dict]:
        state: _LocalState = job.state
        base = {"id": job.request_id, "object": "chat.completion.chunk", "created": job.created, "model": job.model}
        for i in range(job.n):
            yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None, "logprobs": None}], "usage": None}
        report_eos_as_stop = self.deployment.report_eos_as_stop
        fmt = self.engine.chat_format.tool_call_format
        readers = [tool_call_stream(fmt, state.tool_plan) if state.tool_plan else None for _ in range(job.n)]
        try:
            async for out in self.async_engine.generate(job.request_id, state.prompt_ids, state.params):
                if out.prompt_logprobs is not None:
                    # A long prompt's thousands of token texts: built off the event loop.
                    entries = await asyncio.to_thread(prompt_entries, self.tokenizer, out.prompt_token_ids,
                                                    out.prompt_logprobs)
                    yield {**base, "choices": [], PROMPT_SCORES: entries, "usage": None}
                if state.score_only:  # the prefill is done: the token it sampled is not wanted
                    for i in range(job.n):
                        yield {**base, "choices": [{"index": i, "delta": {}, "finish_reason": "length",
                                                    "logprobs": None}], "usage": None}
                    return
                for o in out.outputs:
                    job.completion_tokens += len(o.token_ids)
                    finish = o.finish_reason
                    if finish == "eos" and report_eos_as_stop:
                        finish = "stop"
                    text, calls = o.text, []
                    reader = readers[o.index]
                    if reader is not None:  # tools in play: text that may be a call is held back
                        text = reader.feed(text)
                        if finish is not None:
                            rest, calls = reader.finish(complete=finish != "length")
                            text += rest
                    delta: dict[str, Any] = {}
                    if calls:
                        delta["tool_calls"] = calls
                        finish = "tool_calls"
                    if text:
                        delta["content"] = text
                    if not delta and finish is None and not (o.logprobs and job.logprobs):
                        continue
                    logprobs = ({"content": [logprob_entry(self.tokenizer, lp) for lp in o.logprobs]}
                                if job.logprobs and o.logprobs else None)
                    yield {**base, "choices": [{"index": o.index, "delta": delta, "finish_reason": finish,
                                                "logprobs": logprobs}], "usage": None}
        except EngineDeadError:
            raise BackendError(503, "the model's engine is not running", "engine_unavailable", retry_after=5) from None
        except EngineStepError as e:
            log.error("generation failed: %s", e)
            raise BackendError(500, "generation failed; the request was dropped", "internal_error") from None
        finally:
            self.abort(job.request_id)  # no-op when finished; frees the blocks when the client left

    def _reject_hopeless_length(self, messages: list[dict], template_kwargs: dict) -> None:
        """A prompt whose character count alone proves it cannot fit the context is refused before
        any template or tokenizer work: no token stands for more than `max_token_chars` characters."""
        chars = sum(len(m.get("content") or "") for m in messages)
        chars += sum(len(json.dumps(t, ensure_ascii=False)) for t in template_kwargs.get("tools") or [])
        self._reject_by_characters(chars, "messages")

    def _reject_by_characters(self, chars: int, param: str) -> None:
        least_tokens = chars // self._max_token_chars
        if least_tokens >= self.context_len:
            raise ContextLengthExceeded(param, f"the {param} ({chars} characters) needs at least {least_tokens} "
                                               f"tokens; the model's context is {self.context_len} tokens")

    def _encode_chat(self, messages: list[dict], template_kwargs: dict) -> list[int]:
        try:
            return encode_chat(self.tokenizer, messages, **template_kwargs)
        except (TemplateError, ValueError) as e:  # the template's own words (e.g. roles must alternate)
            raise InvalidParameter("messages", f"the messages cannot be rendered by the model's chat template: "
                                               f"{str(e)[:300]}") from None
        except Exception:
            log.warning("chat template failed", exc_info=True)
            raise InvalidParameter("messages", "the messages cannot be rendered by the model's chat template") from None

    def abort(self, request_id: str) -> None:
        self.async_engine.abort(request_id)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    async def close(self) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        self.async_engine.shutdown()
