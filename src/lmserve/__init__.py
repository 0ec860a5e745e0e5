"""lmserve: self-hosted LLM serving with its own engine (continuous batching, paged KV cache)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# OpenMP's wait policy is left to the environment. PASSIVE (threads sleep between ops) saves a
# host where another process keeps a core busy (int4 batch-1: 33.7 tok/s vs 11.4 with ACTIVE) but
# costs a quiet one (int4 33.6 vs 42.8; bf16 12.8 vs 31.7: oneDNN's many short parallel regions
# each pay a wake-up), measured on the 2-core box in one session (docs/benchmarks.md, "Threads").
# No single policy keeps both within 80% of the best, so the default stays torch's and operators
# on shared hosts set OMP_WAIT_POLICY=PASSIVE (README).

if TYPE_CHECKING:
    from lmserve.engine.async_engine import AsyncEngine
    from lmserve.engine.llm_engine import LLMEngine
    from lmserve.engine.options import EngineConfig
    from lmserve.llm import LLM
    from lmserve.outputs import CompletionOutput, RequestOutput
    from lmserve.sampling_params import SamplingParams

# Imported on first use, not with the package: the engine pulls in torch (a second or more), and
# the CLI must answer --help, a bad config or a busy port before that.
_LAZY = {
    "LLM": "lmserve.llm",
    "LLMEngine": "lmserve.engine.llm_engine",
    "EngineConfig": "lmserve.engine.options",
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
