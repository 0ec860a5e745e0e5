"""The engine as the server uses it: `generate()` yields per-step deltas, `abort()` cancels.

The core loop runs in a background thread, so model code never blocks the asyncio event loop.
Requests and aborts cross into the thread through a queue; outputs cross back with
`call_soon_threadsafe` onto each request's own asyncio queue. A consumer that stops iterating
(a client that disconnected) aborts its request, which frees its KV blocks on the next loop turn.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from lmserve.engine.llm_engine import LLMEngine
from lmserve.outputs import RequestOutput
from lmserve.sampling_params import SamplingParams

log = logging.getLogger("lmserve.engine")


class EngineStepError(RuntimeError):
    """One engine step failed; the requests that were in it fail with this."""


class EngineDeadError(RuntimeError):
    """The engine loop crashed; every request in flight fails with this."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="lmserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model: str, dtype: str = "auto", **engine_options) -> AsyncEngine:
        return cls(LLMEngine(model, dtype, **engine_options))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       prompt_text: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its deltas until it finishes. Validation errors of the
        request (InvalidParameter and kin) are raised before the first delta."""
        if not self.alive:
            raise EngineDeadError("the engine is not running") from self.error
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._streams[request_id] = (loop, stream)
        self._commands.put(("add", request_id, prompt, params, prompt_text))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(("stop",))
        self._thread.join(timeout=10)
        self.engine.shutdown()  # its tensor-parallel workers, once no step runs any more

    # ---- the engine thread ----------------------------------------------------------------

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt, params, prompt_text = command
            with self._lock:
                wanted = request_id in self._streams
            if not wanted:
                return  # the client left before its request reached the engine
            try:
                self.engine.add_request(request_id, prompt, params, prompt_text)
            except Exception as e:  # a rejected request fails alone, the engine goes on
                self._deliver(request_id, e)
        elif kind == "abort":
            self.engine.abort_request(command[1])

    def _loop(self) -> None:
        try:
            while not self._stopped:
                # Block while idle; otherwise take whatever arrived and run one step.
                block = not self.engine.has_unfinished()
                try:
                    command = self._commands.get(block=block)
                    while True:
                        if command[0] == "stop":
                            return
                        self._handle(command)
                        command = self._commands.get_nowait()
                except queue.Empty:
                    pass
                try:
                    outputs = self.engine.step()
                except Exception as e:
                    if not self.engine.alive:
                        raise  # a tensor-parallel worker died: no later step can run either
                    # A failed step fails the requests in flight, not the server: they get the
                    # error, their blocks are freed, and the loop goes on with new requests.
                    log.exception("engine step failed; failing the requests in flight")
                    for request_id in self.engine.abort_all():
                        self._deliver(request_id, EngineStepError(f"generation failed: {e}"))
                    continue
                for output in outputs:
                    self._deliver(output.request_id, output)
        except BaseException as e:  # report to every waiting client instead of hanging them
            log.exception("engine loop crashed")
            self.error = e
            with self._lock:
                ids = list(self._streams)
            for request_id in ids:
                self._deliver(request_id, EngineDeadError(f"engine failed: {e}"))
