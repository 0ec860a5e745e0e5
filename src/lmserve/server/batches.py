"""/v1/batches, and the batch worker that runs their lines on this server's engines.

The worker claims lines from the platform database (platform/batches.py), runs each as the
interactive route would (the same request schema, backend `prepare` and response framing) but
at BATCH_PRIORITY, so the engine admits waiting interactive requests first, may preempt batch
sequences for them, and gives batch work at most its `batch_kv_share` of the KV cache. Each line
is metered through the same ledger (its row marked with the batch, priced at the batch price,
trace id `<batch>:<line>`, which the ledger keeps unique: a line run again after a crash is never
billed twice) and its result recorded in the database; only then is it done.

Shutdown (SIGTERM): no new line starts; lines in flight get the drain's grace period to finish
(they are short), then the rest are aborted and handed back (pending), to run again after restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import APIRouter, FastAPI, Request

from lmserve.backends.base import Backend, completion_backend
from lmserve.config import PlatformSettings
from lmserve.errors import BackendError, InvalidParameter, Refused
from lmserve.platform import batches as store
from lmserve.platform import keys
from lmserve.platform.files import FileStore
from lmserve.platform.service import Platform
from lmserve.server.body import read_json
from lmserve.server.chat import Timing
from lmserve.server.errors import APIError, as_api_error, bad_request, unknown_model
from lmserve.server.generation import COMPLETIONS, ENDPOINTS
from lmserve.server.metrics import Metrics

log = logging.getLogger("lmserve.batches")

BATCH_PRIORITY = 10  # vLLM's convention: larger is less urgent; interactive requests are 0
_PRINCIPAL_CACHE_S = 30.0  # a batch's key re-read this often (revocation, tier, balance)
_RATE_LIMIT_BACKOFF_S = 5.0


def batch_api(app: FastAPI, platform: Platform, backends: dict[str, Backend], metrics: Metrics,
              may_run) -> BatchWorker:
    """Mount /v1/files and /v1/batches on `app`; returns the worker (started and closed by the
    app's lifespan), which claims lines while `may_run()` (models loaded, not draining)."""
    from lmserve.server.files import files_router

    files = FileStore(platform.db, platform.settings.files_path)
    app.include_router(files_router(platform, platform.settings, files))
    app.include_router(batches_router(platform, backends, files))
    return BatchWorker(platform, backends, files, platform.settings, metrics, may_run)


def not_found(batch_id: str) -> APIError:
    return APIError(404, f"No such Batch object: {batch_id}", "batch_id", "batch_not_found")


def batches_router(platform: Platform, backends: dict[str, Backend], files: FileStore) -> APIRouter:
    router = APIRouter()
    db = platform.db

    @router.post("/v1/batches")
    async def create(request: Request):
        """Create a batch from an uploaded JSONL file; its lines are validated now."""
        principal = await platform.authenticate(request.headers.get("authorization"))
        payload = await read_json(request, 64 * 1024)
        file_id, endpoint = payload.get("input_file_id"), payload.get("endpoint")
        window, metadata, replace = payload.get("completion_window"), payload.get("metadata"), payload.get("replace")
        if not isinstance(file_id, str) or not file_id:
            raise bad_request("input_file_id is required", "input_file_id")
        if endpoint not in store.ENDPOINTS:
            raise bad_request(f"endpoint must be one of {', '.join(store.ENDPOINTS)}", "endpoint")
        if window not in store.WINDOWS:
            raise bad_request(f"completion_window must be one of {', '.join(store.WINDOWS)}", "completion_window")
        if metadata is not None and not (
                isinstance(metadata, dict) and len(metadata) <= store.MAX_METADATA_PAIRS
                and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                        for k, v in metadata.items())):
            raise bad_request(f"metadata must be at most {store.MAX_METADATA_PAIRS} string pairs (keys up to 64 "
                              "characters, values up to 512)", "metadata")
        model = None
        if replace is not None:
            if not isinstance(replace, dict) or set(replace) - {"model"} or not isinstance(replace.get("model"), str):
                raise bad_request("replace must be {\"model\": \"<model id>\"}", "replace")
            model = replace["model"]
            if model not in backends or not principal.may_use(model):
                raise unknown_model(model, [m for m in backends if principal.may_use(m)])
        row = await platform.run(files.get, file_id, principal.account_id)
        if row is None:
            raise APIError(404, f"No such File object: {file_id}", "input_file_id", "file_not_found")
        if row.purpose != "batch":
            raise bad_request(f"file {file_id} has purpose {row.purpose!r}, not \"batch\"", "input_file_id")

        def usable(m: str) -> str | None:
            if m not in backends:
                return f"model {m!r} does not exist"
            if not principal.may_use(m):
                return f"this API key may not use model {m!r}"
            return None

        raw = await asyncio.to_thread(files.read, file_id)
        lines, errors = await asyncio.to_thread(store.check_lines, raw, endpoint, model, usable)
        return await platform.run(store.create, db, account_id=principal.account_id, key_id=principal.key_id,
                                  endpoint=endpoint, input_file_id=file_id, window=window, model=model,
                                  metadata=metadata, lines=lines, errors=errors)

    @router.get("/v1/batches")
    async def list_batches(request: Request, after: str | None = None, limit: int = 20):
        principal = await platform.authenticate(request.headers.get("authorization"))
        if not 1 <= limit <= 100:
            raise bad_request("limit must be from 1 to 100", "limit")
        data, more = await platform.run(store.list_batches, db, principal.account_id, after, limit)
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @router.get("/v1/batches/{batch_id}")
    async def retrieve(request: Request, batch_id: str):
        principal = await platform.authenticate(request.headers.get("authorization"))
        found = await platform.run(store.get, db, batch_id, principal.account_id)
        if found is None:
            raise not_found(batch_id)
        return found

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel(request: Request, batch_id: str):
        principal = await platform.authenticate(request.headers.get("authorization"))
        try:
            found = await platform.run(store.cancel, db, batch_id, principal.account_id)
        except store.BatchError as e:
            raise APIError(e.status, e.message, e.param, e.code) from None
        if found is None:
            raise not_found(batch_id)
        return found

    return router


