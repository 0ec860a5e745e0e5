"""The ledger when things fail: one row per trace id (and one charge) however often it is
written, the migration that removes rows doubled before the constraint, the spool file and its
replay, the platform's 503 when its database is unreachable, and a frozen Redis answered within
the configured timeout. Fault injection uses a Redis of the test's own, never the shared one."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import func, select, text

from lmserve.config import PlatformSettings
from lmserve.errors import Refused
from lmserve.platform import keys, usage
from lmserve.platform.db import MIGRATIONS, Account, Database, UsageRecord, to_nanos
from lmserve.platform.limits import Limit, RedisLimiter
from lmserve.platform.service import Platform, StoreUnavailable
from lmserve.platform.spool import REJECTED_NAME, SPOOL_NAME, UsageSpool
from tests.support.platform_services import fresh_postgres_url
from tests.support.private_services import PrivateRedis, free_port


def _entry(account_id: int, key_id: int, trace: str, cost: int = 1000) -> usage.UsageEntry:
    return usage.UsageEntry(key_id=key_id, account_id=account_id, model="m", tier="free", prompt_tokens=3,
                            completion_tokens=2, cost_nanos=cost, status=200, latency_ms=1.0, ttft_ms=None,
                            trace_id=trace, created_at=time.time())


def _rows_and_balance(db: Database, account_id: int) -> tuple[int, int]:
    with db.session() as s:
        n = s.execute(select(func.count(UsageRecord.id)).where(UsageRecord.account_id == account_id)).scalar()
        a = s.get(Account, account_id)
        return int(n), a.balance_nanos + a.charge_balance_nanos


def test_a_row_written_twice_lands_once_and_is_charged_once(db):
    _, row = keys.create_key(db, "twice", balance="1")
    entry = _entry(row.account_id, row.id, "trace-twice", cost=12_345)
    assert usage.record(db, entry) is True
    assert usage.record(db, entry) is False  # a retry after a lost commit confirmation
    assert _rows_and_balance(db, row.account_id) == (1, to_nanos("1") - 12_345)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_the_migration_removes_doubled_rows_and_refunds_them(engine, tmp_path):
    from alembic import command
    from alembic.config import Config

    url = f"sqlite:///{tmp_path / 'old.db'}" if engine == "sqlite" else fresh_postgres_url()
    db = Database(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")  # the schema before the constraint
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO accounts (name, tier, balance_nanos, charge_balance_nanos, status, unlimited, "
                          "created_at) VALUES ('old', 'free', 0, 100, 'active', :f, 0)"), {"f": False})
        for trace in ("a", "a", "b", "a"):  # "a" written three times, charged 10 each time
            conn.execute(text("INSERT INTO usage (created_at, key_id, account_id, model, tier, prompt_tokens, "
                              "completion_tokens, cost_nanos, status, latency_ms, trace_id) "
                              "VALUES (0, 1, 1, 'm', 'free', 1, 1, 10, 200, 1, :t)"), {"t": trace})
    db.migrate()
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT trace_id FROM usage ORDER BY id")).scalars().all() == ["a", "b"]
        assert conn.execute(text("SELECT charge_balance_nanos FROM accounts")).scalar() == 120
    with pytest.raises(Exception, match="(?i)unique"):  # the constraint itself, on both databases
        with db.engine.begin() as conn:
            conn.execute(text("INSERT INTO usage (created_at, key_id, account_id, model, tier, prompt_tokens, "
                              "completion_tokens, cost_nanos, status, latency_ms, trace_id) "
                              "VALUES (0, 1, 1, 'm', 'free', 1, 1, 10, 200, 1, 'b')"))
    db.close()


def test_spool_replay_lands_each_row_once(db, tmp_path):
    _, row = keys.create_key(db, "spooled", balance="1")
    spool = UsageSpool(tmp_path / "data")
    entries = [_entry(row.account_id, row.id, f"sp-{i}", cost=100 + i) for i in range(5)]
    usage.record(db, entries[0])  # this one did commit although it was spooled too
    for e in entries:
        spool.append(e)
    # a process killed mid-append leaves a torn last line: skipped
    with open(spool.path, "ab") as f:
        f.write(b'{"key_id": 1, "acc')
    assert UsageSpool(tmp_path / "data").depth == 5  # what a restarted server finds
    assert spool.depth == 5 and spool.oldest_age_s() >= 0
    assert spool.replay(lambda e: usage.record(db, e)) == 4
    assert spool.depth == 0 and not spool.path.exists() and not spool.replaying.exists()
    assert _rows_and_balance(db, row.account_id) == (5, to_nanos("1") - sum(100 + i for i in range(5)))
    assert spool.replay(lambda e: usage.record(db, e)) == 0


def test_a_replay_interrupted_by_the_database_resumes(db, tmp_path):
    _, row = keys.create_key(db, "resumed", balance="1")
    spool = UsageSpool(tmp_path)
    for i in range(4):
        spool.append(_entry(row.account_id, row.id, f"rs-{i}"))
    calls = []

    def flaky(e):
        calls.append(e.trace_id)
        if len(calls) == 3:
            from sqlalchemy.exc import OperationalError

            raise OperationalError("INSERT", {}, Exception("the database system is shutting down"))
        return usage.record(db, e)

    with pytest.raises(Exception, match="shutting down"):
        spool.replay(flaky)
    spool.append(_entry(row.account_id, row.id, "rs-late"))  # arrives while the replay file waits
    assert spool.depth == 3
    # a restarted server: the interrupted replay file (rs-0, rs-1 landed already), then the new spool file
    assert UsageSpool(tmp_path).replay(lambda e: usage.record(db, e)) == 3
    assert UsageSpool(tmp_path).depth == 0 and _rows_and_balance(db, row.account_id)[0] == 5


def test_a_row_the_database_refuses_is_set_aside(tmp_path):
    spool = UsageSpool(tmp_path)
    spool.append(_entry(1, 1, "poison"))

    def refuse(e):
        raise ValueError("not a valid row")

    assert spool.replay(refuse) == 0
    assert spool.depth == 0 and "poison" in (tmp_path / REJECTED_NAME).read_text()
    assert not (tmp_path / SPOOL_NAME).exists()


def test_an_unreachable_database_is_a_503_not_a_500(tmp_path):
    """Authentication, /v1/user/info's query and a ledger row, with nothing listening on the
    database's port (PostgreSQL stopped): StoreUnavailable, and the row goes to the spool."""
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    settings = PlatformSettings(data_dir=str(tmp_path), database_url=url, ledger_wait_s=0.5)
    platform = Platform(settings, {}, [])

    async def scenario():
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as refused:
            await platform.authenticate("Bearer sk-some-key-that-needs-the-database")
        assert refused.value.status == 503 and refused.value.retry_after and time.monotonic() - started < 5
        principal = keys.Principal(key_id=1, key_prefix="sk-x", account_id=1, account_name="a", tier="free",
                                   key_limits={}, account_limits={}, models=None, unlimited=False,
                                   is_admin=False, total_balance_nanos=1)
        with pytest.raises(StoreUnavailable):
            await platform.user_info(principal)
        await platform.settled(platform.refused(principal, "m", 429, 1.0, "refused-while-down"))
        assert platform.spool.depth == 1
        assert (await platform.store_status())["database"] == "unavailable"
        metrics = {m.name: m.samples[0].value for m in platform.collect()}
        assert metrics["lmserve_usage_spool_rows"] == 1
        await platform.close()

    asyncio.run(scenario())
    # still spooled for the next start (the replayer may have moved it to the replay file)
    assert UsageSpool(tmp_path).depth == 1


