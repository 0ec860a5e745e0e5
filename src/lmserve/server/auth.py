"""The caller of a request: its API key checked by the platform, every refusal in the API's shape."""

from __future__ import annotations

from fastapi import Request

from lmserve.errors import Refused
from lmserve.platform.keys import Principal
from lmserve.platform.service import Platform
from lmserve.server.errors import as_api_error


async def authenticate(platform: Platform, request: Request) -> Principal:
    try:
        principal = await platform.authenticate(request.headers.get("authorization"))
    except Refused as e:
        raise as_api_error(e) from None
    request.state.account = principal.account_name  # for the access log
    return principal