class BatchWorker:
    """Runs batch lines on this server: claims them, keeps their leases, finalizes batches."""

    def __init__(self, platform: Platform, backends: dict[str, Backend], files: FileStore,
                 settings: PlatformSettings, metrics: Metrics, may_run=lambda: True):
        self.platform = platform
        self.backends = backends
        self.files = files
        self.settings = settings
        self.metrics = metrics
        self.may_run = may_run
        self.worker_id = uuid.uuid4().hex
        self.inflight: dict[int, asyncio.Task] = {}
        self._principals: dict[int, tuple[float, keys.Principal]] = {}
        self._paused_until: dict[int, float] = {}  # key id -> when its TPD may admit again
        self._stopping = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop_claiming(self) -> None:
        self._stopping = True
        self._wake.set()

    async def close(self, grace_s: float) -> None:
        """Stop: lines in flight get `grace_s` to finish; the rest are aborted and handed back."""
        self.stop_claiming()
        if self.inflight:
            await asyncio.wait(list(self.inflight.values()), timeout=grace_s)
        left = list(self.inflight.values())
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        lease = self.settings.batch_lease_s
        last_renew = last_finalize = 0.0
        while not self._stopping:
            try:
                now = time.monotonic()
                if self.inflight and now - last_renew >= lease / 3:
                    await self.platform.run(store.renew, self.platform.db, self.worker_id, list(self.inflight), lease)
                    last_renew = now
                if now - last_finalize >= self.settings.batch_poll_s:
                    last_finalize = now
                    for batch_id in await self.platform.run(store.due, self.platform.db, lease):
                        if await self.platform.run(store.finalize, self.platform.db, self.files, batch_id, lease):
                            log.info("batch %s finalized", batch_id)
                room = self.settings.batch_concurrency - len(self.inflight)
                claimed = []
                if room > 0 and not self._stopping and self.may_run():
                    claimed = await self.platform.run(store.claim, self.platform.db, self.worker_id, room, lease)
                for line in claimed:
                    task = asyncio.get_running_loop().create_task(self._run(line))
                    self.inflight[line.id] = task
                    task.add_done_callback(lambda _t, i=line.id: self._done(i))
                if not claimed:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.settings.batch_poll_s)
                    except TimeoutError:
                        pass
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the database away: try again shortly
                log.warning("batch worker: %s: %s", type(e).__name__, e)
                await asyncio.sleep(self.settings.batch_poll_s)

    def _done(self, line_id: int) -> None:
        self.inflight.pop(line_id, None)
        self._wake.set()  # a seat is free: claim the next line now

    async def _principal(self, key_id: int) -> keys.Principal:
        cached = self._principals.get(key_id)
        if cached is not None and time.monotonic() - cached[0] < _PRINCIPAL_CACHE_S:
            return cached[1]
        principal = await self.platform.run(keys.bootstrap_principal, self.platform.db, key_id)
        self._principals[key_id] = (time.monotonic(), principal)
        return principal

    async def _run(self, line: store.ClaimedLine) -> None:
        db, worker = self.platform.db, self.worker_id
        try:
            if time.monotonic() < self._paused_until.get(line.key_id, 0.0):
                await asyncio.sleep(self._paused_until[line.key_id] - time.monotonic())
            principal = await self._principal(line.key_id)
            status, body, request_id = await self._execute(line, principal)
        except Refused as e:  # the key's TPD (the line waits for it), or the database away: run it later
            self._paused_until[line.key_id] = time.monotonic() + (e.retry_after or _RATE_LIMIT_BACKOFF_S)
            try:
                await self.platform.run(store.release, db, worker, [line.id])
            except Exception:
                pass  # its lease runs out instead
            return
        except asyncio.CancelledError:  # shutdown: someone runs it again later
            await asyncio.shield(self.platform.run(store.release, db, worker, [line.id]))
            raise
        except Exception:
            log.exception("batch line %s:%d failed", line.batch_id, line.line_no)
            status, body, request_id = 500, APIError(500, "internal server error", code="internal_error").body(), None
        ok = status == 200
        result = store.output_line(line.custom_id, status, request_id, body, None)
        if not await self.platform.run(store.complete, db, worker, line.id, ok, result):
            log.warning("batch line %s:%d finished after its lease was taken over; its result is dropped",
                        line.batch_id, line.line_no)

    async def _execute(self, line: store.ClaimedLine, principal: keys.Principal) -> tuple[int, dict, str | None]:
        """Run one line as its endpoint would; (status code, body, request id). Metered before it returns."""
        arrival = time.perf_counter()
        trace_id = f"{line.batch_id}:{line.line_no}"
        endpoint = ENDPOINTS[line.endpoint]
        request_id = f"{endpoint.id_prefix}-{uuid.uuid4().hex}"
        model = line.body.get("model") if isinstance(line.body.get("model"), str) else None
        try:
            req = endpoint.parse({**line.body, "priority": BATCH_PRIORITY})
            backend = self.backends.get(req.model)
            if backend is None:
                raise unknown_model(req.model)
            self.platform.authorize(principal, req.model)
            if endpoint is COMPLETIONS and (req.suffix or req.prompt_logprobs is not None
                                            or completion_backend(backend) is None):
                raise bad_request("this completion is not supported in a batch", "body")
            prepared = await endpoint.prepare(backend, req, request_id)
            job = prepared.job
            ticket = await self.platform.admit_batch_line(principal, req.model, job.prompt_tokens,
                                                          job.max_completion_tokens)
        except Refused as e:
            if e.status == 429:
                raise
            return await self._refused(principal, model, e, arrival, trace_id, line.batch_id, request_id)
        except (APIError, InvalidParameter, BackendError) as e:
            return await self._refused(principal, model, e, arrival, trace_id, line.batch_id, request_id)
        timing = Timing(arrival)
        status = 200
        out: dict | None = None
        try:
            await backend.open(job)
            out = await prepared.collect(backend, job, self.metrics, timing)
        except (APIError, InvalidParameter, BackendError) as e:
            err = as_api_error(e)
            status, out = err.status, err.body()
        except asyncio.CancelledError:
            raise  # not metered: an aborted line runs again, and is billed, once
        ledger = self.platform.finish(ticket, job.prompt_tokens, job.completion_tokens, status,
                                      (time.perf_counter() - arrival) * 1000, timing.ttft_ms, trace_id,
                                      batch_id=line.batch_id)
        await self.platform.settled(ledger)  # the row is in the database or the spool before the line is done
        return status, out, request_id

    async def _refused(self, principal, model, e, arrival, trace_id, batch_id, request_id):
        err = as_api_error(e)
        await self.platform.settled(self.platform.refused(principal, model, err.status,
                                                          (time.perf_counter() - arrival) * 1000, trace_id,
                                                          batch_id=batch_id))
        return err.status, err.body(), request_id

