"""`Platform`: what the HTTP layer asks of the platform for each request.

    principal = await platform.authenticate(token)        # 401
    platform.authorize(principal, model)                   # 403: model not allowed, balance exhausted
    ticket = await platform.admit(principal, model, job)   # 429: rate limits (tokens reserved)
    ... the backend streams ...
    platform.finish(ticket, job, status, ...)              # settle tokens, write the ledger row
    platform.refused(principal, model, status, ...)        # the row of a request refused after 401

Database calls run in worker threads (never on the event loop). `finish` never blocks: it starts
the ledger write and the settlement as a task (which the server awaits before the answer's last
byte, `settled`), and `drain()` (server shutdown) waits for every one of them.

Failures of the database or Redis are never a 500 (docs/operations.md, "Failure policy"): a call
that cannot reach them raises `StoreUnavailable` (503 with Retry-After). A ledger row the database
does not take within `ledger_wait_s` goes to the spool file (`platform/spool.py`), durably, and a
background task replays it when the database is back; the trace id's unique constraint keeps
every request to exactly one row.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from lmserve.config import ModelDeployment, PlatformSettings
from lmserve.errors import Refused
from lmserve.platform import keys, usage
from lmserve.platform.db import Database, Timeouts, is_store_error
from lmserve.platform.limits import Limit, MemoryLimiter, RedisLimiter, effective_limits, limits_for
from lmserve.platform.pricing import Price, batch_price_for, price_for
from lmserve.platform.spool import UsageSpool

log = logging.getLogger("lmserve.platform")

_REPLAY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)  # between spool replays while the database stays away
_PROBE_CACHE_S = 1.0  # /health/ready probes the stores at most this often
_WARN_EVERY_S = 5.0  # "database unavailable" in the log at most this often
_MODEL_NAME_CAP = 300  # the ledger's model column; a refused request may name anything


class StoreUnavailable(Refused):
    """The platform's database or Redis cannot be reached (or answers too slowly) right now."""

    def __init__(self, what: str = "database"):
        super().__init__(503, f"the platform {what} is unavailable; retry later", "platform_unavailable",
                         retry_after=2)


@dataclass
class Ticket:
    principal: keys.Principal
    model: str
    limits: list[Limit]
    reserved_tokens: int
    price: Price


