"""What a key may see: the deployed models (/v1/models) and its own account (/v1/user/*)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from lmserve.backends.base import Backend
from lmserve.platform.service import Platform
from lmserve.server.auth import authenticate
from lmserve.server.errors import APIError, bad_request


def models_router(backends: dict[str, Backend], platform: Platform) -> APIRouter:
    router = APIRouter()
    started = int(time.time())

    def card(backend: Backend) -> dict:
        """The model's entry, plus what a client (the playground) shows as "default": the values
        this deployment uses for fields a request leaves out, and its context length."""
        out = dict(backend.model_card(started))
        out["defaults"] = dict(backend.defaults)
        context = backend.context_len
        if context is not None:
            out["max_model_len"] = context
        return out

    @router.get("/v1/models")
    async def list_models(request: Request, type: str | None = None, sub_type: str | None = None):
        principal = await authenticate(platform, request)
        # Every model deployed here is a text chat model.
        match = (type in (None, "", "text")) and (sub_type in (None, "", "chat"))
        data = [card(b) for m, b in backends.items() if principal.may_use(m)] if match else []
        return {"object": "list", "data": data}

    @router.get("/v1/user/info")
    async def user_info(request: Request):
        principal = await authenticate(platform, request)
        return {"code": 20000, "message": "OK", "status": True, "data": await platform.user_info(principal)}

    @router.get("/v1/user/usage")
    async def user_usage(request: Request, days: str = "30"):
        """The calling key's usage per UTC day and model, and the limits it is held to."""
        principal = await authenticate(platform, request)
        if not days.isdigit() or not 1 <= int(days) <= 366:
            raise bad_request("days must be a whole number from 1 to 366", "days")
        return await platform.key_usage(principal, int(days))

    @router.get("/v1/models/{model_id:path}")
    async def retrieve_model(request: Request, model_id: str):
        principal = await authenticate(platform, request)
        backend = backends.get(model_id)
        if backend is None or not principal.may_use(model_id):
            raise APIError(404, f"Model does not exist: {model_id!r}", "model", "model_not_found")
        return card(backend)

    return router
