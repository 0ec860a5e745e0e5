"""Request bodies: read under the size cap and decoded as one JSON object, every mistake a 400 or
413 in the API's error shape (the routes validate the object themselves, see chat/schemas.py)."""

from __future__ import annotations

import asyncio
import json

from fastapi import Request

from lmserve.server.errors import APIError, bad_request

# Bodies above this are decoded on a worker thread: parsing megabytes would stall the event loop.
_INLINE_JSON_BYTES = 64 * 1024


async def read_json(request: Request, cap: int) -> dict:
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
