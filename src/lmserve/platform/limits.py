"""Rate limits: RPM, RPD, TPM, TPD per key and per account, per model, by GCRA.

GCRA (the generic cell rate algorithm) keeps one number per limit, the theoretical arrival time
(TAT): a limit of L per period T lets each unit advance it by T/L, and a request of cost c is
allowed while max(TAT, now) + c*T/L - now <= T. That is a sliding window in effect: a full burst
of L is allowed from rest, then exactly the rate, and there is no boundary where 2L get through
as with fixed windows. When a request is refused, the time until it would be allowed is exact,
so `Retry-After` (rounded up) is right: a client that waits that long gets through.

Token limits reserve prompt + max_tokens at admission and `settle` the difference when the
request ends (refunding what was not generated). Several limits are checked and taken together
or not at all: a request refused by TPM does not spend RPM.

`MemoryLimiter` serves one process; `RedisLimiter` keeps the same state in Redis (one Lua script
per admission, atomic, using Redis' clock) for several API servers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

PERIODS = {"rpm": 60.0, "rpd": 86400.0, "tpm": 60.0, "tpd": 86400.0}
TOKEN_LIMITS = ("tpm", "tpd")


@dataclass(frozen=True)
class Limit:
    """One limit on one scope: `key` names the counter (scope, model and limit name)."""

    key: str
    name: str  # rpm | rpd | tpm | tpd
    limit: int
    scope: str  # "key" or "account", for the message

    @property
    def period(self) -> float:
        return PERIODS[self.name]

    @property
    def interval(self) -> float:
        return self.period / self.limit


@dataclass
class Denied:
    limit: Limit
    cost: int
    retry_after: float | None  # None: the request alone exceeds the limit; waiting will not help

    @property
    def message(self) -> str:
        name = self.limit.name.upper()
        what = "requests" if self.limit.name in ("rpm", "rpd") else "tokens"
        per = "minute" if self.limit.name.endswith("m") else "day"
        if self.retry_after is None:
            return (f"rate limit {name} exceeded: this request needs {self.cost} {what} (prompt + max_tokens) but the "
                    f"{self.limit.scope}'s {name} limit is {self.limit.limit} {what} per {per}; lower max_tokens")
        return (f"rate limit {name} exceeded: {self.limit.limit} {what} per {per} for this {self.limit.scope}; "
                f"retry after {self.retry_after_s} s")

    @property
    def retry_after_s(self) -> int | None:
        return None if self.retry_after is None else max(1, math.ceil(self.retry_after - 1e-9))


def cost_of(limit: Limit, tokens: int) -> int:
    return tokens if limit.name in TOKEN_LIMITS else 1


def gcra(tat: float | None, now: float, cost: int, limit: Limit) -> tuple[bool, float]:
    """(allowed, new TAT if allowed else seconds until it would be)."""
    base = now if tat is None or tat < now else tat
    new_tat = base + cost * limit.interval
    wait = new_tat - now - limit.period
    if wait > 1e-9:
        return False, wait
    return True, new_tat


class MemoryLimiter:
    """In-process GCRA state. Admission runs without awaiting, so it is atomic on the event loop."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self.tat: dict[str, float] = {}

    async def acquire(self, limits: list[Limit], tokens: int) -> Denied | None:
        return self.acquire_now(limits, tokens, self.clock())

    def acquire_now(self, limits: list[Limit], tokens: int, now: float) -> Denied | None:
        new: dict[str, float] = {}
        worst: Denied | None = None
        for limit in limits:
            cost = cost_of(limit, tokens)
            if cost > limit.limit:
                return Denied(limit, cost, None)
            ok, value = gcra(self.tat.get(limit.key), now, cost, limit)
            if ok:
                new[limit.key] = value
            elif worst is None or value > worst.retry_after:
                worst = Denied(limit, cost, value)
        if worst is not None:
            return worst
        self.tat.update(new)
        if len(self.tat) > 100_000:  # forget counters that are back at rest
            self.tat = {k: v for k, v in self.tat.items() if v > now}
        return None

    async def settle(self, limits: list[Limit], delta_tokens: int) -> None:
        self.settle_now(limits, delta_tokens, self.clock())

    def settle_now(self, limits: list[Limit], delta_tokens: int, now: float) -> None:
        """Give back `delta_tokens` (negative: take more) on the token limits."""
        for limit in limits:
            if limit.name not in TOKEN_LIMITS or not delta_tokens:
                continue
            tat = self.tat.get(limit.key, now)
            self.tat[limit.key] = max(tat, now) + (-delta_tokens) * limit.interval if delta_tokens < 0 \
                else max(tat - delta_tokens * limit.interval, now)

    async def close(self) -> None:
        pass


