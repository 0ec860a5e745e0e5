"""GCRA rate limits: the in-process limiter with an explicit clock (exact arithmetic), and the
Redis limiter against a real redis-server (real time, short intervals)."""

from __future__ import annotations

import asyncio
import time

import pytest

from lmserve.platform.limits import Limit, MemoryLimiter, RedisLimiter, effective_limits, limits_for


def rpm(n: int, key: str = "k1:m:rpm") -> Limit:
    return Limit(key, "rpm", n, "key")


def test_burst_then_rate_and_exact_retry_after():
    lim = MemoryLimiter()
    limits = [rpm(3)]
    t0 = 1_000.0
    for _ in range(3):
        assert lim.acquire_now(limits, 0, t0) is None
    denied = lim.acquire_now(limits, 0, t0)
    assert denied.limit.name == "rpm" and denied.retry_after == pytest.approx(20.0)
    assert denied.retry_after_s == 20 and "RPM" in denied.message
    # Waiting just short of Retry-After is still too early; waiting it gets through.
    assert lim.acquire_now(limits, 0, t0 + 19.9) is not None
    assert lim.acquire_now(limits, 0, t0 + 20.0) is None


def test_no_double_burst_at_a_window_boundary():
    """A fixed window would allow 2x around the boundary; GCRA allows the limit, then the rate."""
    lim = MemoryLimiter()
    limits = [rpm(60)]
    allowed = sum(lim.acquire_now(limits, 0, 59.9) is None for _ in range(200))
    allowed += sum(lim.acquire_now(limits, 0, 60.1) is None for _ in range(200))
    assert allowed == 60


def test_token_reservation_and_settlement():
    lim = MemoryLimiter()
    limits = [Limit("k1:m:tpm", "tpm", 1000, "key"), rpm(100)]
    t = 0.0
    assert lim.acquire_now(limits, 900, t) is None  # prompt + max_tokens reserved
    denied = lim.acquire_now(limits, 200, t)
    assert denied.limit.name == "tpm" and denied.retry_after == pytest.approx(6.0)
    lim.settle_now(limits, 800, t)  # it used 100 of the 900: the rest comes back at once
    assert lim.acquire_now(limits, 200, t) is None
    # All or nothing: the refused TPM request did not spend RPM.
    assert lim.tat["k1:m:rpm"] == pytest.approx(2 * 60 / 100)


def test_a_request_larger_than_the_limit_is_refused_without_retry_after():
    denied = MemoryLimiter().acquire_now([Limit("k:m:tpd", "tpd", 100, "key")], 101, 0.0)
    assert denied.retry_after is None and denied.retry_after_s is None and "lower max_tokens" in denied.message


def test_limits_resolve_tier_deployment_then_key():
    values = effective_limits({"rpm": 10, "tpm": 100, "rpd": None, "tpd": None}, {"rpm": 20},
                              {"rpm": None, "tpm": 5, "rpd": None, "tpd": None})
    assert values == {"rpm": 20, "tpm": 5, "rpd": None, "tpd": None}
    assert [(x.name, x.limit) for x in limits_for("key", 7, "m", values)] == [("rpm", 20), ("tpm", 5)]


def test_redis_limiter_against_real_redis(redis_limiter_args):
    async def main():
        lim = RedisLimiter(**redis_limiter_args)
        try:
            await lim.ping()
            tpm = [Limit("k9:m:tpm", "tpm", 6000, "key")]  # 0.01 s per token
            emptied = time.monotonic()
            assert await lim.acquire(tpm, 6000) is None
            denied = await lim.acquire(tpm, 100)
            # 100 tokens refill in 1 s from the emptying, less what has refilled since (however slow
            # this machine is, the answer is exact up to the clock between the two calls).
            since = time.monotonic() - emptied
            assert denied.limit.name == "tpm" and max(0.0, 1.0 - since) - 0.01 <= denied.retry_after <= 1.0
            await asyncio.sleep(denied.retry_after)
            assert await lim.acquire(tpm, 100) is None  # waiting Retry-After gets through
            await lim.settle(tpm, 3000)  # a refund makes room at once
            assert await lim.acquire(tpm, 2900) is None
            assert (await lim.acquire(tpm, 6001)).retry_after is None
            # Several limits: all or nothing, atomically.
            both = [Limit("k9:m2:rpm", "rpm", 2, "key"), Limit("k9:m2:tpm", "tpm", 100, "key")]
            first = time.monotonic()
            assert await lim.acquire(both, 60) is None
            refused = await lim.acquire(both, 60)
            assert refused.limit.name == "tpm"
            assert await lim.acquire(both, 10) is None  # RPM was not spent by the refusal
            refused = await lim.acquire(both, 1)
            # Two requests a minute: the next one in 30 s from the first, less the time since then.
            assert refused.limit.name == "rpm" and 30 - (time.monotonic() - first) - 0.01 <= refused.retry_after <= 30
        finally:
            await lim.close()

    asyncio.run(main())


def test_redis_limiter_is_shared_and_exact_under_concurrency(redis_limiter_args):
    """Two limiters (two API servers) on one Redis, 50 concurrent admissions: exactly the limit pass."""

    async def main():
        a, b = RedisLimiter(**redis_limiter_args), RedisLimiter(**redis_limiter_args)
        try:
            limits = [Limit("k3:m:rpm", "rpm", 20, "key")]
            results = await asyncio.gather(*[(a if i % 2 else b).acquire(limits, 0) for i in range(50)])
            assert sum(r is None for r in results) == 20
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