def test_a_frozen_redis_is_refused_within_the_timeout(tmp_path):
    redis = PrivateRedis(tmp_path)
    limits = [Limit("k1:m:rpm", "rpm", 100, "key")]

    async def scenario():
        limiter = RedisLimiter(redis.url, "t:", connect_timeout_s=0.3, timeout_s=0.3)
        assert await limiter.acquire(limits, 1) is None
        redis.freeze()
        try:
            for _ in range(2):  # the pooled connection, then a new one
                started = time.monotonic()
                with pytest.raises(Exception) as failed:
                    await limiter.acquire(limits, 1)
                assert time.monotonic() - started < 0.9, "a frozen Redis held the request past its timeout"
                assert "Timeout" in type(failed.value).__name__
        finally:
            redis.thaw()
        assert await limiter.acquire(limits, 1) is None  # recovers without a restart
        await limiter.close()

    try:
        asyncio.run(scenario())
    finally:
        redis.close()


def test_usage_summary_counts_errors_by_status(db):
    _, row = keys.create_key(db, "statuses")
    for i, status in enumerate([200, 429, 403, 429, 499, 200]):
        e = _entry(row.account_id, row.id, f"st-{i}", cost=0)
        e.status = status
        usage.record(db, e)
    [summary] = usage.summary(db, account="statuses")
    assert summary["requests"] == 6 and summary["errors"] == 4
    assert summary["errors_by_status"] == {"429": 2, "403": 1, "499": 1}
    assert list(summary["errors_by_status"])[0] == "429"  # most frequent first


@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_limiter_unavailable_policy(tmp_path, policy):
    """Redis unreachable: fail-closed by default (503 limiter_unavailable); `allow` serves the
    request without limits, counted in lmserve_limiter_bypassed_total."""
    from lmserve.config import ModelDeployment

    settings = PlatformSettings(data_dir=str(tmp_path), redis_url=f"redis://127.0.0.1:{free_port()}/0",
                                on_limiter_unavailable=policy, tiers={"free": {"rpm": 10}})
    platform = Platform(settings, {"m": ModelDeployment(id="m", path="m")}, [])
    principal = keys.Principal(key_id=1, key_prefix="sk-x", account_id=1, account_name="a", tier="free",
                               key_limits={}, account_limits={}, models=None, unlimited=False, is_admin=False,
                               total_balance_nanos=1)

    async def scenario():
        try:
            if policy == "deny":
                with pytest.raises(Refused) as refused:
                    await platform.admit(principal, "m", 10, 10)
                assert (refused.value.status, refused.value.code) == (503, "limiter_unavailable")
            else:
                ticket = await platform.admit(principal, "m", 10, 10)
                assert ticket.limits == [] and platform.limiter_bypassed == 1
                counters = {m.name: m.samples[0].value for m in platform.collect()}
                assert counters["lmserve_limiter_bypassed"] == 1
        finally:
            await platform.close()

    asyncio.run(scenario())
