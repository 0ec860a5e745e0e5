"""Errors a caller can act on. `param` names the request field at fault, for the API's 400s."""

from __future__ import annotations


class InvalidParameter(ValueError):
    """A bad request setting."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(InvalidParameter):
    """A prompt that can never fit the model's context or the KV cache."""
