"""The generation routes: each hands its request to the pipeline (server/pipeline.py) with its
endpoint (server/generation.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from lmserve.server.apidocs import body_schema
from lmserve.server.generation import CHAT, COMPLETIONS
from lmserve.server.pipeline import GenerationPipeline


def generation_router(pipeline: GenerationPipeline) -> APIRouter:
    router = APIRouter()

    @router.post(CHAT.path, openapi_extra=body_schema("ChatCompletionRequest"))
    async def chat_completions(request: Request):
        """Chat completion (OpenAI-compatible), streamed (SSE) or not."""
        return await pipeline.handle(request, CHAT)

    @router.post(COMPLETIONS.path, openapi_extra=body_schema("CompletionRequest"))
    async def completions(request: Request):
        """Legacy prompt completion: one prompt (text or token ids), n, logprobs, echo, streamed or not."""
        return await pipeline.handle(request, COMPLETIONS)

    return router
