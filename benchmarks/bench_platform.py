"""What the platform adds to a request, measured side by side in one run: key lookup, rate-limit
admission and the ledger write, on SQLite (the baseline) and PostgreSQL, in-process counters (the
baseline) and Redis. Needs the test PostgreSQL and Redis (`bash .ci/services.sh` prints them):

    env=$(bash .ci/services.sh) && eval "$env" && python benchmarks/bench_platform.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import create_engine, text

from lmserve.platform import keys, usage
from lmserve.platform.db import Database
from lmserve.platform.limits import Limit, MemoryLimiter, RedisLimiter


def fresh_db(url: str) -> Database:
    if url.startswith("postgresql"):
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS usage, api_keys, accounts, alembic_version CASCADE"))
        engine.dispose()
    db = Database(url)
    db.migrate()
    return db


def bench_db(db: Database, n_auth: int, n_rows: int, threads: int) -> dict[str, float]:
    key, row = keys.create_key(db, "bench", balance="1000")
    t = time.perf_counter()
    for _ in range(n_auth):
        keys.authenticate(db, key)
    auth_ms = (time.perf_counter() - t) / n_auth * 1000

    def write(i: int) -> None:
        usage.record(db, usage.UsageEntry(key_id=row.id, account_id=row.account_id, model="m", tier="free",
                                          prompt_tokens=30, completion_tokens=i % 50, cost_nanos=1000 + i,
                                          status=200, latency_ms=1.0, ttft_ms=0.5, trace_id=f"t{i}"))

    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(write, range(n_rows)))
    rows_per_s = n_rows / (time.perf_counter() - t)
    return {"auth_ms": auth_ms, "ledger_rows_per_s": rows_per_s}


async def bench_limiter(limiter, n: int, concurrency: int) -> float:
    limits = [Limit(f"k1:m:{name}", name, 10**9, "key") for name in ("rpm", "tpm")]

    async def worker(count: int) -> None:
        for _ in range(count):
            assert await limiter.acquire(limits, 100) is None

    t = time.perf_counter()
    await asyncio.gather(*[worker(n // concurrency) for _ in range(concurrency)])
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--auth", type=int, default=500)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--admissions", type=int, default=5000)
    args = ap.parse_args()
    pg, redis_url = os.environ.get("LMSERVE_TEST_POSTGRES_URL"), os.environ.get("LMSERVE_TEST_REDIS_URL")
    if not (pg and redis_url):
        raise SystemExit("set LMSERVE_TEST_POSTGRES_URL and LMSERVE_TEST_REDIS_URL (bash .ci/services.sh)")

    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, url in (("sqlite", f"sqlite:///{tmp}/bench.db"), ("postgresql", pg)):
            db = fresh_db(url)
            results[name] = bench_db(db, args.auth, args.rows, args.threads)
            db.close()
    base = results["sqlite"]
    print(f"{'database':<12}{'key lookup ms':>15}{'ledger rows/s':>16}{'rows/s vs sqlite':>18}")
    for name, r in results.items():
        print(f"{name:<12}{r['auth_ms']:>15.3f}{r['ledger_rows_per_s']:>16.0f}"
              f"{r['ledger_rows_per_s'] / base['ledger_rows_per_s']:>17.2f}x")

    async def limiters():
        memory = await bench_limiter(MemoryLimiter(), args.admissions, 50)
        redis = RedisLimiter(redis_url, prefix=f"lmserve-bench:{os.getpid()}:")
        try:
            shared = await bench_limiter(redis, args.admissions, 50)
        finally:
            await redis.close()
        return memory, shared

    memory, shared = asyncio.run(limiters())
    print(f"\n{'limiter':<12}{'admissions/s':>15}{'vs memory':>12}")
    print(f"{'memory':<12}{memory:>15.0f}{1.0:>11.2f}x")
    print(f"{'redis':<12}{shared:>15.0f}{shared / memory:>11.4f}x")


if __name__ == "__main__":
    main()
