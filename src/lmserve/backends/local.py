"""A model served by the in-process engine: chat rendering, context limits, streaming deltas."""

from __future__ import annotations

from collections.abc import AsyncIterator

from lmserve.config import ModelDeployment
from lmserve.engine.async_engine import AsyncEngine
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.tokenizer import render_chat
from lmserve.outputs import RequestOutput
from lmserve.sampling_params import SamplingParams


class LocalBackend:
    def __init__(self, deployment: ModelDeployment):
        self.deployment = deployment
        self.engine = LLMEngine(deployment.path, deployment.dtype, **deployment.engine)
        self.async_engine = AsyncEngine(self.engine)
        self.in_flight = 0  # requests between admission and their last chunk (event-loop owned)

    @property
    def overloaded(self) -> bool:
        return self.in_flight >= self.deployment.max_pending_requests

    @property
    def context_len(self) -> int:
        """Prompt plus completion may not exceed this (the model's context, capped by the cache)."""
        return self.engine.max_seq_len

    @property
    def alive(self) -> bool:
        return self.async_engine.alive

    def render_chat(self, messages: list[dict], **template_kwargs) -> list[int]:
        text = render_chat(self.engine.tokenizer, messages, **template_kwargs)
        # The template writes its own special tokens (BOS where the model wants one).
        return self.engine.encode(text, add_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        return self.async_engine.generate(request_id, prompt_ids, params)

    def abort(self, request_id: str) -> None:
        self.async_engine.abort(request_id)

    def stats(self) -> dict[str, float]:
        """A snapshot for /metrics (read from the engine thread's state without locking: gauges)."""
        sched = self.engine.scheduler
        bm = self.engine.block_manager
        return {
            "running": len(sched.running),
            "waiting": len(sched.waiting),
            "kv_cache_usage": bm.usage,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
        }

    def shutdown(self) -> None:
        self.async_engine.shutdown()
