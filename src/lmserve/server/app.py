"""The FastAPI app: assembles the middlewares, the error handlers and the routers around one
generation pipeline, and owns the lifespan (stats line, batch worker, orderly shutdown).

Knows nothing about tensors: the routes validate, pick the backend for the model id through the
protocol in backends/base.py, and frame what it streams (shared/ARCHITECTURE.md, server layer).
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from lmserve import __version__
from lmserve.backends.base import Backend
from lmserve.config import DeploymentConfig
from lmserve.platform.service import Platform
from lmserve.server.admin import admin_router
from lmserve.server.admission import Admission
from lmserve.server.apidocs import mount_api_docs, openapi_schema
from lmserve.server.batches import batch_api
from lmserve.server.errors import as_api_error, install_error_handlers
from lmserve.server.lifecycle import Lifecycle
from lmserve.server.logs import TokenTally, stats_loop
from lmserve.server.metrics import Metrics
from lmserve.server.middleware import LoadingGate, TraceMiddleware
from lmserve.server.pipeline import GenerationPipeline
from lmserve.server.routes.generation import generation_router
from lmserve.server.routes.health import health_router
from lmserve.server.routes.models import models_router
from lmserve.server.routes.tokenize import tokenize_router
from lmserve.server.security import SecurityHeaders
from lmserve.server.shutdown import Drain
from lmserve.server.ui import mount_ui

__all__ = ["as_api_error", "create_app"]  # as_api_error: the failure mapping, imported from here by tests


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
    app.openapi = lambda: openapi_schema(app)
    app.add_middleware(LoadingGate, lifecycle=lifecycle)
    if server.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=server.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id", "x-siliconcloud-trace-id"])
    app.add_middleware(TraceMiddleware, log_probes=server.log_health_probes, max_header_bytes=server.max_header_bytes)
    app.add_middleware(SecurityHeaders)  # outermost: its headers go on every response, errors included
    install_error_handlers(app)

    drain = app.state.drain = Drain()
    metrics = Metrics(backends)
    metrics.registry.register(platform)  # the usage spool and the limiter bypass
    admission = app.state.admission = Admission({m.id: m.max_pending_requests for m in config.models})
    pipeline = GenerationPipeline(platform, backends, admission, metrics, tally, drain, server.max_body_bytes)

    app.include_router(health_router(backends, lifecycle, drain, platform, metrics))
    app.include_router(models_router(backends, platform))
    app.include_router(generation_router(pipeline))
    app.include_router(tokenize_router(backends, platform, server.max_body_bytes))
    app.include_router(admin_router(platform))
    batch_worker = batch_api(app, platform, backends, metrics, lambda: lifecycle.ready and not drain.draining)
    mount_ui(app)
    mount_api_docs(app)  # /docs and /redoc, from local files
    return app