class Platform:
    def __init__(self, settings: PlatformSettings, deployments: dict[str, ModelDeployment], api_keys: list[str]):
        self.settings = settings
        self.deployments = deployments
        self.db = Database(settings.db_url, Timeouts(settings.db_connect_timeout_s, settings.db_statement_timeout_s,
                                                     settings.db_pool_timeout_s))
        self.limiter = (RedisLimiter(settings.redis_url, settings.redis_prefix,
                                     connect_timeout_s=settings.redis_connect_timeout_s,
                                     timeout_s=settings.redis_timeout_s) if settings.redis_url
                        else MemoryLimiter())
        self.spool = UsageSpool(settings.data_dir)
        self.limiter_bypassed = 0  # requests served unlimited under on_limiter_unavailable: allow
        self._replayer: asyncio.Task | None = None
        self._probe: tuple[float, dict] | None = None
        self._store_warned = self._limiter_warned = -_WARN_EVERY_S
        self._api_keys = api_keys
        self._bootstrap: list[tuple[bytes, keys.Principal]] = []
        self._generated_key_id: int | None = None
        self._pending: set[asyncio.Task] = set()
        # The database's own threads: waiting on a lock or the network never takes a thread
        # from the default pool that tokenizing and grammar compiling use.
        self._executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="lmserve-db")
        # Spool appends get a thread of their own: they must not queue behind database calls
        # that wait on a database that is away.
        self._spool_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmserve-spool")

    async def run(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` (a blocking database call) on the platform's threads; the
        database being unreachable raises StoreUnavailable (a 503), never anything a 500 is made of."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args, **kwargs))
        except Exception as e:
            if is_store_error(e):
                now = time.monotonic()
                if now - self._store_warned >= _WARN_EVERY_S:  # an outage under load: a line, not a flood
                    self._store_warned = now
                    log.warning("platform database unavailable: %s: %s", type(e).__name__,
                                (str(e).splitlines() or [""])[0])
                raise StoreUnavailable() from e
            raise

    def start(self) -> None:
        """Create or upgrade the schema, import the config's keys, and check Redis (blocking;
        before serving: a wrong URL fails at start, not on the first request)."""
        self.db.migrate()
        if self.settings.redis_url:
            import redis

            client = redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=5)
            try:
                client.ping()
            finally:
                client.close()
        self._bootstrap = []
        for admin, key_list in ((False, self._api_keys), (True, self.settings.admin_keys)):
            for key, key_id in keys.import_bootstrap_keys(self.db, key_list, admin=admin).items():
                self._bootstrap.append((key.encode(), keys.bootstrap_principal(self.db, key_id)))
        if self.spool.depth:  # rows a previous run spooled and did not land (it was killed, say)
            log.info("usage spool: replaying %d row(s) left by a previous run", self.spool.depth)
            self.spool.replay(partial(usage.record, self.db))

    def adopt_generated_key(self, key: str, owner: str) -> None:
        """Accept the key this server generated, from now on (blocking; called once the models have
        loaded, so a failed start leaves no key in the database)."""
        key_id = keys.register_generated_key(self.db, key, owner)
        self._generated_key_id = key_id
        # a new list, not an append: the event loop may be iterating the old one
        self._bootstrap = [*self._bootstrap, (key.encode(), keys.bootstrap_principal(self.db, key_id))]

    def release_generated_key(self) -> None:
        """The server stops: its generated key is revoked (no other server accepts it)."""
        key_id, self._generated_key_id = self._generated_key_id, None
        if key_id is not None:
            try:
                keys.release_generated_key(self.db, key_id)
            except Exception as e:  # the database went away first: `keys list` shows it orphaned
                log.warning("could not revoke this server's generated key: %s", e)

    # ---- per request -------------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> keys.Principal:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Refused(401, "missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        found = None
        for key, principal in self._bootstrap:  # every one compared: timing does not tell which matched
            if hmac.compare_digest(token.encode(), key):
                found = principal
        if found is not None:
            return found
        try:
            return await self.run(keys.authenticate, self.db, token)
        except keys.AuthFailed as e:
            raise Refused(401, e.message, "invalid_api_key") from None

    async def authenticate_admin(self, authorization: str | None) -> keys.Principal:
        principal = await self.authenticate(authorization)
        if not principal.is_admin:
            raise Refused(403, "this endpoint needs an admin key", "admin_only")
        return principal

    def authorize(self, principal: keys.Principal, model: str) -> None:
        if not principal.may_use(model):
            raise Refused(403, f"this API key may not use model {model!r}", "model_not_allowed")
        if principal.unlimited:
            return
        price = price_for(self.deployments[model], principal.tier)
        if not price.free and principal.total_balance_nanos <= 0:
            raise Refused(403, "the account's balance is exhausted; top it up to use paid models",
                          "insufficient_balance")

    async def admit(self, principal: keys.Principal, model: str, prompt_tokens: int,
                    max_completion_tokens: int) -> Ticket:
        deployment = self.deployments[model]
        limits: list[Limit] = []
        reserved = prompt_tokens + max_completion_tokens
        if not principal.unlimited:
            limits = limits_for("key", principal.key_id, model, self.key_limits(principal, model))
            limits += limits_for("account", principal.account_id, model, principal.account_limits)
            try:
                denied = await self.limiter.acquire(limits, reserved)
            except Exception as e:  # Redis down or too slow (bounded by redis_timeout_s)
                warn = time.monotonic() - self._limiter_warned >= _WARN_EVERY_S
                if warn:
                    self._limiter_warned = time.monotonic()
                if self.settings.on_limiter_unavailable == "allow":
                    # the operator chose availability over limits: served, unlimited, and counted
                    self.limiter_bypassed += 1
                    if warn:
                        log.warning("rate limiter unavailable (%s: %s): serving without rate limits "
                                    "(platform.on_limiter_unavailable: allow)", type(e).__name__, e)
                    return Ticket(principal, model, [], reserved, price_for(deployment, principal.tier))
                if warn:
                    log.error("rate limiter unavailable: %s: %s", type(e).__name__, e)
                raise Refused(503, "rate limiting is unavailable; retry later", "limiter_unavailable",
                              retry_after=1) from None
            if denied is not None:
                retry = denied.retry_after_s
                raise Refused(429, denied.message, "rate_limit_exceeded", retry_after=retry,
                              limit=denied.limit.name.upper())
        return Ticket(principal, model, limits, reserved, price_for(deployment, principal.tier))

    async def admit_batch_line(self, principal: keys.Principal, model: str, prompt_tokens: int,
                               max_completion_tokens: int) -> Ticket:
        """A batch line: held to the key's and account's tokens per day only (batch work is not
        interactive traffic: RPM, RPD and TPM do not apply), priced at the deployment's batch price.
        A denial raises Refused 429 (the worker puts the line back and waits)."""
        deployment = self.deployments[model]
        reserved = prompt_tokens + max_completion_tokens
        limits: list[Limit] = []
        if not principal.unlimited:
            limits = [lim for lim in limits_for("key", principal.key_id, model, self.key_limits(principal, model))
                      + limits_for("account", principal.account_id, model, principal.account_limits)
                      if lim.name == "tpd"]
            denied = await self.limiter.acquire(limits, reserved) if limits else None
            if denied is not None:
                raise Refused(429, denied.message, "rate_limit_exceeded", retry_after=denied.retry_after_s,
                              limit="TPD")
        return Ticket(principal, model, limits, reserved, batch_price_for(deployment, principal.tier))

    def key_limits(self, principal: keys.Principal, model: str) -> dict[str, int | None]:
        """RPM/RPD/TPM/TPD of a (limited) key on one model: its tier's, the deployment's for that
        tier, then its own."""
        tier = principal.tier
        return effective_limits(self.settings.tiers.get(tier, {}), self.deployments[model].tier_limits.get(tier),
                                principal.key_limits)

    def finish(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int, status: int, latency_ms: float,
               ttft_ms: float | None, trace_id: str, batch_id: str | None = None) -> asyncio.Task:
        """The request ended (however): write its ledger row and settle its reserved tokens.
        Returns the row's task; `settled(task)` waits until it is in the database or the spool."""
        p = ticket.principal
        entry = usage.UsageEntry(
            key_id=p.key_id, account_id=p.account_id, model=ticket.model, tier=p.tier, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, cost_nanos=ticket.price.cost_nanos(prompt_tokens, completion_tokens),
            status=status, latency_ms=latency_ms, ttft_ms=ttft_ms,
            trace_id=trace_id, charge=not p.unlimited, created_at=time.time(), batch_id=batch_id)
        unused = ticket.reserved_tokens - (prompt_tokens + completion_tokens)
        if unused and ticket.limits:  # beside the row: the answer waits for the row only
            self._track(self._settle(ticket, unused, trace_id))
        return self._track(self._land(entry))

    def refused(self, principal: keys.Principal, model: str | None, status: int, latency_ms: float,
                trace_id: str, batch_id: str | None = None) -> asyncio.Task:
        """The ledger row of a generation request refused after its key was accepted (400, 403
        balance or model, 429, 503): no tokens, cost 0, its status."""
        entry = usage.UsageEntry(
            key_id=principal.key_id, account_id=principal.account_id, model=(model or "")[:_MODEL_NAME_CAP],
            tier=principal.tier, prompt_tokens=0, completion_tokens=0, cost_nanos=0, status=status,
            latency_ms=latency_ms, ttft_ms=None, trace_id=trace_id, charge=False, created_at=time.time(),
            batch_id=batch_id)
        return self._track(self._land(entry))

    def _track(self, work) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    @staticmethod
    async def settled(task: asyncio.Task | None) -> None:
        """Wait until a ledger task has put its row in the database or the spool (bounded by
        ledger_wait_s plus one fsync). Cancelling the waiter leaves the task running."""
        if task is not None:
            await asyncio.gather(asyncio.shield(task), return_exceptions=True)

    async def _settle(self, ticket: Ticket, unused: int, trace_id: str) -> None:
        """Give back the reserved tokens the request did not use (bounded by redis_timeout_s)."""
        try:
            await self.limiter.settle(ticket.limits, unused)
        except Exception as e:
            log.warning("settling rate-limit tokens failed (trace %s): %s: %s", trace_id, type(e).__name__, e)

    async def _land(self, entry: usage.UsageEntry) -> None:
        """The row into the database, or, if it is not there within ledger_wait_s, into the
        spool. A write still running then may commit later: the replay then skips the row."""
        write = asyncio.ensure_future(self.run(usage.record, self.db, entry))
        write.add_done_callback(_consume)
        try:
            await asyncio.wait_for(asyncio.shield(write), self.settings.ledger_wait_s)
            return
        except TimeoutError:
            log.warning("the usage row of trace %s is not committed after %.1f s: spooling it", entry.trace_id,
                        self.settings.ledger_wait_s)
        except StoreUnavailable:
            pass  # logged by run()
        except Exception:
            log.exception("the usage row of trace %s could not be written: spooling it", entry.trace_id)
        try:
            await asyncio.get_running_loop().run_in_executor(self._spool_executor, self.spool.append, entry)
        except Exception:  # the disk too: the row is lost, so it is logged in full
            log.exception("the usage row could not be spooled either (trace %s): %s", entry.trace_id, entry)
            return
        self._start_replayer()

    def _start_replayer(self) -> None:
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.get_running_loop().create_task(self._replay_loop())

    async def _replay_loop(self) -> None:
        """Replay the spool until it is empty, backing off while the database stays away."""
        failures = 0
        while self.spool.depth:
            try:
                await self.run(self.spool.replay, partial(usage.record, self.db))
                failures = 0
            except StoreUnavailable:
                await asyncio.sleep(_REPLAY_BACKOFF_S[min(failures, len(_REPLAY_BACKOFF_S) - 1)])
                failures += 1
            except Exception:
                log.exception("usage spool replay failed")
                await asyncio.sleep(_REPLAY_BACKOFF_S[-1])

    async def store_status(self) -> dict[str, str]:
        """The platform's stores for /health/ready: "ok" or "unavailable" each (probed at most
        once a second), and the spool's depth when rows wait in it."""
        now = time.monotonic()
        if self._probe is not None and now - self._probe[0] < _PROBE_CACHE_S:
            return self._probe[1]
        status: dict = {}
        try:
            await self.run(self.db.ping)
            status["database"] = "ok"
        except Exception:
            status["database"] = "unavailable"
        if isinstance(self.limiter, RedisLimiter):
            try:
                await self.limiter.ping()
                status["redis"] = "ok"
            except Exception:
                status["redis"] = "unavailable"
        if self.spool.depth:
            status["usage_spool_rows"] = self.spool.depth
        self._probe = (now, status)
        return status

    def collect(self):
        """Prometheus collector (registered with the server's metrics): the spool and the limiter."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("lmserve_usage_spool_rows", "Ledger rows in the spool file, not yet in the database.",
                                value=self.spool.depth)
        yield GaugeMetricFamily("lmserve_usage_spool_oldest_age_seconds",
                                "Age of the oldest ledger row waiting in the spool (0: none).",
                                value=self.spool.oldest_age_s())
        yield CounterMetricFamily("lmserve_limiter_bypassed", "Requests served without rate limits because "
                                  "Redis was unavailable (platform.on_limiter_unavailable: allow).",
                                  value=self.limiter_bypassed)

    async def user_info(self, principal: keys.Principal) -> dict:
        return await self.run(usage.user_info, self.db, principal.account_id)

    async def key_usage(self, principal: keys.Principal, days: int) -> dict:
        """The calling key's usage per day and model over the last `days` UTC days (today
        included), with the limits it is held to on each model it may use."""
        today = int(time.time() // 86400)
        since = (today - days + 1) * 86400
        rows = await self.run(usage.daily, self.db, principal.key_id, since)
        per_model: dict[str, dict[str, int | None]] = {}
        if not principal.unlimited:
            for model in self.deployments:
                if principal.may_use(model):
                    per_model[model] = self.key_limits(principal, model)
        return {"object": "usage", "key": principal.key_prefix + "...", "account": principal.account_name,
                "tier": principal.tier, "unlimited": principal.unlimited, "days": days,
                "since": time.strftime("%Y-%m-%d", time.gmtime(since)),
                "limits": {"per_model": per_model,
                           "account": {} if principal.unlimited else dict(principal.account_limits)},
                "data": rows}

    async def drain(self) -> None:
        """Wait for every ledger row started so far to be in the database or the spool (server
        shutdown: each takes at most ledger_wait_s plus one fsync)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        if self._replayer is not None:  # what it has not landed stays spooled for the next start
            self._replayer.cancel()
            await asyncio.gather(self._replayer, return_exceptions=True)
        await self.limiter.close()
        self._spool_executor.shutdown(wait=True)
        # Writes still waiting on the database are bounded by its timeouts; their rows are spooled.
        self._executor.shutdown(wait=True)
        self.db.close()


def _consume(task: asyncio.Future) -> None:
    """A ledger write that finished after its row was spooled: its failure was handled already."""
    if not task.cancelled():
        task.exception()
