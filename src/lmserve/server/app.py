"""The FastAPI app: routes, auth, trace ids, body cap, error mapping, request log.

Knows nothing about tensors: it validates, picks the backend for the model id, and frames what
the backend streams (shared/ARCHITECTURE.md, server layer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmserve.backends.base import Backend, ChatJob
from lmserve.chat.schemas import parse_chat_request
from lmserve.config import DeploymentConfig
from lmserve.errors import BackendError, InvalidParameter, Refused
from lmserve.platform.keys import Principal
from lmserve.platform.service import Platform, Ticket
from lmserve.server.admin import admin_router
from lmserve.server.admission import Admission
from lmserve.server.chat import Timing, collect_completion, completion_chunks, sse, stream_error_event
from lmserve.server.errors import APIError, bad_request, unknown_model
from lmserve.server.metrics import Metrics

log = logging.getLogger("lmserve.server")
access_log = logging.getLogger("lmserve.access")


def create_app(config: DeploymentConfig, backends: dict[str, Backend], platform: Platform) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # Shutdown: in-flight requests have ended; their ledger rows are written before exit.
        await platform.close()
        for backend in backends.values():
            await backend.close()

    app = FastAPI(title="lmserve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(TraceMiddleware)
    metrics = Metrics(backends)
    admission = Admission({m.id: m.max_pending_requests for m in config.models})
    app.state.admission = admission
    started = int(time.time())

    async def principal_of(request: Request) -> Principal:
        try:
            principal = await platform.authenticate(request.headers.get("authorization"))
        except Refused as e:
            raise as_api_error(e) from None
        request.state.account = principal.account_name
        return principal

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, f"{message}: {request.method} {request.url.path}", code=None).response()

    @app.get("/health")
    async def health():
        dead = [m for m, b in backends.items() if not b.health().alive]
        if dead:
            return JSONResponse({"status": "unhealthy", "dead_models": dead}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models(request: Request, type: str | None = None, sub_type: str | None = None):
        principal = await principal_of(request)
        # Every model deployed here is a text chat model.
        match = (type in (None, "", "text")) and (sub_type in (None, "", "chat"))
        data = [b.model_card(started) for m, b in backends.items() if principal.may_use(m)] if match else []
        return {"object": "list", "data": data}

    @app.get("/v1/user/info")
    async def user_info(request: Request):
        principal = await principal_of(request)
        return {"code": 20000, "message": "OK", "status": True, "data": await platform.user_info(principal)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.perf_counter()
        principal = await principal_of(request)
        payload = await _read_json(request, config.server.max_body_bytes)
        # Rejections count by status too, under the model id when it names a deployed model.
        named = payload.get("model") if isinstance(payload, dict) else None
        counted_model = named if isinstance(named, str) and named in backends else None
        try:
            req = parse_chat_request(payload)
            backend = backends.get(req.model)
            if backend is None:
                raise unknown_model(req.model)
            request.state.model = req.model
            platform.authorize(principal, req.model)
            request_id = f"chatcmpl-{request.state.trace_id}"
            if backend.overloaded or not admission.try_enter(req.model):
                raise APIError(503, f"model {req.model!r} is overloaded; retry later", code="overloaded",
                               headers={"Retry-After": "1"})
        except (APIError, InvalidParameter, BackendError) as e:
            err = as_api_error(e)
            if counted_model:
                metrics.requests.labels(counted_model, str(err.status)).inc()
            raise err from None
        # Admitted: from here every way out releases the slot exactly once.
        release = _once(lambda: admission.leave(req.model))
        try:
            job = await backend.prepare(req, request_id)
            ticket = await platform.admit(principal, req.model, job.prompt_tokens, job.max_completion_tokens)
        except BaseException as e:
            release()
            if isinstance(e, APIError | InvalidParameter | BackendError):
                err = as_api_error(e)
                metrics.requests.labels(req.model, str(err.status)).inc()
                if isinstance(e, Refused) and e.limit:
                    metrics.rate_limited.labels(req.model, e.limit).inc()
                raise err from None
            raise
        timing = Timing(arrival)
        try:
            await backend.open(job)
        except BaseException as e:
            release()
            err = as_api_error(e) if isinstance(e, Exception) else None
            finished(job, ticket, request, timing, err.status if err else 499)
            if err is None:
                raise
            raise err from None
        if req.stream:
            return AdmittedStreamingResponse(_stream(backend, job, ticket, request, timing), release,
                                             media_type="text/event-stream",
                                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        status = 200
        try:
            body = await _unless_disconnected(request, collect_completion(backend, job, metrics, timing))
        except Exception as e:
            err = as_api_error(e)
            status = err.status
            raise err from None
        except BaseException:  # cancelled (server shutting down)
            status = 499
            raise
        finally:
            release()
            finished(job, ticket, request, timing, status)
        return body

    async def _stream(backend: Backend, job: ChatJob, ticket: Ticket, request: Request, timing: Timing):
        status = 200
        try:
            async for chunk in completion_chunks(backend, job, metrics, timing):
                yield sse(chunk)
        except Exception as e:  # after the 200: one error event, then [DONE]
            err = as_api_error(e)
            status = err.status
            yield stream_error_event(err)
        except BaseException:  # the client went away mid-stream (the generator is closed/cancelled)
            status = 499
            raise
        finally:
            finished(job, ticket, request, timing, status)
        yield sse("[DONE]")

    def finished(job: ChatJob, ticket: Ticket, request: Request, timing: Timing, status: int) -> None:
        """Every admitted request ends here exactly once, however it ends: metrics, the rate-limit
        settlement and the usage row (tokens so far for a client that left)."""
        metrics.requests.labels(job.model, str(status)).inc()
        metrics.prompt_tokens.labels(job.model).inc(job.prompt_tokens)
        metrics.generation_tokens.labels(job.model).inc(job.completion_tokens)
        request.state.tokens = job.prompt_tokens + job.completion_tokens
        request.state.final_status = status  # a stream's 200 went out first; the log wants how it ended
        platform.finish(ticket, job.prompt_tokens, job.completion_tokens, status,
                        (time.perf_counter() - timing.arrival) * 1000, timing.ttft_ms, request.state.trace_id)

    app.include_router(admin_router(platform))
    return app


def as_api_error(exc: BaseException) -> APIError:
    """What a failure during generation means for the client (the log keeps the details)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidParameter):
        return bad_request(str(exc), exc.param, exc.code)
    if isinstance(exc, BackendError):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))} if exc.retry_after is not None else None
        return APIError(exc.status, exc.message, code=exc.code, headers=headers)
    log.error("unexpected error during generation", exc_info=exc)
    return APIError(500, "internal server error", code="internal_error")


