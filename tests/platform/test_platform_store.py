"""Accounts, keys, the ledger and balances against real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, inspect, select

from lmserve.platform import keys, usage
from lmserve.platform.db import Account, ApiKey, UsageRecord, from_nanos, to_nanos


def test_migrations_build_the_schema_and_rerun_as_no_ops(db):
    db.migrate()  # a second start on an existing database changes nothing
    tables = set(inspect(db.engine).get_table_names())
    assert {"accounts", "api_keys", "usage", "alembic_version"} <= tables
    if db.dialect == "sqlite":
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_servers_starting_together_migrate_one_at_a_time():
    """Two API servers started at once on an empty PostgreSQL (docs/deployment.md's compose file):
    both migrations succeed, one after the other, instead of racing to create the same tables."""
    from lmserve.platform.db import Database
    from tests.support.platform_services import fresh_postgres_url

    url = fresh_postgres_url()
    databases = [Database(url) for _ in range(3)]
    try:
        with ThreadPoolExecutor(len(databases)) as pool:
            list(pool.map(lambda d: d.migrate(), databases))  # raises if any failed
        assert {"accounts", "api_keys", "usage"} <= set(inspect(databases[0].engine).get_table_names())
    finally:
        for d in databases:
            d.close()


def test_key_lifecycle(db):
    key, row = keys.create_key(db, "alice", tier="pro", limits={"rpm": 5}, models=["Pro/*"], balance="2.5")
    assert key.startswith("sk-") and len(key) > 40
    with db.session() as s:
        stored = s.get(ApiKey, row.id)
        # Only a prefix and a salted hash are kept, never the key.
        assert key not in (stored.prefix, stored.key_hash, stored.salt) and len(stored.prefix) < len(key) / 3
        assert stored.key_hash == keys.hash_key(key, stored.salt)
    p = keys.authenticate(db, key)
    assert (p.account_name, p.tier, p.key_limits["rpm"], p.total_balance_nanos) == ("alice", "pro", 5, to_nanos("2.5"))
    assert p.may_use("Pro/Qwen/X") and not p.may_use("Qwen/X")
    with pytest.raises(keys.AuthFailed, match="invalid"):
        keys.authenticate(db, key[:-1] + ("A" if key[-1] != "A" else "B"))  # same prefix, wrong key
    keys.revoke_key(db, row.id)
    with pytest.raises(keys.AuthFailed, match="revoked"):
        keys.authenticate(db, key)
    assert [k["status"] for k in keys.list_keys(db, "alice", include_revoked=True)] == ["revoked"]
    assert keys.list_keys(db, "alice") == []


def test_expired_key_and_revoke_by_prefix(db):
    key, row = keys.create_key(db, "bob", expires_at=keys.parse_time("2020-01-01", future=True))
    with pytest.raises(keys.AuthFailed, match="expired"):
        keys.authenticate(db, key)
    view = keys.revoke_key(db, key[:keys.KEY_PREFIX_LEN] + "...")
    assert view["id"] == row.id and view["status"] == "revoked"
    with pytest.raises(keys.NotFound):
        keys.revoke_key(db, "sk-nothing")


def test_bootstrap_keys_are_imported_once(db):
    first = keys.import_bootstrap_keys(db, ["sk-local-1", "sk-local-2"])
    again = keys.import_bootstrap_keys(db, ["sk-local-1", "sk-local-2"])
    assert first == again and len(set(first.values())) == 2
    p = keys.bootstrap_principal(db, first["sk-local-1"])
    assert p.unlimited and p.account_name == keys.BOOTSTRAP_ACCOUNT
    with pytest.raises(keys.AuthFailed):  # matched in memory by the server, never by prefix lookup
        keys.authenticate(db, "sk-local-1")


def test_a_start_never_revokes_keys_of_another_config(db):
    """Two servers with different configs share the database: each start imports its own keys
    and leaves the other's alone (both are accepted, by their own servers)."""
    a = keys.import_bootstrap_keys(db, ["sk-server-a"])
    b = keys.import_bootstrap_keys(db, ["sk-server-b"])
    status = {k["id"]: k["status"] for k in keys.list_keys(db, include_revoked=True)}
    assert status[a["sk-server-a"]] == status[b["sk-server-b"]] == "active"


def test_a_generated_key_belongs_to_its_server_instance(db):
    mine = keys.register_generated_key(db, "sk-generated-here", keys.instance_owner(8000))
    config = keys.import_bootstrap_keys(db, ["sk-configured"])["sk-configured"]
    # a second server's start (same host, alive: this process) touches neither
    other = keys.register_generated_key(db, "sk-generated-there", keys.instance_owner(8001))
    view = {k["id"]: k for k in keys.list_keys(db, include_revoked=True)}
    assert view[mine]["status"] == view[other]["status"] == view[config]["status"] == "active"
    assert view[mine]["owner"].startswith(f"lmserve serve pid {os.getpid()} on ") and view[config]["owner"] is None
    # the owner stops: its key is revoked, the others stay
    keys.release_generated_key(db, mine)
    view = {k["id"]: k for k in keys.list_keys(db, include_revoked=True)}
    assert (view[mine]["status"], view[other]["status"], view[config]["status"]) == ("revoked", "active", "active")


def test_a_killed_servers_generated_key_is_orphaned_then_revoked(db):
    """A server that died without revoking its key (SIGKILL): `keys list` shows the key is
    accepted nowhere, and the next start on this host revokes it."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = f"{socket.gethostname()}/{child.pid}/{keys._process_start(child.pid)}:8000"
        assert keys.owner_alive(owner) is True
        dead = keys.register_generated_key(db, "sk-generated-by-the-dead", owner)
    finally:
        child.kill()
        child.wait()
    assert keys.owner_alive(owner) is False
    assert {k["id"]: k["status"] for k in keys.list_keys(db)}[dead] == "orphaned"
    keys.register_generated_key(db, "sk-next-start", keys.instance_owner(8000))
    assert {k["id"]: k["status"] for k in keys.list_keys(db, include_revoked=True)}[dead] == "revoked"
    # a key owned on another host is never judged from here
    assert keys.owner_alive("some-other-host/1/1:8000") is None


def test_account_settings(db):
    keys.create_key(db, "erin")
    view = keys.update_account(db, "erin", tier="pro", limits={"rpm": 7})
    assert (view["tier"], view["limits"]["rpm"]) == ("pro", 7)
    view = keys.update_account(db, "erin", clear_limits=True, status="disabled")
    assert view["limits"]["rpm"] is None and view["status"] == "disabled"
    with pytest.raises(ValueError):
        keys.update_account(db, "erin", status="paused")


def test_topup_splits_granted_and_paid(db):
    keys.create_key(db, "carol", balance="1")
    keys.topup(db, "carol", "2.25")
    view = keys.topup(db, "carol", "0.5", granted=True)
    assert (view["balance"], view["charge_balance"], view["total_balance"]) == ("1.5", "2.25", "3.75")
    with pytest.raises(keys.NotFound):
        keys.topup(db, "nobody", "1")


def _entry(account_id: int, key_id: int, cost: int, i: int) -> usage.UsageEntry:
    return usage.UsageEntry(key_id=key_id, account_id=account_id, model="m", tier="free", prompt_tokens=10 + i % 7,
                            completion_tokens=i % 13, cost_nanos=cost, status=200, latency_ms=1.0, ttft_ms=0.5,
                            trace_id=f"t{i}")


def test_200_concurrent_requests_leave_exact_ledger_and_balance(db):
    """200 requests finishing at once, each its own transaction in its own thread: every row is
    there and the balance dropped by exactly their sum (granted credit first, then paid)."""
    _, row = keys.create_key(db, "dave", balance="0.001")  # granted: runs out part-way
    keys.topup(db, "dave", "5")
    costs = [1_000 + 7_919 * i for i in range(200)]  # distinct, nanos
    start = threading.Barrier(20)

    def finish(i: int) -> None:
        if i < 20:
            start.wait()  # the first 20 collide on purpose
        usage.record(db, _entry(row.account_id, row.id, costs[i], i))

    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(finish, range(200)))
    with db.session() as s:
        account = s.get(Account, row.account_id)
        n, total = s.execute(select(func.count(UsageRecord.id), func.sum(UsageRecord.cost_nanos))
                             .where(UsageRecord.account_id == row.account_id)).one()
    assert n == 200 and int(total) == sum(costs)
    assert account.balance_nanos == 0  # granted credit is spent first and never below zero
    assert account.charge_balance_nanos == to_nanos("5") + to_nanos("0.001") - sum(costs)
    summary = usage.summary(db, account="dave")
    assert summary == [{"account": "dave", "model": "m", "requests": 200,
                        "prompt_tokens": sum(10 + i % 7 for i in range(200)),
                        "completion_tokens": sum(i % 13 for i in range(200)), "cost": from_nanos(sum(costs)),
                        "errors": 0, "errors_by_status": {}}]


def test_unlimited_accounts_are_recorded_not_charged(db):
    ids = keys.import_bootstrap_keys(db, ["sk-boot"])
    p = keys.bootstrap_principal(db, ids["sk-boot"])
    e = _entry(p.account_id, p.key_id, 5_000, 1)
    e.charge = False
    usage.record(db, e)
    info = usage.user_info(db, p.account_id)
    assert info["totalBalance"] == "0" and usage.summary(db)[0]["cost"] == "0.000005"


def test_daily_usage_is_per_key_per_utc_day_and_model(db):
    """The console's chart data: rows summed per UTC day (the boundary second on its own side)
    and model, for one key only, from `since` on."""
    _, mine = keys.create_key(db, "erin")
    _, other = keys.create_key(db, "erin")
    midnight = 20_000 * 86400.0  # 2024-10-04T00:00:00Z
    for i, (at, model, key) in enumerate([(midnight - 86400.5, "m", mine), (midnight - 0.5, "m", mine),
                                          (midnight - 0.25, "n", mine), (midnight, "m", mine),
                                          (midnight + 3600, "m", mine), (midnight + 60, "m", other)]):
        e = _entry(key.account_id, key.id, 1_000 * (i + 1), i)
        e.model, e.created_at = model, at
        if i == 4:
            e.status = 429
        usage.record(db, e)
    rows = usage.daily(db, mine.id, since=midnight - 86400)
    assert [(r["date"], r["model"], r["requests"], r["errors"], r["cost"]) for r in rows] == [
        ("2024-10-03", "m", 1, 0, "0.000002"), ("2024-10-03", "n", 1, 0, "0.000003"),
        ("2024-10-04", "m", 2, 1, "0.000009")]
    assert rows[2]["prompt_tokens"] == (10 + 3) + (10 + 4) and rows[2]["completion_tokens"] == 3 + 4, rows
    assert usage.daily(db, other.id, since=0) == [{"date": "2024-10-04", "model": "m", "requests": 1,
                                                   "prompt_tokens": 15, "completion_tokens": 5,
                                                   "cost": "0.000006", "errors": 0}]


def test_amounts():
    assert to_nanos("10.5") == 10_500_000_000 and from_nanos(100 * 10**9) == "100"
    assert from_nanos(-2_000) == "-0.000002" and from_nanos(0) == "0"
    for bad in ("ten", "NaN", "Infinity"):
        with pytest.raises(ValueError):
            to_nanos(bad)


def test_prices_by_tier_in_nanos():
    from lmserve.config import ModelDeployment
    from lmserve.platform.pricing import price_for

    d = ModelDeployment(id="m", path="m", price={"input": 0.07, "output": 0.28},
                        tier_prices={"pro": {"input": 0.05, "output": 0.2}})
    assert price_for(d, "free").cost_nanos(1_000_000, 0) == 70_000_000  # 0.07 per million, exactly
    assert price_for(d, "free").cost_nanos(3, 1) == 3 * 70 + 280
    assert price_for(d, "pro").cost_nanos(10, 10) == 10 * 50 + 10 * 200
    assert price_for(ModelDeployment(id="f", path="f"), "free").free
