"""Batches (`/v1/batches`) in the platform database: the batch, and one row per input line.

A batch's input is validated line by line when it is created (`check_lines`); every line gets a
`batch_lines` row: a valid one `pending` with its request body, an invalid one `failed` with its
error (line number included). Workers in the API servers claim pending lines (`claim`: on
PostgreSQL with `FOR UPDATE SKIP LOCKED`, so several servers never take the same line), hold them
under a lease they renew, and record each line's result (`complete`) only while they still hold
it: a line is done exactly once. A worker that dies leaves its lines `running` until their lease
runs out; then any worker claims them again. Results are in the database before the line counts
as done, and the batch's output and error files are written from them when no line is left
(`finalize`): a restart loses nothing that finished.

Statuses as OpenAI's: validating -> in_progress -> finalizing -> completed, or failed (no usable
line), expired (the window ran out: what finished is kept, the rest is in the error file),
cancelling -> cancelled (no new line starts; the running ones finish).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Integer, String, Text, func, or_, select, update
from sqlalchemy.orm import Mapped, mapped_column

from lmserve.chat.schemas import CompletionRequest, parse_chat_request, validate
from lmserve.errors import InvalidParameter
from lmserve.platform.db import Base, Database, now
from lmserve.platform.files import FileStore

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
WINDOWS = {"24h": 86400.0}
TERMINAL = ("completed", "failed", "expired", "cancelled")
MAX_METADATA_PAIRS = 16
MAX_CUSTOM_ID_CHARS = 512
MAX_REPORTED_ERRORS = 100  # a file with no usable line: this many line errors in the batch's `errors`


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    key_id: Mapped[int] = mapped_column(Integer)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(20), index=True)
    model: Mapped[str | None] = mapped_column(String(300), nullable=True)  # the platform's replace.model
    meta: Mapped[dict | None] = mapped_column("metadata", JSON, nullable=True)
    errors: Mapped[list | None] = mapped_column(JSON, nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float, default=now, index=True)
    in_progress_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finalizing_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    failed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    expired_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    cancelling_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    cancelled_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class BatchLine(Base):
    __tablename__ = "batch_lines"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"))
    line_no: Mapped[int] = mapped_column(Integer)  # 1-based, as an editor shows it
    custom_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    body: Mapped[str | None] = mapped_column(Text, nullable=True)  # the validated request (JSON)
    state: Mapped[str] = mapped_column(String(12))  # pending | running | done | failed | expired
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claimed_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)  # the output line (JSON)


class BatchError(Exception):
    """A request to create or cancel a batch that cannot be done: `status` (400/404) and a message."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


# ---- validation ------------------------------------------------------------------------------


@dataclass
class CheckedLine:
    line_no: int
    custom_id: str | None
    body: dict | None  # the request, model replaced; None when the line is invalid
    error: dict | None = None  # {code, message, param, line}


