"""The FastAPI app: routes, auth, trace ids, body cap, error mapping, request log.

Knows nothing about tensors: it validates, picks the backend for the model id, and frames what
the backend streams (shared/ARCHITECTURE.md, server layer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmserve import __version__
from lmserve.backends.base import Backend, tokenizer_backend
from lmserve.chat.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    validate,
)
from lmserve.config import DeploymentConfig
from lmserve.errors import BackendError, InvalidParameter
from lmserve.platform.keys import Principal
from lmserve.platform.service import Platform
from lmserve.server.admin import admin_router
from lmserve.server.admission import Admission
from lmserve.server.apidocs import mount_api_docs
from lmserve.server.auth import authenticate
from lmserve.server.batches import batch_api
from lmserve.server.body import read_json
from lmserve.server.errors import APIError, as_api_error, bad_request, unknown_model
from lmserve.server.generation import CHAT, COMPLETIONS
from lmserve.server.lifecycle import Lifecycle
from lmserve.server.logs import PROBE_PATHS, TokenTally, access_line, stats_loop
from lmserve.server.metrics import Metrics
from lmserve.server.pipeline import GenerationPipeline
from lmserve.server.security import SecurityHeaders
from lmserve.server.shutdown import Drain
from lmserve.server.ui import mount_ui

log = logging.getLogger("lmserve.server")
access_log = logging.getLogger("lmserve.access")


def create_app(config: DeploymentConfig, backends: dict[str, Backend], platform: Platform,
               lifecycle: Lifecycle | None = None) -> FastAPI:
    """`backends` may start empty and be filled once the models have loaded: until `lifecycle`
    says ready, the API answers 503 loading (without a lifecycle, the app is ready at once)."""
    lifecycle = lifecycle or Lifecycle(total_models=len(backends), phase="ready")
    server = config.server
    tally = TokenTally()  # tokens per model, for the stats line

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        stats = asyncio.create_task(stats_loop(backends, tally, server.stats_interval_s)) \
            if server.stats_interval_s > 0 else None
        batch_worker.start()
        yield
        if stats is not None:
            stats.cancel()
        await batch_worker.close(grace_s=2.0)  # lines not finished by then run again after a restart
        # Shutdown: in-flight requests have ended; their ledger rows are written before exit.
        await platform.close()
        for backend in list(backends.values()):
            await backend.close()

    app = FastAPI(title="lmserve", version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  lifespan=lifespan, description="OpenAI-compatible API. `/v1/*`, `/tokenize` and `/detokenize` "
                  "need `Authorization: Bearer <key>`.")
    app.openapi = lambda: _openapi(app)
    app.add_middleware(LoadingGate, lifecycle=lifecycle)
    if server.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=server.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id", "x-siliconcloud-trace-id"])
    app.add_middleware(TraceMiddleware, log_probes=server.log_health_probes, max_header_bytes=server.max_header_bytes)
    app.add_middleware(SecurityHeaders)  # outermost: its headers go on every response, errors included
    drain = app.state.drain = Drain()
    metrics = Metrics(backends)
    metrics.registry.register(platform)  # the usage spool and the limiter bypass
    admission = Admission({m.id: m.max_pending_requests for m in config.models})
    app.state.admission = admission
    pipeline = GenerationPipeline(platform, backends, admission, metrics, tally, drain, server.max_body_bytes)
    started = int(time.time())

    async def principal_of(request: Request) -> Principal:
        return await authenticate(platform, request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(BackendError)  # the platform's database or Redis away (StoreUnavailable): 503
    async def backend_error(request: Request, exc: BackendError):
        return as_api_error(exc).response()

    @app.exception_handler(InvalidParameter)
    async def invalid_parameter(request: Request, exc: InvalidParameter):
        return as_api_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, f"{message}: {request.method} {request.url.path}", code=None).response()

    def dead_models() -> list[str]:
        return [m for m, b in backends.items() if not b.health().alive]

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        """200 when every model is loaded and its engine runs; 503 loading / unhealthy otherwise."""
        if lifecycle.phase == "loading":
            return JSONResponse(lifecycle.loading_body(), status_code=503, headers={"Retry-After": "5"})
        if lifecycle.phase == "failed":
            return JSONResponse({"status": "failed"}, status_code=503)
        if drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        dead = dead_models()
        if dead:
            return JSONResponse({"status": "unhealthy", "dead_models": dead}, status_code=503)
        return {"status": "ok"}

    @app.api_route("/health/ready", methods=["GET", "HEAD"])
    async def ready():
        """Readiness: send traffic here (every model loaded, every engine running, the platform's
        database and Redis reachable: "degraded" and 503 while one is not)."""
        response = await health()
        if isinstance(response, JSONResponse):
            return response
        stores = await platform.store_status()
        if any(v == "unavailable" for v in stores.values()):
            return JSONResponse({"status": "degraded", "platform": stores}, status_code=503,
                                headers={"Retry-After": "2"})
        return {**response, "platform": stores}

    @app.api_route("/health/live", methods=["GET", "HEAD"])
    async def live():
        """Liveness: the process answers and no engine has died (loading is alive: do not restart it)."""
        dead = dead_models()
        if dead:
            return JSONResponse({"status": "dead", "dead_models": dead}, status_code=503)
        return {"status": "alive", "phase": lifecycle.phase}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models(request: Request, type: str | None = None, sub_type: str | None = None):
        principal = await principal_of(request)
        # Every model deployed here is a text chat model.
        match = (type in (None, "", "text")) and (sub_type in (None, "", "chat"))
        data = [card(b) for m, b in backends.items() if principal.may_use(m)] if match else []
        return {"object": "list", "data": data}

    @app.get("/v1/user/info")
    async def user_info(request: Request):
        principal = await principal_of(request)
        return {"code": 20000, "message": "OK", "status": True, "data": await platform.user_info(principal)}

    @app.get("/v1/user/usage")
    async def user_usage(request: Request, days: str = "30"):
        """The calling key's usage per UTC day and model, and the limits it is held to."""
        principal = await principal_of(request)
        if not days.isdigit() or not 1 <= int(days) <= 366:
            raise bad_request("days must be a whole number from 1 to 366", "days")
        return await platform.key_usage(principal, int(days))

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(request: Request, model_id: str):
        principal = await principal_of(request)
        backend = backends.get(model_id)
        if backend is None or not principal.may_use(model_id):
            raise APIError(404, f"Model does not exist: {model_id!r}", "model", "model_not_found")
        return card(backend)

    def card(backend: Backend) -> dict:
        """The model's entry, plus what a client (the playground) shows as "default": the values
        this deployment uses for fields a request leaves out, and its context length."""
        out = dict(backend.model_card(started))
        out["defaults"] = dict(backend.defaults)
        context = backend.context_len
        if context is not None:
            out["max_model_len"] = context
        return out

    @app.post("/v1/chat/completions", openapi_extra=_body_schema("ChatCompletionRequest"))
    async def chat_completions(request: Request):
        """Chat completion (OpenAI-compatible), streamed (SSE) or not."""
        return await pipeline.handle(request, CHAT)

    @app.post("/v1/completions", openapi_extra=_body_schema("CompletionRequest"))
    async def completions(request: Request):
        """Legacy prompt completion: one prompt (text or token ids), n, logprobs, echo, streamed or not."""
        return await pipeline.handle(request, COMPLETIONS)

    @app.post("/tokenize", openapi_extra=_body_schema("TokenizeRequest"))
    async def tokenize(request: Request):
        """Token ids of a text, or of a conversation rendered by the model's chat template."""
        principal = await principal_of(request)
        req = validate(TokenizeRequest, await read_json(request, config.server.max_body_bytes))
        backend = tokenizer_of(principal, req.model)
        ids = await asyncio.to_thread(backend.tokenize, req)
        return {"tokens": ids, "count": len(ids), "max_model_len": backend.context_len}

    @app.post("/detokenize", openapi_extra=_body_schema("DetokenizeRequest"))
    async def detokenize(request: Request):
        """The text of a list of token ids."""
        principal = await principal_of(request)
        req = validate(DetokenizeRequest, await read_json(request, config.server.max_body_bytes))
        backend = tokenizer_of(principal, req.model)
        return {"prompt": await asyncio.to_thread(backend.detokenize, req.tokens)}

    def tokenizer_of(principal: Principal, model: str):
        backend = backends.get(model)
        if backend is None:
            raise unknown_model(model, [m for m in backends if principal.may_use(m)])
        if not principal.may_use(model):  # tokenizing costs nothing: no balance check
            raise APIError(403, f"this API key may not use model {model!r}", "model", "model_not_allowed")
        tokenizer = tokenizer_backend(backend)
        if tokenizer is None:
            raise bad_request(f"model {model!r} does not expose its tokenizer", "model")
        return tokenizer

    app.include_router(admin_router(platform))
    batch_worker = batch_api(app, platform, backends, metrics, lambda: lifecycle.ready and not drain.draining)
    mount_ui(app)
    mount_api_docs(app)  # /docs and /redoc, from local files
    return app


