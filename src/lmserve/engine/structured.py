"""Structured output: token masks from a grammar, so the output is valid JSON (or validates
against a JSON schema) by construction, not by retry.

The grammar engine is xgrammar (the one vLLM and SGLang use). It is optional: installed by the
Makefile without its GPU-only dependencies (triton), and a request that needs it on an install
without it is rejected up front with a clear error.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from lmserve.errors import BackendError, InvalidParameter
from lmserve.sampling_params import StructuredOutput
from lmserve.staging import host_to_device

log = logging.getLogger("lmserve.structured")

# Compiled grammars kept per model (least recently used go first); each holds token-mask tables.
GRAMMAR_CACHE_SIZE = 128
# Compiles that outlived their time bound and still occupy a thread; past this many, new
# (uncached) compiles are refused with 503 until they end, so they cannot pile up.
MAX_ABANDONED_COMPILES = 2


def grammar_available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


_ENGINE_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def _schema_problem(exc: Exception) -> str:
    """The grammar engine's complaint in the request's terms: its first line, without the
    engine's timestamp and source location, cut short (it may echo a large schema)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    first = _ENGINE_LOCATION.sub("", first).strip()
    if not first or "/" in first.split(" ")[0]:
        return "the JSON schema is not supported"
    return first if len(first) <= 200 else first[:200] + "..."


class GrammarCompileTimeout(InvalidParameter):
    pass


class GrammarBackend:
    """Compiles and caches grammars for one tokenizer; hands out per-sequence matchers."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        # The compiler's own cache is unbounded; ours below is an LRU with a size cap.
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._cache: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self._lock = threading.RLock()  # the cache is shared by request threads and the engine's
        # Compiles run here, off the event loop. A compile cannot be interrupted (native code), so
        # one that overruns its time bound is left to finish on its own thread and later compiles
        # go to a fresh executor: no request ever waits behind it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmserve-grammar")
        self._submitted: set[Future] = set()
        self._abandoned: set[Future] = set()

    def cached(self, spec: StructuredOutput):
        with self._lock:
            grammar = self._cache.get(spec)
            if grammar is not None:
                self._cache.move_to_end(spec)
            return grammar

    def compile(self, spec: StructuredOutput):
        """Compile (cached). A schema the grammar engine cannot handle is the caller's error."""
        grammar = self.cached(spec)
        if grammar is not None:
            return grammar
        # Compact separators: with free whitespace a small model can pad forever.
        schema = {"type": "object"} if spec.kind == "json_object" else spec.schema
        try:
            grammar = self._compiler.compile_json_schema(schema, any_whitespace=False)
        except Exception as e:
            raise InvalidParameter("response_format", f"unusable JSON schema: {_schema_problem(e)}") from None
        with self._lock:
            self._cache[spec] = grammar
            self._cache.move_to_end(spec)
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._submitted.discard(future)

    async def compile_async(self, spec: StructuredOutput, timeout_s: float):
        """Compile on the grammar thread, never on the event loop, within `timeout_s`."""
        grammar = self.cached(spec)
        if grammar is not None:
            return grammar
        with self._lock:
            self._abandoned = {f for f in self._abandoned if not f.done()}
            if len(self._abandoned) >= MAX_ABANDONED_COMPILES:
                raise BackendError(503, "structured output is busy with earlier slow schemas; retry later",
                                   "overloaded", retry_after=5)
            future = self._executor.submit(self.compile, spec)
            self._submitted.add(future)
            future.add_done_callback(self._forget)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except TimeoutError:
            with self._lock:
                # wait_for cancelled ours if it had not started; whatever still runs is stuck.
                stuck = {f for f in self._submitted if f.running()}
                if stuck:
                    log.warning("a grammar compile overran %.1f s; leaving it to finish on its own thread", timeout_s)
                    self._abandoned |= stuck
                    old, self._executor = self._executor, ThreadPoolExecutor(
                        max_workers=1, thread_name_prefix="lmserve-grammar")
                    old.shutdown(wait=False, cancel_futures=False)
            raise GrammarCompileTimeout(
                "response_format", f"the JSON schema took longer than {timeout_s:g} s to compile "
                "(the limit for structured output); simplify it") from None

    def matcher(self, spec: StructuredOutput):
        return self._xgr.GrammarMatcher(self.compile(spec))

    def allocate_bitmask(self, rows: int, pinned: bool = False) -> torch.Tensor:
        """The host bitmask the matchers fill; pinned when it goes on to a GPU, so the copy is
        queued behind the step's work instead of waiting for it."""
        if not pinned:
            return self._xgr.allocate_token_bitmask(rows, self.vocab_size)
        return torch.full(self._xgr.get_bitmask_shape(rows, self.vocab_size), -1, dtype=self._xgr.bitmask_dtype,
                          pin_memory=True)

    def apply(self, logits: torch.Tensor, matchers: list, rows: list[int]) -> None:
        """Mask, in place, every token each row's grammar does not allow next. The matchers fill
        the bitmask on the host; it is applied on the logits' device (xgrammar's kernel for
        that device), so the logits never leave it."""
        device = logits.device
        bitmask = self.allocate_bitmask(len(rows), pinned=device.type == "cuda")
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        index = rows
        if device.type != "cpu":
            bitmask = bitmask.to(device, non_blocking=True)
            index = host_to_device(rows, torch.int64, device)
        sub = logits[index]
        self._xgr.apply_token_bitmask_inplace(sub, bitmask)
        logits[index] = sub