def check_lines(raw: bytes, endpoint: str, model: str | None, usable) -> tuple[list[CheckedLine], list[dict] | None]:
    """Validate an input file line by line (blocking: run off the event loop). `usable(model)` is
    None when this key may run requests on `model`, else why not. Returns the lines, and the
    batch's errors when the file has no usable line at all (the batch then fails)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], [_error("invalid_file", f"the file is not UTF-8 text ({e})", None, None)]
    lines: list[CheckedLine] = []
    seen: set[str] = set()
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        checked = _check_line(no, line, endpoint, model, usable, seen)
        if checked.custom_id is not None and checked.error is None:
            seen.add(checked.custom_id)
        lines.append(checked)
    if not lines:
        return [], [_error("empty_file", "the input file has no requests", None, None)]
    if all(c.error is not None for c in lines):
        return lines, [c.error for c in lines[:MAX_REPORTED_ERRORS]]
    return lines, None


def _check_line(no: int, line: str, endpoint: str, model: str | None, usable, seen: set[str]) -> CheckedLine:
    def bad(message: str, param: str | None = None, code: str = "invalid_request", custom_id=None) -> CheckedLine:
        return CheckedLine(no, custom_id, None, _error(code, f"line {no}: {message}", param, no))

    try:
        item = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
        return bad(f"not valid JSON ({e})", code="invalid_json_line")
    if not isinstance(item, dict):
        return bad("a line must be a JSON object", code="invalid_json_line")
    cid = item.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return bad("custom_id must be a non-empty string", "custom_id", "missing_custom_id")
    if len(cid) > MAX_CUSTOM_ID_CHARS:
        return bad(f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters", "custom_id")
    if cid in seen:
        return bad(f"custom_id {cid!r} is used by an earlier line", "custom_id", "duplicate_custom_id", cid)
    if item.get("method") != "POST":
        return bad("method must be \"POST\"", "method", "invalid_method", cid)
    if item.get("url") != endpoint:
        return bad(f"url must be the batch's endpoint {endpoint!r}", "url", "invalid_url", cid)
    body = item.get("body")
    if not isinstance(body, dict):
        return bad("body must be a JSON object", "body", custom_id=cid)
    if model is not None:
        body = {**body, "model": model}
    if body.get("stream"):
        return bad("stream is not supported in a batch", "body.stream", custom_id=cid)
    try:
        req = parse_chat_request(body) if endpoint == "/v1/chat/completions" else validate(CompletionRequest, body)
    except InvalidParameter as e:
        return bad(str(e), f"body.{e.param}" if e.param else "body", custom_id=cid)
    why = usable(req.model)
    if why is not None:
        return bad(why, "body.model", "model_not_found", cid)
    return CheckedLine(no, cid, body)


def _error(code: str, message: str, param: str | None, line: int | None) -> dict:
    return {"code": code, "message": message, "param": param, "line": line}


def request_line_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


def output_line(custom_id: str | None, status_code: int | None, request_id: str | None, body: Any,
                error: dict | None) -> str:
    """One line of an output or error file, as OpenAI writes them."""
    response = None if status_code is None else {"status_code": status_code, "request_id": request_id,
                                                 "body": body}
    return json.dumps({"id": request_line_id(), "custom_id": custom_id, "response": response, "error": error},
                      ensure_ascii=False)


# ---- batches ---------------------------------------------------------------------------------


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


def create(db: Database, *, account_id: int, key_id: int, endpoint: str, input_file_id: str, window: str,
           model: str | None, metadata: dict | None, lines: list[CheckedLine], errors: list[dict] | None) -> dict:
    t = now()
    batch = Batch(id=new_batch_id(), account_id=account_id, key_id=key_id, endpoint=endpoint,
                  input_file_id=input_file_id, completion_window=window, model=model, meta=metadata,
                  total=len(lines), created_at=t, expires_at=t + WINDOWS[window])
    if errors is not None:
        batch.status, batch.errors, batch.failed_at = "failed", errors, t
    else:
        batch.status, batch.in_progress_at = "in_progress", t
    with db.session() as s:
        s.add(batch)
        s.flush()
        if errors is None:
            rows = [{"batch_id": batch.id, "line_no": c.line_no, "custom_id": c.custom_id,
                     "body": None if c.body is None else json.dumps(c.body, ensure_ascii=False),
                     "state": "pending" if c.error is None else "failed",
                     "result": None if c.error is None else output_line(c.custom_id, None, None, None, c.error)}
                    for c in lines]
            for start in range(0, len(rows), 1000):
                s.execute(BatchLine.__table__.insert(), rows[start:start + 1000])
        return view(batch, _counts(s, [batch.id]).get(batch.id, (0, 0)))


def view(b: Batch, counts: tuple[int, int]) -> dict:
    """The OpenAI batch object (plus the platform's `replace` when a model was replaced)."""
    def ts(v):
        return None if v is None else int(v)

    out = {"id": b.id, "object": "batch", "endpoint": b.endpoint,
           "errors": None if not b.errors else {"object": "list", "data": b.errors},
           "input_file_id": b.input_file_id, "completion_window": b.completion_window, "status": b.status,
           "output_file_id": b.output_file_id, "error_file_id": b.error_file_id, "created_at": ts(b.created_at),
           "in_progress_at": ts(b.in_progress_at), "expires_at": ts(b.expires_at),
           "finalizing_at": ts(b.finalizing_at), "completed_at": ts(b.completed_at), "failed_at": ts(b.failed_at),
           "expired_at": ts(b.expired_at), "cancelling_at": ts(b.cancelling_at), "cancelled_at": ts(b.cancelled_at),
           "request_counts": {"total": b.total, "completed": counts[0], "failed": counts[1]},
           "metadata": b.meta}
    if b.model:
        out["replace"] = {"model": b.model}
    return out


def _counts(s, batch_ids: list[str]) -> dict[str, tuple[int, int]]:
    """(completed, failed) lines per batch: expired lines count as failed."""
    out: dict[str, list[int]] = {}
    rows = s.execute(select(BatchLine.batch_id, BatchLine.state, func.count(BatchLine.id))
                     .where(BatchLine.batch_id.in_(batch_ids)).group_by(BatchLine.batch_id, BatchLine.state))
    for bid, state, n in rows:
        c = out.setdefault(bid, [0, 0])
        if state == "done":
            c[0] += int(n)
        elif state in ("failed", "expired"):
            c[1] += int(n)
    return {k: (v[0], v[1]) for k, v in out.items()}


def get(db: Database, batch_id: str, account_id: int | None) -> dict | None:
    """The batch as its account sees it (None: not there, or another account's); account None: any (admin)."""
    with db.session() as s:
        b = s.get(Batch, batch_id)
        if b is None or (account_id is not None and b.account_id != account_id):
            return None
        return view(b, _counts(s, [b.id]).get(b.id, (0, 0)))


def list_batches(db: Database, account_id: int | None, after: str | None, limit: int) -> tuple[list[dict], bool]:
    """Newest first, `limit` after the batch `after`; and whether more follow."""
    with db.session() as s:
        q = select(Batch)
        if account_id is not None:
            q = q.where(Batch.account_id == account_id)
        if after:
            pivot = s.get(Batch, after)
            if pivot is not None and (account_id is None or pivot.account_id == account_id):
                q = q.where(or_(Batch.created_at < pivot.created_at,
                                (Batch.created_at == pivot.created_at) & (Batch.id < pivot.id)))
        rows = list(s.scalars(q.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        counts = _counts(s, [b.id for b in rows]) if rows else {}
        return [view(b, counts.get(b.id, (0, 0))) for b in rows], more


def cancel(db: Database, batch_id: str, account_id: int | None) -> dict | None:
    """Stop starting new lines (cancelling); the worker finalizes once the running ones ended."""
    with db.session() as s:
        b = s.get(Batch, batch_id, with_for_update=True)
        if b is None or (account_id is not None and b.account_id != account_id):
            return None
        if b.status in ("validating", "in_progress"):
            b.status, b.cancelling_at = "cancelling", now()
        elif b.status not in ("cancelling", "cancelled"):
            raise BatchError(400, f"batch {b.id} is {b.status}: only a batch in progress can be cancelled",
                             code="batch_not_cancellable")
        s.flush()
        return view(b, _counts(s, [b.id]).get(b.id, (0, 0)))


# ---- the worker's side -----------------------------------------------------------------------


@dataclass
class ClaimedLine:
    id: int
    batch_id: str
    line_no: int
    custom_id: str
    body: dict
    endpoint: str
    account_id: int
    key_id: int


def claim(db: Database, worker: str, n: int, lease_s: float) -> list[ClaimedLine]:
    """Take up to `n` lines to run (pending, or running under a lease that ran out), oldest first,
    leased to `worker` for `lease_s`. PostgreSQL: rows another server is claiming right now are
    skipped, not waited for; SQLite has one writer at a time, which serialises this."""
    t = now()
    claimable = or_(BatchLine.state == "pending",
                    (BatchLine.state == "running") & (BatchLine.claimed_until < t))
    with db.session() as s:
        pick = (select(BatchLine.id).join(Batch, Batch.id == BatchLine.batch_id)
                .where(Batch.status == "in_progress", Batch.expires_at > t, claimable)
                .order_by(BatchLine.id).limit(n))
        if db.dialect == "postgresql":
            pick = pick.with_for_update(skip_locked=True, of=BatchLine)
        ids = list(s.scalars(pick))
        if not ids:
            return []
        s.execute(update(BatchLine).where(BatchLine.id.in_(ids), claimable)
                  .values(state="running", claimed_by=worker, claimed_until=t + lease_s))
        rows = s.execute(select(BatchLine, Batch.endpoint, Batch.account_id, Batch.key_id)
                         .join(Batch, Batch.id == BatchLine.batch_id)
                         .where(BatchLine.id.in_(ids), BatchLine.claimed_by == worker, BatchLine.state == "running")
                         .order_by(BatchLine.id)).all()
        return [ClaimedLine(line.id, line.batch_id, line.line_no, line.custom_id, json.loads(line.body), endpoint,
                            account_id, key_id) for line, endpoint, account_id, key_id in rows]


def renew(db: Database, worker: str, line_ids: list[int], lease_s: float) -> None:
    if line_ids:
        with db.session() as s:
            s.execute(update(BatchLine).where(BatchLine.id.in_(line_ids), BatchLine.claimed_by == worker,
                                              BatchLine.state == "running")
                      .values(claimed_until=now() + lease_s))


def release(db: Database, worker: str, line_ids: list[int]) -> None:
    """Lines this worker will not finish (shutdown, a rate limit): pending again, for anyone."""
    if line_ids:
        with db.session() as s:
            s.execute(update(BatchLine).where(BatchLine.id.in_(line_ids), BatchLine.claimed_by == worker,
                                              BatchLine.state == "running")
                      .values(state="pending", claimed_by=None, claimed_until=None))


def complete(db: Database, worker: str, line_id: int, ok: bool, result: str) -> bool:
    """Record a line's result, if this worker still holds it; returns whether it did."""
    with db.session() as s:
        done = s.execute(update(BatchLine).where(BatchLine.id == line_id, BatchLine.claimed_by == worker,
                                                 BatchLine.state == "running")
                         .values(state="done" if ok else "failed", result=result, claimed_until=None))
        return done.rowcount == 1


def due(db: Database, lease_s: float) -> list[str]:
    """Batches to finalize: in progress with no line left to run, past their window, cancelling
    with nothing running, or finalizing by a worker that went away."""
    t = now()
    live = (BatchLine.state == "pending") | ((BatchLine.state == "running") & (BatchLine.claimed_until >= t))
    running = (BatchLine.state == "running") & (BatchLine.claimed_until >= t)
    with db.session() as s:
        def without(cond):
            return ~select(BatchLine.id).where(BatchLine.batch_id == Batch.id, cond).exists()

        q = select(Batch.id).where(or_(
            (Batch.status == "in_progress") & (without(live) | (Batch.expires_at <= t)),
            (Batch.status == "cancelling") & without(running),
            (Batch.status == "finalizing") & (Batch.finalizing_at < t - lease_s)))
        return list(s.scalars(q))


def finalize(db: Database, files: FileStore, batch_id: str, lease_s: float) -> bool:
    """Write the output and error files of a batch with nothing left to run and give it its final
    status. Taken by one worker (the status moves to finalizing in one UPDATE); idempotent, so a
    worker that dies here leaves it to another once `lease_s` passed."""
    t = now()
    with db.session() as s:
        took = s.execute(update(Batch).where(Batch.id == batch_id, or_(
            Batch.status.in_(("in_progress", "cancelling")),
            (Batch.status == "finalizing") & (Batch.finalizing_at < t - lease_s)))
            .values(status="finalizing", finalizing_at=t))
        if took.rowcount != 1:
            return False
        b = s.get(Batch, batch_id)
        # Lines of an expired batch that never ran: in the error file, as OpenAI reports them.
        if b.cancelling_at is None and b.expires_at is not None and b.expires_at <= t:
            for line in s.scalars(select(BatchLine).where(BatchLine.batch_id == batch_id,
                                                          BatchLine.state.in_(("pending", "running")))):
                line.state = "expired"
                line.result = output_line(line.custom_id, None, None, None, _error(
                    "batch_expired", "this request could not be executed before the completion window expired",
                    None, line.line_no))
    target = ("cancelled" if b.cancelling_at is not None else
              "expired" if b.expires_at is not None and b.expires_at <= t else "completed")
    suffix = batch_id.removeprefix("batch_")
    written: dict[str, str | None] = {}
    for kind, states in (("output", ("done",)), ("errors", ("failed", "expired"))):
        file_id = f"file-{suffix}-{kind}"
        lines = _results(db, batch_id, states)
        if not lines:
            written[kind] = None
            continue
        size = files.write(file_id, (line.encode() + b"\n" for line in lines))
        files.add(file_id, b.account_id, "batch_output", f"{batch_id}_{kind}.jsonl", size, len(lines))
        written[kind] = file_id
    with db.session() as s:
        b = s.get(Batch, batch_id)
        b.output_file_id, b.error_file_id, b.status = written["output"], written["errors"], target
        setattr(b, f"{target}_at", now())
    return True


def _results(db: Database, batch_id: str, states: tuple[str, ...]) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(BatchLine.result).where(BatchLine.batch_id == batch_id,
                                                             BatchLine.state.in_(states))
                              .order_by(BatchLine.line_no)))

