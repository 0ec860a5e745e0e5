"""Request and sequence state as the scheduler and the engine loop see it.

A request with n choices is one `Request` owning n `Sequence`s. Only choice 0 is prefilled; the
other choices are forked from it after the prompt is computed and share its KV blocks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from lmserve.engine.detokenizer import IncrementalDetokenizer
from lmserve.outputs import TokenLogprob
from lmserve.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class TokensSoFar:
    """The output tokens of anything with `token_ids` (prompt + output) and a `request`: a
    sequence, or the sampler's view of one at a proposed position (spec_decode/verify.py)."""

    __slots__ = ()

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.request.prompt_token_ids):]


@dataclass(eq=False)
class Sequence(TokensSoFar):
    seq_id: int
    request: Request
    index: int  # choice index within the request
    token_ids: list[int]  # prompt followed by generated tokens
    sampling_key: int  # 32-bit stream key for this choice's random draws
    detok: IncrementalDetokenizer
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full, computed blocks
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    # What has been generated but not yet handed out as a delta.
    pending_token_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    emitted_finish: bool = False
    grammar: Any = None  # the structured-output matcher of this choice, if any
    # Speculative decoding (engine/spec_decode/): this step's proposed tokens (not in token_ids
    # until verified), the grammar's masks after each of them, and the adaptive rule's state:
    # decayed counts of accepted and tried proposals (starting from an optimistic prior, see
    # spec_decode/speculator.py) and steps since the rule last let it propose.
    spec_token_ids: list[int] = field(default_factory=list)
    spec_masks: list[Any] = field(default_factory=list)
    spec_accepted: float = 1.6
    spec_tried: float = 2.0
    spec_idle_steps: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def forks_pending(self) -> bool:
        """The first choice of an n > 1 request, before the other n - 1 fork from its prefill."""
        return self.index == 0 and len(self.request.seqs) < self.params.n


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float
    seed: int  # the request's seed, drawn at random when none was given
    prompt: str | None = None
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # the n - 1 other choices exist
    num_cached_tokens: int = 0
    # When params.prompt_logprobs is set: one entry per prompt position scored so far (the first
    # is None: nothing predicts it), filled chunk by chunk during prefill.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_emitted: bool = False

    @property
    def scoring_prompt(self) -> bool:
        """Prompt logprobs asked for and not all computed: the prompt must run through the model,
        not come from the prefix cache."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.finished for s in self.seqs)