# KEYS: one TAT key per limit. ARGV: tokens, then per limit: interval, period, cost.
# Returns {0} when taken, else {1, index of the worst limit (1-based), wait in microseconds}
# ({2, index} when a request's cost exceeds a limit outright).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local news = {}
local worst, worst_wait = 0, 0
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[3 * i - 2])
  local period = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  if cost * interval > period + 1e-9 then return {2, i} end
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + cost * interval
  local wait = new_tat - now - period
  if wait > 1e-9 then
    if wait > worst_wait then worst, worst_wait = i, wait end
  else
    news[i] = new_tat
  end
end
if worst > 0 then return {1, worst, math.ceil(worst_wait * 1e6)} end
for i, key in ipairs(KEYS) do
  local period = tonumber(ARGV[3 * i - 1])
  redis.call('SET', key, string.format('%.6f', news[i]), 'PX', math.ceil((news[i] - now + 1) * 1000))
end
return {0}
"""

# KEYS: TAT keys of token limits. ARGV: per limit: interval, delta tokens (positive: refund).
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local delta = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat - delta * interval
  if new_tat < now then new_tat = now end
  if new_tat > now then
    redis.call('SET', key, string.format('%.6f', new_tat), 'PX', math.ceil((new_tat - now + 1) * 1000))
  else
    redis.call('DEL', key)
  end
end
return 0
"""


class RedisLimiter:
    """The same GCRA, its state in Redis: every API server sharing the URL shares the limits."""

    def __init__(self, url: str, prefix: str = "lmserve:rl:", connect_timeout_s: float = 0.5, timeout_s: float = 0.5):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError

        # Every wait is bounded: a frozen Redis costs a request `timeout_s`, not redis-py's
        # default of none. One immediate retry on a broken connection (a pooled connection to a
        # Redis that restarted) reconnects; a timeout is not retried, which would double the wait.
        self.redis = aioredis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s,
                                             retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)))
        self.prefix = prefix
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._settle = self.redis.register_script(_SETTLE)

    async def acquire(self, limits: list[Limit], tokens: int) -> Denied | None:
        if not limits:
            return None
        args: list[float] = []
        for limit in limits:
            args += [repr(limit.interval), repr(limit.period), cost_of(limit, tokens)]
        result = await self._acquire(keys=[self.prefix + limit.key for limit in limits], args=args)
        if int(result[0]) == 0:
            return None
        limit = limits[int(result[1]) - 1]
        if int(result[0]) == 2:
            return Denied(limit, cost_of(limit, tokens), None)
        return Denied(limit, cost_of(limit, tokens), int(result[2]) / 1e6)

    async def settle(self, limits: list[Limit], delta_tokens: int) -> None:
        token_limits = [limit for limit in limits if limit.name in TOKEN_LIMITS]
        if not token_limits or not delta_tokens:
            return
        args: list[float] = []
        for limit in token_limits:
            args += [repr(limit.interval), delta_tokens]
        await self._settle(keys=[self.prefix + limit.key for limit in token_limits], args=args)

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()


def effective_limits(tier_defaults: dict[str, int | None], deployment_tier: dict[str, int | None] | None,
                     key_overrides: dict[str, int | None]) -> dict[str, int | None]:
    """A key's limits on one model: its tier's defaults, the deployment's limits for that tier,
    then the key's own overrides, each replacing the one before where set."""
    out = dict(tier_defaults)
    out.update({k: v for k, v in (deployment_tier or {}).items()})
    out.update({k: v for k, v in key_overrides.items() if v is not None})
    return out


def limits_for(scope: str, scope_id: int, model: str, values: dict[str, int | None]) -> list[Limit]:
    return [Limit(f"{scope[0]}{scope_id}:{model}:{name}", name, value, scope)
            for name, value in values.items() if value]
