"""What the engine hands back, shaped as vLLM users know it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first
    rank: int | None = None  # 1 = the model's first choice (set for prompt logprobs)


@dataclass
class CompletionOutput:
    """One choice. From `AsyncEngine.generate` this is a delta (new text and tokens of one step);
    from `LLM.generate` it is the whole completion."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eos" | "stop" | "length" | None while running
    logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt: str | None = None
    # With SamplingParams.prompt_logprobs: one entry per prompt token, the first None. Sent once,
    # in the first output after the prefill (a stream's later deltas leave it None).
    prompt_logprobs: list[TokenLogprob | None] | None = None
