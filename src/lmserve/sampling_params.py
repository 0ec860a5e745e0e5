"""Per-request generation settings. Defaults are neutral (greedy-safe); the API layer applies
the platform's own defaults (temperature 0.7, top_p 0.7, ...) before building these.

What a request's output must match (`StructuredOutput`) is one of those settings, declared here
as plain data with its bounds; compiling it into token masks is the engine's business
(engine/structured.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lmserve.errors import InvalidParameter

# Bounds a schema must stay within before it is compiled. Real response formats and tool
# signatures sit far below them; past them the compiler's time and memory grow much faster than
# the schema (a 50,000-value enum ran for minutes), so they are refused up front, cheaply.
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32  # nested objects/arrays of the schema document itself
MAX_ENUM_VALUES = 1000  # over all `enum` lists of the schema


def check_schema_bounds(schema: Any, param: str = "response_format") -> None:
    """Refuse a schema past the bounds above, without recursion (a deep document must not
    overflow the stack on its way to being refused)."""
    enum_values = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidParameter(param, f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
        if isinstance(node, dict):
            enum = node.get("enum")
            if isinstance(enum, list):
                enum_values += len(enum)
                if enum_values > MAX_ENUM_VALUES:
                    raise InvalidParameter(param, f"the JSON schema has more than {MAX_ENUM_VALUES} enum values")
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must be: "json_object" (any JSON object) or "json_schema"."""

    kind: str
    schema: str | None = None  # JSON text of the schema, for "json_schema"

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str, param: str = "response_format") -> StructuredOutput:
        if isinstance(schema, str):
            if len(schema) > MAX_SCHEMA_BYTES:
                raise InvalidParameter(param, f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes")
            return cls("json_schema", schema)
        check_schema_bounds(schema, param)
        text = json.dumps(schema, sort_keys=True)
        if len(text) > MAX_SCHEMA_BYTES:
            raise InvalidParameter(param, f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes")
        return cls("json_schema", text)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens were generated
    skip_special_tokens: bool = True  # leave special tokens (<|im_end|>, ...) out of the text
    logprobs: bool = False
    top_logprobs: int = 0
    # vLLM's meaning: None = off; k = each prompt token's logprob plus the top k alternatives.
    prompt_logprobs: int | None = None
    # Constrain the output to JSON (an object, or one that validates against a schema).
    structured_output: StructuredOutput | None = None
    # vLLM's scheduling priority: lower is more urgent; 0 interactive, batch API lines run above it.
    priority: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._check("max_tokens", self.max_tokens >= 1, "must be at least 1")
        self._check("temperature", 0.0 <= self.temperature, "must be non-negative")
        self._check("top_k", self.top_k >= 0, "must be -1, 0 or positive")
        self._check("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]")
        self._check("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]")
        self._check("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]")
        self._check("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]")
        self._check("repetition_penalty", self.repetition_penalty > 0.0, "must be positive")
        self._check("n", self.n >= 1, "must be at least 1")
        self._check("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]")
        self._check("top_logprobs", 0 <= self.top_logprobs <= 20, "must be in [0, 20]")
        self._check("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                    "must be in [0, 20]")

    @staticmethod
    def _check(name: str, ok: bool, rule: str) -> None:
        if not ok:
            raise InvalidParameter(name, f"{name} {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0
