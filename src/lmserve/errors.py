"""Errors a caller can act on. `param` names the request field at fault, for the API's 400s;
`BackendError` carries the status a backend's failure means for the client (503, 504, 429...)."""

from __future__ import annotations


class InvalidParameter(ValueError):
    """A bad request setting."""

    def __init__(self, param: str | None, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


class ContextLengthExceeded(InvalidParameter):
    """A prompt that can never fit the model's context or the KV cache."""

    def __init__(self, param: str | None, message: str):
        super().__init__(param, message, "context_length_exceeded")


class BackendError(RuntimeError):
    """A backend could not serve the request. `message` is safe to show the client (no internals);
    `retry_after` is seconds, for 429/503."""

    def __init__(self, status: int, message: str, code: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after


class Refused(BackendError):
    """The platform refused the request: 401 (key), 403 (model not allowed, balance), 429 (rate
    limit; `limit` names which)."""

    def __init__(self, status: int, message: str, code: str, retry_after: float | None = None,
                 limit: str | None = None):
        super().__init__(status, message, code, retry_after)
        self.limit = limit


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or of an unsupported architecture; the message
    names the file."""
