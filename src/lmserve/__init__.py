"""lmserve: self-hosted LLM serving with its own engine (continuous batching, paged KV cache)."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

# OpenMP threads that finish an op sleep instead of spinning for the next one. On a host where
# another process keeps a core busy, a spinning thread holds its core while the thread it waits
# for has none, and every parallel op of a step stalls for a scheduler time slice: measured on
# the 2-core box under load, the model's linears took 373 ms per token with torch's default
# policy, 54 ms with PASSIVE, 54 ms with one thread (docs/benchmarks.md, "Threads"). Read by
# OpenMP when torch loads, so set before anything imports torch; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if TYPE_CHECKING:
    from lmserve.engine.async_engine import AsyncEngine
    from lmserve.engine.llm_engine import EngineConfig, LLMEngine
    from lmserve.llm import LLM
    from lmserve.outputs import CompletionOutput, RequestOutput
    from lmserve.sampling_params import SamplingParams

# Imported on first use, not with the package: the engine pulls in torch (a second or more), and
# the CLI must answer --help, a bad config or a busy port before that.
_LAZY = {
    "LLM": "lmserve.llm",
    "LLMEngine": "lmserve.engine.llm_engine",
    "EngineConfig": "lmserve.engine.llm_engine",
    "AsyncEngine": "lmserve.engine.async_engine",
    "SamplingParams": "lmserve.sampling_params",
    "RequestOutput": "lmserve.outputs",
    "CompletionOutput": "lmserve.outputs",
}

__all__ = ["LLM", "LLMEngine", "AsyncEngine", "EngineConfig", "SamplingParams", "RequestOutput",
           "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lmserve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
