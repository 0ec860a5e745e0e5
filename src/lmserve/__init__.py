"""lmserve: self-hosted LLM serving with its own engine (continuous batching, paged KV cache)."""

from lmserve.engine.async_engine import AsyncEngine
from lmserve.engine.llm_engine import EngineConfig, LLMEngine
from lmserve.llm import LLM
from lmserve.outputs import CompletionOutput, RequestOutput
from lmserve.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "AsyncEngine", "EngineConfig", "SamplingParams", "RequestOutput",
           "CompletionOutput"]
__version__ = "0.1.0"