# The request bodies the routes validate themselves (they read raw JSON to answer every mistake in
# the API's own error shape), published in the OpenAPI document so /docs shows the real schema.
_DOCUMENTED_BODIES = (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest)


def _body_schema(name: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi
        from pydantic.json_schema import models_json_schema

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in _DOCUMENTED_BODIES],
                                     ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(defs.get("$defs", {}))
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema


class LoadingGate:
    """While the models load, the API answers 503 `loading` with Retry-After (probes, /metrics
    and the docs still answer). Pure ASGI, in front of routing and auth."""

    GATED = ("/v1/", "/tokenize", "/detokenize")

    def __init__(self, app, lifecycle: Lifecycle):
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.lifecycle.ready and scope["path"].startswith(self.GATED):
            if self.lifecycle.phase == "loading":
                loaded, total = len(self.lifecycle.loaded), self.lifecycle.total_models
                err = APIError(503, f"the server is loading its models ({loaded}/{total} ready); retry shortly",
                               code="model_loading", headers={"Retry-After": "5"})
            else:
                err = APIError(503, "the server failed to load its models", code="engine_unavailable")
            return await err.response()(scope, receive, send)
        return await self.app(scope, receive, send)


class TraceMiddleware:
    """Trace id headers on every response, a 500 in the API's shape for anything unhandled, and
    one access-log line per request (probes only when asked). Pure ASGI, so streamed responses
    and client disconnects pass through untouched."""

    def __init__(self, app, log_probes: bool = False, max_header_bytes: int = 16 * 1024):
        self.app = app
        self.log_probes = log_probes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # h11 bounds a head that arrives in pieces; one that arrived in a single read is checked here.
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(k) + len(v) + 4 for k, v in scope.get("headers") or [])
        if head > self.max_header_bytes:
            return await APIError(431, f"request headers are larger than {self.max_header_bytes} bytes",
                                  code="request_header_fields_too_large").response()(scope, receive, send)
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
            if self.log_probes or scope["path"] not in PROBE_PATHS:
                # a stream's 200 went out first; the log wants how it ended
                final = state.get("final_status", status["code"])
                _log_request(scope, state, final, trace_id, time.perf_counter() - start)


def _log_request(scope, state: dict, status: int | None, trace_id: str, latency_s: float) -> None:
    """One line per request: route, status, model, tokens, time to first token, decode speed,
    latency, id (never the prompt)."""
    fields = {"method": scope["method"], "path": scope["path"], "status": status, "model": state.get("model"),
              "prompt_tokens": state.get("prompt_tokens"), "completion_tokens": state.get("completion_tokens")}
    timing = state.get("timing")
    if timing is not None and timing.first_token is not None:
        fields["ttft_ms"] = round(timing.ttft_ms, 1)
        decode_s = (timing.last or timing.first_token) - timing.first_token
        completion = fields["completion_tokens"] or 0
        if completion > 1 and decode_s > 0:
            fields["tok_per_s"] = round((completion - 1) / decode_s, 1)
    fields["latency_ms"] = round(latency_s * 1000, 1)
    fields["request_id"] = trace_id
    access_log.info(access_line(fields), extra={"fields": fields})
