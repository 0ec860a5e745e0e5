"""Offline inference for scripts and tests: the same engine core as the server, driven inline."""

from __future__ import annotations

import itertools

from lmserve.chat.prompt import render_chat
from lmserve.engine.llm_engine import LLMEngine
from lmserve.outputs import CompletionOutput, RequestOutput
from lmserve.sampling_params import SamplingParams


class LLM:
    """`LLM(model, dtype="auto", **engine_options)`: model is a checkpoint directory, a GGUF
    file, or the bundled default model's id `HuggingFaceTB/SmolLM2-135M-Instruct`; the engine
    options are `lmserve.EngineConfig`'s fields (engine/options.py), as in a config file's `engine:`."""

    def __init__(self, model: str = "HuggingFaceTB/SmolLM2-135M-Instruct", dtype: str = "auto", **engine_options):
        self.engine = LLMEngine(model, dtype, **engine_options)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine's tensor-parallel workers now (otherwise they stop when this object is
        garbage-collected or the process exits). A no-op for a one-process engine."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts are strings or token-id lists."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, [None] * len(prompts))

    def chat(self, conversations: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             **template_kwargs) -> list[RequestOutput]:
        """Apply the checkpoint's chat template to one conversation or a list of them."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        texts = [render_chat(self.tokenizer, conv, **template_kwargs) for conv in conversations]
        # The template already wrote any BOS: encoding must not add another.
        ids = [self.engine.encode(t, add_special_tokens=False) for t in texts]
        return self._run(ids, sampling_params, texts)

    def _run(self, prompts, sampling_params, texts) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("need one SamplingParams per prompt, or a single one for all")
        results: dict[str, RequestOutput] = {}
        order = []
        try:
            for prompt, p, text in zip(prompts, params, texts):
                rid = f"offline-{next(self._ids)}"
                request = self.engine.add_request(rid, prompt, p, text)
                order.append(rid)
                results[rid] = RequestOutput(rid, request.prompt_token_ids,
                                             [CompletionOutput(i) for i in range(p.n)], prompt=request.prompt)
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    collect(results[delta.request_id], delta)
        finally:
            for rid in order:  # an exception must not leave requests holding KV blocks
                self.engine.abort_request(rid)
        return [results[rid] for rid in order]


def collect(total: RequestOutput, delta: RequestOutput) -> None:
    """Fold one step's delta into the accumulated output (the non-streamed view of a stream)."""
    for d in delta.outputs:
        out = total.outputs[d.index]
        out.text += d.text
        out.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            out.logprobs = (out.logprobs or []) + d.logprobs
        out.finish_reason = d.finish_reason
    total.finished = delta.finished
    if delta.prompt_logprobs is not None:
        total.prompt_logprobs = delta.prompt_logprobs
    total.num_cached_tokens = delta.num_cached_tokens
