"""The usage ledger and balances: one row per request, and the account's balance decremented
in the same transaction by one UPDATE that reads and writes the row under the database's own
lock (no read-modify-write in Python, so no lost update under concurrency on either database).
Granted credit (`balance`) is spent first, then paid credit (`chargeBalance`); a request that
was admitted may take the total below zero, and the next one is then refused (403)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import BigInteger, case, func, literal, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

from lmserve.platform.db import Account, Database, UsageRecord, from_nanos, now


@dataclass
class UsageEntry:
    key_id: int
    account_id: int
    model: str
    tier: str
    prompt_tokens: int
    completion_tokens: int
    cost_nanos: int
    status: int
    latency_ms: float
    ttft_ms: float | None
    trace_id: str
    charge: bool = True  # False for the unlimited bootstrap account: recorded, never billed
    created_at: float | None = None
    batch_id: str | None = None  # a line of this batch (billed at the batch price)


def record(db: Database, e: UsageEntry) -> bool:
    """Write the row and charge its cost, in one transaction, unless a row with its trace id is
    there already (a retry after a lost commit confirmation, a spool replay of a row that did
    land): then nothing changes. Returns whether this call wrote it."""
    insert = {"postgresql": pg_insert, "sqlite": sqlite_insert}.get(db.dialect)
    if insert is None:  # pragma: no cover - the platform supports these two
        raise RuntimeError(f"unsupported database: {db.dialect}")
    values = dict(created_at=e.created_at or now(), key_id=e.key_id, account_id=e.account_id, model=e.model,
                  tier=e.tier, prompt_tokens=e.prompt_tokens, completion_tokens=e.completion_tokens,
                  cost_nanos=e.cost_nanos, status=e.status, latency_ms=e.latency_ms, ttft_ms=e.ttft_ms,
                  trace_id=e.trace_id, batch_id=e.batch_id)
    with db.session() as s:
        table = UsageRecord.__table__  # a Core insert: RETURNING tells whether the row went in
        landed = s.execute(insert(table).values(**values).on_conflict_do_nothing(index_elements=[table.c.trace_id])
                           .returning(table.c.id)).scalar() is not None
        if landed and e.charge and e.cost_nanos:
            cost = literal(e.cost_nanos)
            # Both SET expressions see the row as it was: take from the granted balance what it
            # has (not below 0), the rest from the paid balance.
            take = case((Account.balance_nanos >= cost, cost), (Account.balance_nanos > 0, Account.balance_nanos),
                        else_=literal(0))
            s.execute(update(Account).where(Account.id == e.account_id)
                      .values(balance_nanos=Account.balance_nanos - take,
                              charge_balance_nanos=Account.charge_balance_nanos - (cost - take)))
        return landed


def summary(db: Database, account: str | None = None, model: str | None = None,
            since: float | None = None) -> list[dict]:
    """Per account and model: requests, tokens, cost (a currency string), errors (status >= 400)
    in all and by status."""
    with db.session() as s:
        q = (select(Account.name, UsageRecord.model, func.count(UsageRecord.id),
                    func.sum(UsageRecord.prompt_tokens), func.sum(UsageRecord.completion_tokens),
                    func.sum(UsageRecord.cost_nanos),
                    func.sum(case((UsageRecord.status >= 400, 1), else_=0)))
             .join(Account, Account.id == UsageRecord.account_id)
             .group_by(Account.name, UsageRecord.model).order_by(Account.name, UsageRecord.model))
        q = _filtered(q, account, model, since)
        rows = [{"account": a, "model": m, "requests": int(n), "prompt_tokens": int(p or 0),
                 "completion_tokens": int(c or 0), "cost": from_nanos(int(cost or 0)), "errors": int(err or 0),
                 "errors_by_status": {}}
                for a, m, n, p, c, cost, err in s.execute(q).all()]
        # The errors of each row by HTTP status ("429": 3), most frequent first.
        by_row = {(r["account"], r["model"]): r["errors_by_status"] for r in rows}
        q = (select(Account.name, UsageRecord.model, UsageRecord.status, func.count(UsageRecord.id))
             .join(Account, Account.id == UsageRecord.account_id).where(UsageRecord.status >= 400)
             .group_by(Account.name, UsageRecord.model, UsageRecord.status)
             .order_by(func.count(UsageRecord.id).desc(), UsageRecord.status))
        q = _filtered(q, account, model, since)
        for a, m, status, n in s.execute(q).all():
            by_row[(a, m)][str(status)] = int(n)
        return rows


class _UTCDay(FunctionElement):
    """Whole UTC days since the epoch of a unix time column, on both databases: PostgreSQL's
    float-to-integer cast rounds, so it needs FLOOR; SQLite's truncates (the same for times after
    1970) and its FLOOR exists only in builds with the math functions."""

    type = BigInteger()
    inherit_cache = True


@compiles(_UTCDay)
def _utc_day(element, compiler, **kw):
    return f"CAST(FLOOR({compiler.process(element.clauses, **kw)} / 86400) AS BIGINT)"


@compiles(_UTCDay, "sqlite")
def _utc_day_sqlite(element, compiler, **kw):
    return f"CAST({compiler.process(element.clauses, **kw)} / 86400 AS INTEGER)"


def daily(db: Database, key_id: int, since: float) -> list[dict]:
    """One key's usage per UTC day and model since `since`: requests, tokens, cost, errors,
    oldest day first (the console's chart)."""
    day = _UTCDay(UsageRecord.created_at)
    with db.session() as s:
        q = (select(day, UsageRecord.model, func.count(UsageRecord.id), func.sum(UsageRecord.prompt_tokens),
                    func.sum(UsageRecord.completion_tokens), func.sum(UsageRecord.cost_nanos),
                    func.sum(case((UsageRecord.status >= 400, 1), else_=0)))
             .where(UsageRecord.key_id == key_id, UsageRecord.created_at >= since)
             .group_by(day, UsageRecord.model).order_by(day, UsageRecord.model))
        return [{"date": datetime.fromtimestamp(int(d) * 86400, UTC).date().isoformat(), "model": m,
                 "requests": int(n), "prompt_tokens": int(p or 0), "completion_tokens": int(c or 0),
                 "cost": from_nanos(int(cost or 0)), "errors": int(err or 0)}
                for d, m, n, p, c, cost, err in s.execute(q).all()]


def user_info(db: Database, account_id: int) -> dict:
    """GET /v1/user/info's `data`, in the platform's shape (amounts as decimal strings)."""
    with db.session() as s:
        a = s.get(Account, account_id)
        return {"id": str(a.id), "name": a.name, "image": "", "email": "", "isAdmin": False,
                "balance": from_nanos(a.balance_nanos), "status": "normal" if a.status == "active" else a.status,
                "introduction": "", "role": "", "chargeBalance": from_nanos(a.charge_balance_nanos),
                "totalBalance": from_nanos(a.balance_nanos + a.charge_balance_nanos), "tier": a.tier}


def _filtered(query, account: str | None, model: str | None, since):
    """The summary's filters, the same on its totals and on its errors by status."""
    if account:
        query = query.where(Account.name == account)
    if model:
        query = query.where(UsageRecord.model == model)
    if since is not None:
        query = query.where(UsageRecord.created_at >= since)
    return query
