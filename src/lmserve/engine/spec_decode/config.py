"""`speculative_config`: vLLM's keys, checked once when the engine is built."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

NGRAM = "ngram"
DRAFT_MODEL = "draft_model"
_KEYS = {"method", "model", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
         "disable_by_batch_size", "min_acceptance_rate", "acceptance_window"}
# vLLM's default window when neither prompt_lookup_min nor prompt_lookup_max is given: long
# enough that a chat with no copying finds few matches, so it proposes (and wastes) little.
_DEFAULT_LOOKUP = 5


@dataclass(frozen=True)
class SpeculativeConfig:
    num_speculative_tokens: int
    method: str = NGRAM
    model: str | None = None  # the draft checkpoint (method draft_model)
    prompt_lookup_min: int = _DEFAULT_LOOKUP
    prompt_lookup_max: int = _DEFAULT_LOOKUP
    # No proposals in a step whose running batch has at least this many sequences (vLLM's name):
    # a hard switch on top of the adaptive rule (speculator.py), which already weighs each
    # request's acceptance against what a verified row costs at the batch size. None: no switch.
    disable_by_batch_size: int | None = None
    # Per request: no proposals while its acceptance estimate is below this, whatever the cost
    # model says; a request the rule keeps from proposing gets one probe token every
    # `acceptance_window` steps, so its estimate can recover when its text turns to copying.
    min_acceptance_rate: float = 0.1
    acceptance_window: int = 32

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """From a dict or its JSON text (the CLI flag); ValueError naming the bad key."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object")
        unknown = set(value) - _KEYS
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(_KEYS))}")
        options = dict(value)
        model = options.pop("model", None)
        method = options.pop("method", None)
        if model == "[ngram]":  # vLLM's older spelling
            method, model = method or NGRAM, None
        if method is None:
            method = NGRAM if model is None else DRAFT_MODEL
        if method not in (NGRAM, DRAFT_MODEL):
            raise ValueError(f"speculative_config: method {method!r} is not supported by this engine "
                             f"(supported: {NGRAM!r}, {DRAFT_MODEL!r})")
        if method == NGRAM and model is not None:
            raise ValueError("speculative_config: 'model' does not go with method 'ngram'")
        if method == DRAFT_MODEL and (not isinstance(model, str) or not model):
            raise ValueError("speculative_config: method 'draft_model' needs 'model', the draft checkpoint's path")
        options["model"] = model
        k = options.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 32:
            raise ValueError("speculative_config: num_speculative_tokens must be an integer in [1, 32]")
        lo, hi = options.get("prompt_lookup_min"), options.get("prompt_lookup_max")
        if lo is None and hi is None:
            lo = hi = _DEFAULT_LOOKUP
        lo, hi = (hi if lo is None else lo), (lo if hi is None else hi)
        for name, v in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"speculative_config: {name} must be a positive integer")
        if lo > hi:
            raise ValueError("speculative_config: prompt_lookup_min must not exceed prompt_lookup_max")
        options.update(prompt_lookup_min=lo, prompt_lookup_max=hi)
        size = options.get("disable_by_batch_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError("speculative_config: disable_by_batch_size must be a positive integer")
        rate = options.get("min_acceptance_rate", 0.1)
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
            raise ValueError("speculative_config: min_acceptance_rate must be in [0, 1]")
        window = options.get("acceptance_window", 32)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError("speculative_config: acceptance_window must be a positive integer")
        return cls(method=method, **options)