async def _unless_disconnected(request: Request, work):
    """Run `work`, cancelling it if the client goes away first: its KV blocks are then freed
    instead of finishing a completion nobody will read."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client closed the request", code="client_closed_request")
    finally:
        if not task.done():
            task.cancel()


def _once(fn):
    done = False

    def call():
        nonlocal done
        if not done:
            done = True
            fn()

    return call


class AdmittedStreamingResponse(StreamingResponse):
    """A streamed response that holds an admission slot: released when the response is over,
    however it ends (finished, failed, client gone, cancelled). The body generator is closed right
    then too, so its cleanup (engine abort, metrics) never waits for the garbage collector."""

    def __init__(self, content, release, **kwargs):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self._release()


class TraceMiddleware:
    """Trace id headers on every response, a 500 in the API's shape for anything unhandled, and
    one access-log line per request. Pure ASGI, so streamed responses and client disconnects
    pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        trace_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["trace_id"] = trace_id
        start = time.perf_counter()
        status = {"code": None}

        async def send_with_trace(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["x-siliconcloud-trace-id"] = trace_id
                headers["x-request-id"] = trace_id
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_trace)
        except Exception:  # never a stack trace in the body; the log has it
            log.exception("unhandled error on %s %s [%s]", scope["method"], scope["path"], trace_id)
            if status["code"] is None:
                await APIError(500, "internal server error", code="internal_error").response()(
                    scope, receive, send_with_trace)
        finally:
            # One line per request: id, route, model, status, tokens, latency (never the prompt).
            access_log.info("%s %s %s model=%s status=%s tokens=%s latency_ms=%.1f", trace_id, scope["method"],
                            scope["path"], state.get("model"), state.get("final_status", status["code"]),
                            state.get("tokens"),
                            (time.perf_counter() - start) * 1000)


# Bodies above this are decoded on a worker thread: parsing megabytes would stall the event loop.
_INLINE_JSON_BYTES = 64 * 1024


async def _read_json(request: Request, cap: int) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise APIError(413, f"request body is larger than {cap} bytes", code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > cap:
            raise APIError(413, f"request body is larger than {cap} bytes", code="request_too_large")
    if len(body) <= _INLINE_JSON_BYTES:
        return _decode_json(bytes(body))
    return await asyncio.to_thread(_decode_json, bytes(body))


def _decode_json(body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply", None, "invalid_json") from None
    if not isinstance(payload, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    _reject_lone_surrogates(payload)
    return payload


def _reject_lone_surrogates(payload: dict) -> None:
    """JSON may escape half a UTF-16 pair ("\\ud800"), which no tokenizer or UTF-8 encoder takes:
    refuse it up front, wherever in the body it is, instead of failing deep in the pipeline."""
    stack: list = [payload]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request("the request body contains invalid Unicode text (a lone UTF-16 surrogate)",
                                  None, "invalid_json") from None
