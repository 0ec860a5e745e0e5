"""Probes and scrapes: /health, /health/ready, /health/live (no key needed) and /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from lmserve.backends.base import Backend
from lmserve.platform.service import Platform
from lmserve.server.lifecycle import Lifecycle
from lmserve.server.metrics import Metrics
from lmserve.server.shutdown import Drain


def health_router(backends: dict[str, Backend], lifecycle: Lifecycle, drain: Drain, platform: Platform,
                  metrics: Metrics) -> APIRouter:
    router = APIRouter()

    def dead_models() -> list[str]:
        return [m for m, b in backends.items() if not b.health().alive]

    @router.api_route("/health", methods=["GET", "HEAD"])
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

    @router.api_route("/health/ready", methods=["GET", "HEAD"])
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

    @router.api_route("/health/live", methods=["GET", "HEAD"])
    async def live():
        """Liveness: the process answers and no engine has died (loading is alive: do not restart it)."""
        dead = dead_models()
        if dead:
            return JSONResponse({"status": "dead", "dead_models": dead}, status_code=503)
        return {"status": "alive", "phase": lifecycle.phase}

    @router.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return router
