"""/tokenize and /detokenize: a model's tokenizer, for the backends that declare one."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from lmserve.backends.base import Backend, TokenizerBackend, tokenizer_backend
from lmserve.chat.schemas import DetokenizeRequest, TokenizeRequest, validate
from lmserve.platform.keys import Principal
from lmserve.platform.service import Platform
from lmserve.server.apidocs import body_schema
from lmserve.server.auth import authenticate
from lmserve.server.body import read_json
from lmserve.server.errors import APIError, bad_request, unknown_model


def tokenize_router(backends: dict[str, Backend], platform: Platform, max_body_bytes: int) -> APIRouter:
    router = APIRouter()

    def tokenizer_of(principal: Principal, model: str) -> TokenizerBackend:
        backend = backends.get(model)
        if backend is None:
            raise unknown_model(model, [m for m in backends if principal.may_use(m)])
        if not principal.may_use(model):  # tokenizing costs nothing: no balance check
            raise APIError(403, f"this API key may not use model {model!r}", "model", "model_not_allowed")
        tokenizer = tokenizer_backend(backend)
        if tokenizer is None:
            raise bad_request(f"model {model!r} does not expose its tokenizer", "model")
        return tokenizer

    @router.post("/tokenize", openapi_extra=body_schema("TokenizeRequest"))
    async def tokenize(request: Request):
        """Token ids of a text, or of a conversation rendered by the model's chat template."""
        principal = await authenticate(platform, request)
        req = validate(TokenizeRequest, await read_json(request, max_body_bytes))
        backend = tokenizer_of(principal, req.model)
        ids = await asyncio.to_thread(backend.tokenize, req)
        return {"tokens": ids, "count": len(ids), "max_model_len": backend.context_len}

    @router.post("/detokenize", openapi_extra=body_schema("DetokenizeRequest"))
    async def detokenize(request: Request):
        """The text of a list of token ids."""
        principal = await authenticate(platform, request)
        req = validate(DetokenizeRequest, await read_json(request, max_body_bytes))
        backend = tokenizer_of(principal, req.model)
        return {"prompt": await asyncio.to_thread(backend.detokenize, req.tokens)}

    return router
