"""API errors in the double shape both OpenAI-style and platform-style clients read:

    {"error": {"message", "type", "param", "code"}, "code": <platform number>, "message", "data": null}
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmserve.errors import BackendError, InvalidParameter

log = logging.getLogger("lmserve.server")

# Platform numeric codes. 20012 is the hosted platform's "Model does not exist"; the others are
# ours, one per status, so a client can branch on the number alone.
PLATFORM_CODES = {400: 20015, 401: 20001, 403: 20003, 404: 20004, 405: 20005, 413: 20013, 429: 20029,
                  500: 50000, 502: 50002, 503: 50003, 504: 50004}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               431: "invalid_request_error",
               429: "rate_limit_error", 500: "internal_error", 502: "upstream_error", 503: "overloaded_error",
               504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 platform_code: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.platform_code = platform_code or PLATFORM_CODES.get(status, status * 100)
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "api_error"),
                      "param": self.param, "code": self.code},
            "code": self.platform_code,
            "message": self.message,
            "data": None,
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


_LISTED_MODELS = 20  # beyond this many, the message points to /v1/models instead of growing


def unknown_model(model: str, deployed: list[str] | None = None) -> APIError:
    """The platform's 400 (code 20012), naming the ids this key may use so a typo is seen at once."""
    message = f"Model does not exist: {model!r}"
    if deployed is not None:
        shown = ", ".join(deployed[:_LISTED_MODELS]) or "none for this key"
        more = f" and {len(deployed) - _LISTED_MODELS} more (GET /v1/models)" if len(deployed) > _LISTED_MODELS else ""
        message += f". Deployed models: {shown}{more}"
    return APIError(400, message, "model", "model_not_found", 20012)


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry the request", code="server_shutting_down",
                    headers={"Retry-After": "1"})


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


def install_error_handlers(app: FastAPI) -> None:
    """Every error a route raises answers in the API's shape (above)."""

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
