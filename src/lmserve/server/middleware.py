"""The app's pure-ASGI middlewares (streamed responses and client disconnects pass through them
untouched): the loading gate, and trace ids with the access log."""

from __future__ import annotations

import logging
import time
import uuid

from starlette.datastructures import MutableHeaders

from lmserve.server.errors import APIError
from lmserve.server.lifecycle import Lifecycle
from lmserve.server.logs import PROBE_PATHS, access_line

log = logging.getLogger("lmserve.server")
access_log = logging.getLogger("lmserve.access")


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
