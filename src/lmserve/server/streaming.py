"""How a generation's work meets the connection: cancelled when the client leaves or shutdown
ends it, and an admission slot held until the streamed response is over, however it ends."""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import StreamingResponse

from lmserve.server.errors import APIError, shutting_down


async def unless_disconnected(request: Request, work, stop: asyncio.Event):
    """Run `work`, cancelling it if the client goes away first (its KV blocks are then freed
    instead of finishing a completion nobody will read) or when shutdown ends it."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if stop.is_set():
                task.cancel()
                raise shutting_down()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client closed the request", code="client_closed_request")
    finally:
        if not task.done():
            task.cancel()


async def until_stopped(chunks, stop: asyncio.Event):
    """The chunks, until shutdown says stop: then the pending step is cancelled (which aborts the
    request in its backend) and the stream ends with the shutdown error."""

    async def next_chunk():
        return await chunks.__anext__()

    stopped = asyncio.ensure_future(stop.wait())
    step = None
    try:
        while True:
            step = asyncio.ensure_future(next_chunk())
            await asyncio.wait({step, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                raise shutting_down()
            try:
                chunk = step.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        # Shutdown, or the client left (this generator is cancelled or closed): stop the pending
        # step first (a generator cannot be closed while a step of it runs), then close it.
        stopped.cancel()
        if step is not None and not step.done():
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
        await chunks.aclose()


def once(fn):
    """`fn`, callable any number of times, run the first time only."""
    done = False

    def call():
        nonlocal done
        if not done:
            done = True
            fn()

    return call


class AdmittedStreamingResponse(StreamingResponse):
    """A streamed response that holds an admission slot: released when the response is over,
    however it ends (finished, failed, client gone, cancelled). The body generator is closed right
    then too, so its cleanup (engine abort, metrics) never waits for the garbage collector."""

    def __init__(self, content, release, **kwargs):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self._release()
