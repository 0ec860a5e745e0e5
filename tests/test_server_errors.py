"""How failures during generation reach the client: status, shape, no internals."""

from __future__ import annotations

from lmserve.engine.async_engine import EngineDeadError, EngineStepError
from lmserve.errors import ContextLengthExceeded
from lmserve.server.app import as_api_error


def test_failures_map_to_statuses():
    err = as_api_error(ContextLengthExceeded("messages", "too long"))
    assert (err.status, err.param, err.body()["error"]["type"]) == (400, "messages", "invalid_request_error")
    dead = as_api_error(EngineDeadError("loop crashed"))
    assert dead.status == 503 and dead.headers["Retry-After"] == "5"
    step = as_api_error(EngineStepError("CUDA error: device-side assert at 0x7f"))
    assert step.status == 500 and "0x7f" not in step.message
    other = as_api_error(KeyError("secret internals"))
    body = other.body()
    assert other.status == 500 and "secret" not in str(body) and body["data"] is None and body["code"] == 50000
