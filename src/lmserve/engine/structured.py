"""Structured output: token masks from a grammar, so the output is valid JSON (or validates
against a JSON schema) by construction, not by retry.

The grammar engine is xgrammar (the one vLLM and SGLang use). It is optional: installed by the
Makefile without its GPU-only dependencies (triton), and a request that needs it on an install
without it is rejected up front with a clear error.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import torch

from lmserve.errors import InvalidParameter


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must be: "json_object" (any JSON object) or "json_schema"."""

    kind: str
    schema: str | None = None  # JSON text of the schema, for "json_schema"

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> StructuredOutput:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True))


def grammar_available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


class GrammarBackend:
    """Compiles and caches grammars for one tokenizer; hands out per-sequence matchers."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info)
        self._cache: dict[StructuredOutput, Any] = {}
        self._lock = threading.Lock()  # compile() runs on request threads, matchers on the engine's

    def compile(self, spec: StructuredOutput):
        """Compile (cached). A schema the grammar engine cannot handle is the caller's error."""
        with self._lock:
            grammar = self._cache.get(spec)
            if grammar is None:
                # Compact separators: with free whitespace a small model can pad forever.
                schema = {"type": "object"} if spec.kind == "json_object" else spec.schema
                try:
                    grammar = self._compiler.compile_json_schema(schema, any_whitespace=False)
                except Exception as e:
                    raise InvalidParameter("response_format", f"unusable JSON schema: {e}") from None
                self._cache[spec] = grammar
            return grammar

    def matcher(self, spec: StructuredOutput):
        return self._xgr.GrammarMatcher(self.compile(spec))

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        return self._xgr.allocate_token_bitmask(rows, self.vocab_size)

    def apply(self, logits: torch.Tensor, matchers: list, rows: list[int]) -> None:
        """Mask, in place, every token each row's grammar does not allow next."""
        bitmask = self.allocate_bitmask(len(rows))
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        sub = logits[rows]
        self._xgr.apply_token_bitmask_inplace(sub, bitmask)
        logits[rows] = sub
