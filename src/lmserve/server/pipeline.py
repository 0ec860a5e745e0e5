"""The generation pipeline: one request to a generation endpoint, from its HTTP body to its ledger
row, the same path for chat and legacy completions (server/generation.py says how they differ).

    drain check -> body -> parse -> model and key -> admission slot (503 when full)
      -> prepare (the backend's checks: a bad request fails before any 200)
      -> platform admit (limits, balance) -> open (an upstream's status)
      -> stream (SSE) or fold (one JSON response) -> finish: metrics, tally, ledger

Every request refused after its key was accepted leaves a ledger row (cost 0) and a counter by
status; every admitted request releases its slot and finishes exactly once, however it ends
(done, failed, client gone, server shutting down)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from lmserve.backends.base import Backend, ChatJob
from lmserve.errors import BackendError, InvalidParameter, Refused
from lmserve.platform.keys import Principal
from lmserve.platform.service import Platform, Ticket
from lmserve.server.admission import Admission
from lmserve.server.auth import authenticate
from lmserve.server.body import read_json
from lmserve.server.chat import Timing, sse, stream_error_event
from lmserve.server.errors import APIError, as_api_error, shutting_down, unknown_model
from lmserve.server.generation import Endpoint, Prepared
from lmserve.server.logs import TokenTally
from lmserve.server.metrics import Metrics
from lmserve.server.shutdown import Drain
from lmserve.server.streaming import AdmittedStreamingResponse, once, unless_disconnected, until_stopped

_REFUSALS = (APIError, InvalidParameter, BackendError)  # what a client is told; anything else is a bug


@dataclass
class GenerationPipeline:
    platform: Platform
    backends: dict[str, Backend]  # filled once the models have loaded
    admission: Admission
    metrics: Metrics
    tally: TokenTally
    drain: Drain
    max_body_bytes: int

    async def handle(self, request: Request, endpoint: Endpoint):
        """The response for one generation request: a StreamingResponse or the folded body."""
        arrival = time.perf_counter()
        principal = await authenticate(self.platform, request)
        req, backend = await self._admit(request, endpoint, principal, arrival)
        # Admitted: from here every way out releases the slot exactly once.
        release = once(lambda: self.admission.leave(req.model))
        try:
            prepared = await endpoint.prepare(backend, req, f"{endpoint.id_prefix}-{request.state.trace_id}")
            job = prepared.job
            ticket = await self.platform.admit(principal, req.model, job.prompt_tokens, job.max_completion_tokens)
        except BaseException as e:
            release()
            if isinstance(e, _REFUSALS):
                err = as_api_error(e)
                self.metrics.requests.labels(req.model, str(err.status)).inc()
                if isinstance(e, Refused) and e.limit:
                    self.metrics.rate_limited.labels(req.model, e.limit).inc()
                self._refused(request, principal, req.model, err, arrival)
                raise err from None
            raise
        timing = Timing(arrival)
        self.tally.start(job)
        try:
            await backend.open(job)
        except BaseException as e:
            release()
            err = as_api_error(e) if isinstance(e, Exception) else None
            self._finished(job, ticket, request, timing, err.status if err else 499)
            if err is None:
                raise
            raise err from None
        if req.stream:
            return self._streamed(request, backend, prepared, ticket, timing, release)
        return await self._folded(request, backend, prepared, ticket, timing, release)

    async def _admit(self, request: Request, endpoint: Endpoint, principal: Principal, arrival: float):
        """The parsed request and its backend, with an admission slot taken; or the refusal, metered."""
        named = counted_model = None
        try:
            if self.drain.draining:
                raise shutting_down()
            payload = await read_json(request, self.max_body_bytes)
            # Rejections count by status too, under the model id when it names a deployed model.
            named = payload.get("model")
            counted_model = named if isinstance(named, str) and named in self.backends else None
            req = endpoint.parse(payload)
            backend = self.backends.get(req.model)
            if backend is None:
                raise unknown_model(req.model, [m for m in self.backends if principal.may_use(m)])
            request.state.model = req.model
            self.platform.authorize(principal, req.model)
            if backend.overloaded or not self.admission.try_enter(req.model):
                raise APIError(503, f"model {req.model!r} is overloaded; retry later", code="overloaded",
                               headers={"Retry-After": "1"})
        except _REFUSALS as e:
            err = as_api_error(e)
            if counted_model:
                self.metrics.requests.labels(counted_model, str(err.status)).inc()
            self._refused(request, principal, named if isinstance(named, str) else None, err, arrival)
            raise err from None
        return req, backend

    def _refused(self, request: Request, principal: Principal, model: str | None, err: APIError,
                 arrival: float) -> None:
        """A request refused after its key was accepted: a ledger row with its status, cost 0."""
        self.platform.refused(principal, model, err.status, (time.perf_counter() - arrival) * 1000,
                              request.state.trace_id)

    def _streamed(self, request: Request, backend: Backend, prepared: Prepared, ticket: Ticket, timing: Timing,
                  release) -> AdmittedStreamingResponse:
        chunks = until_stopped(prepared.chunks(backend, prepared.job, self.metrics, timing), self.drain.stop)
        body = self._sse(chunks, prepared.job, ticket, request, timing)
        return AdmittedStreamingResponse(body, release, media_type="text/event-stream",
                                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def _folded(self, request: Request, backend: Backend, prepared: Prepared, ticket: Ticket,
                      timing: Timing, release) -> dict:
        job = prepared.job
        status = 200
        try:
            body = await unless_disconnected(request, prepared.collect(backend, job, self.metrics, timing),
                                             self.drain.stop)
        except Exception as e:
            err = as_api_error(e)
            status = err.status
            raise err from None
        except BaseException:  # cancelled (server shutting down)
            status = 499
            raise
        finally:
            release()
            ledger = self._finished(job, ticket, request, timing, status)
        await self.platform.settled(ledger)  # the row is in the database or the spool before the answer goes out
        return body

    async def _sse(self, chunks: AsyncIterator[dict], job: ChatJob, ticket: Ticket, request: Request,
                   timing: Timing):
        status = 200
        ledger = None
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except Exception as e:  # after the 200: one error event, then [DONE]
            err = as_api_error(e)
            status = err.status
            yield stream_error_event(err)
        except BaseException:  # the client went away mid-stream (the generator is closed/cancelled)
            status = 499
            raise
        finally:
            ledger = self._finished(job, ticket, request, timing, status)
        await self.platform.settled(ledger)  # the row is in the database or the spool before [DONE]
        yield sse("[DONE]")

    def _finished(self, job: ChatJob, ticket: Ticket, request: Request, timing: Timing,
                  status: int) -> asyncio.Task:
        """Every admitted request ends here exactly once, however it ends: metrics, the rate-limit
        settlement and the usage row (tokens so far for a client that left)."""
        self.metrics.requests.labels(job.model, str(status)).inc()
        self.metrics.prompt_tokens.labels(job.model).inc(job.prompt_tokens)
        self.metrics.generation_tokens.labels(job.model).inc(job.completion_tokens)
        request.state.tokens = job.prompt_tokens + job.completion_tokens
        request.state.final_status = status  # a stream's 200 went out first; the log wants how it ended
        ledger = self.platform.finish(ticket, job.prompt_tokens, job.completion_tokens, status,
                                      (time.perf_counter() - timing.arrival) * 1000, timing.ttft_ms,
                                      request.state.trace_id)
        self.tally.finish(job)
        request.state.prompt_tokens = job.prompt_tokens
        request.state.completion_tokens = job.completion_tokens
        request.state.timing = timing
        return ledger
