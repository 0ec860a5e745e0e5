"""`Platform`: what the HTTP layer asks of the platform for each request.

    principal = await platform.authenticate(token)        # 401
    platform.authorize(principal, model)                   # 403: model not allowed, balance exhausted
    ticket = await platform.admit(principal, model, job)   # 429: rate limits (tokens reserved)
    ... the backend streams ...
    platform.finish(ticket, job, status, ...)              # settle tokens, write the ledger row

Database calls run in worker threads (never on the event loop). `finish` never blocks: it starts
the settlement and the ledger write as a task, and `drain()` (server shutdown) waits for every
one of them, so a request that ended, however it ended, has its row before the process exits.
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
from lmserve.platform.db import Database
from lmserve.platform.limits import Limit, MemoryLimiter, RedisLimiter, effective_limits, limits_for
from lmserve.platform.pricing import Price, price_for

log = logging.getLogger("lmserve.platform")

_LEDGER_ATTEMPTS = 4  # over about 3.5 s; then the row is logged in full instead


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
        self.db = Database(settings.db_url)
        self.limiter = (RedisLimiter(settings.redis_url, settings.redis_prefix) if settings.redis_url
                        else MemoryLimiter())
        self._api_keys = api_keys
        self._bootstrap: list[tuple[bytes, keys.Principal]] = []
        self._generated_key_id: int | None = None
        self._pending: set[asyncio.Task] = set()
        # The database's own threads: waiting on a lock or the network never takes a thread
        # from the default pool that tokenizing and grammar compiling use.
        self._executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="lmserve-db")

    async def run(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` (a blocking database call) on the platform's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args, **kwargs))

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
            except Exception as e:  # Redis down: refuse (never serve unmetered), and say it is ours
                log.error("rate limiter unavailable: %s", e)
                raise Refused(503, "rate limiting is unavailable; retry later", "limiter_unavailable",
                              retry_after=1) from None
            if denied is not None:
                retry = denied.retry_after_s
                raise Refused(429, denied.message, "rate_limit_exceeded", retry_after=retry,
                              limit=denied.limit.name.upper())
        return Ticket(principal, model, limits, reserved, price_for(deployment, principal.tier))

    def key_limits(self, principal: keys.Principal, model: str) -> dict[str, int | None]:
        """RPM/RPD/TPM/TPD of a (limited) key on one model: its tier's, the deployment's for that
        tier, then its own."""
        tier = principal.tier
        return effective_limits(self.settings.tiers.get(tier, {}), self.deployments[model].tier_limits.get(tier),
                                principal.key_limits)

    def finish(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int, status: int, latency_ms: float,
               ttft_ms: float | None, trace_id: str) -> None:
        p = ticket.principal
        entry = usage.UsageEntry(
            key_id=p.key_id, account_id=p.account_id, model=ticket.model, tier=p.tier, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, cost_nanos=ticket.price.cost_nanos(prompt_tokens, completion_tokens),
            status=status, latency_ms=latency_ms, ttft_ms=ttft_ms,
            trace_id=trace_id, charge=not p.unlimited)
        unused = ticket.reserved_tokens - (prompt_tokens + completion_tokens)
        task = asyncio.get_running_loop().create_task(self._settle_and_record(ticket, unused, entry))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _settle_and_record(self, ticket: Ticket, unused: int, entry: usage.UsageEntry) -> None:
        try:
            if unused and ticket.limits:
                await self.limiter.settle(ticket.limits, unused)
        except Exception:
            log.exception("settling rate-limit tokens failed (trace %s)", entry.trace_id)
        for attempt in range(_LEDGER_ATTEMPTS):
            try:
                await self.run(usage.record, self.db, entry)
                return
            except Exception as e:  # the database restarting, a lock timeout: try again shortly
                if attempt == _LEDGER_ATTEMPTS - 1:
                    log.error("the usage row could not be written (trace %s): %s %s", entry.trace_id,
                              type(e).__name__, entry)
                    return
                await asyncio.sleep(0.5 * 2**attempt)

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
        """Wait for every ledger write started so far (server shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        await self.limiter.close()
        self._executor.shutdown(wait=True)
        self.db.close()
