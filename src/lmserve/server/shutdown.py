"""The app under uvicorn: connection hygiene and graceful shutdown.

Shutdown (SIGTERM, or SIGINT / Ctrl-C): the server stops taking requests at once (new ones get
503, /health says "draining"), lets the requests in flight finish for up to `shutdown_grace_s`,
then ends the rest: a stream gets the API's error event and `data: [DONE]`, a plain request a
503, and the engine drops them. Then uvicorn closes the connections, the ledger rows are written
(or spooled), the engines stop, and the process exits 0. A second SIGINT exits at once.

What follows the grace period is bounded by `_END_S` (requests ending) + `_CLOSE_S` (uvicorn
closing connections) + the platform's `ledger_wait_s`: about 5 s, so the default grace of 25 s
fits Kubernetes' default terminationGracePeriodSeconds of 30 s (docs/operations.md).

Connection hygiene: h11 limits request heads received in pieces to `max_header_bytes`, the app
refuses a head that arrived in one piece and is larger (431), and a connection that has not sent
a complete request head within `header_timeout_s` of opening (or of its last response) is closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lmserve.config import ServerSettings

log = logging.getLogger("lmserve.server")

_END_S = 2.0  # after the grace period: for the requests told to stop to end (a cancelled step)
_CLOSE_S = 2.0  # then for uvicorn to close connections that are still open


class Drain:
    """Shutdown state the app reads: `draining` once a signal came, `stop` when the grace period
    is over and what is still in flight must end now."""

    def __init__(self):
        self.draining = False
        self.stop = asyncio.Event()


def draining_server(app, settings: ServerSettings, **uvicorn_options) -> DrainingServer:
    """A uvicorn server for `app` (created by create_app) with the drain and the limits above."""
    HeadTimeoutH11Protocol.head_timeout_s = settings.header_timeout_s
    config = uvicorn.Config(app, http=HeadTimeoutH11Protocol, h11_max_incomplete_event_size=settings.max_header_bytes,
                            timeout_graceful_shutdown=_CLOSE_S, **uvicorn_options)
    return DrainingServer(config, app.state.drain, app.state.admission, settings.shutdown_grace_s)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, admission, grace_s: float):
        super().__init__(config)
        self.drain = drain
        self.admission = admission
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._signalled = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Runs in the signal handler: only hand over to the loop. Unlike uvicorn's own handler it
        # does not re-raise the signal after shutdown, so a drained server exits 0.
        if self._signalled:
            if sig == signal.SIGINT:
                sys.stderr.write("lmserve: interrupted again, exiting now\n")
                sys.stderr.flush()
                os._exit(130)
            return
        self._signalled = True
        if self._loop is None:  # not serving yet
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, name: str) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit(name))

    async def _drain_then_exit(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        self.drain.draining = True
        log.info("%s: draining; %d request(s) in flight get up to %.0f s to finish", name, self.admission.total,
                 self.grace_s)
        deadline = loop.time() + self.grace_s
        while self.admission.total and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.admission.total:
            log.warning("grace period over: ending %d request(s) still in flight", self.admission.total)
            self.drain.stop.set()
            deadline = loop.time() + _END_S
            while self.admission.total and loop.time() < deadline:
                await asyncio.sleep(0.05)
        log.info("drained; shutting down")
        self.should_exit = True


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for the request head: a connection that sends
    nothing, or only part of a head, is closed when it passes (uvicorn only times out idle
    keep-alive connections, and only after a first response)."""

    head_timeout_s: float = 5.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole request head arrived
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A kept-alive connection's next head gets a deadline too, no shorter than uvicorn's
        # keep-alive timeout (which covers a connection that sends nothing more).
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._cancel_head_deadline()
            self._head_deadline = self.loop.call_later(max(self.head_timeout_s, self.timeout_keep_alive),
                                                       self._head_timed_out)

    def connection_lost(self, exc) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _cancel_head_deadline(self) -> None:
        deadline = getattr(self, "_head_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
