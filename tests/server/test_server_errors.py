"""How failures during generation reach the client: status, shape, no internals."""

from __future__ import annotations

from lmserve.errors import BackendError, ContextLengthExceeded
from lmserve.server.app import as_api_error


def test_failures_map_to_statuses():
    err = as_api_error(ContextLengthExceeded("messages", "too long"))
    assert (err.status, err.param, err.body()["error"]["type"]) == (400, "messages", "invalid_request_error")
    assert err.code == "context_length_exceeded"
    dead = as_api_error(BackendError(503, "the model's engine is not running", "engine_unavailable", retry_after=5))
    assert dead.status == 503 and dead.headers["Retry-After"] == "5"
    slow = as_api_error(BackendError(429, "upstream rate limit", "rate_limit_exceeded", retry_after=0.2))
    assert slow.headers["Retry-After"] == "1"  # whole seconds, never 0
    other = as_api_error(KeyError("secret internals"))
    body = other.body()
    assert other.status == 500 and "secret" not in str(body) and body["data"] is None and body["code"] == 50000
