"""The usage spool: ledger rows that could not reach the database right away, kept in a local
write-ahead file (JSON lines in the data directory, fsync'd before the request's answer completes)
until a replay lands them.

Replaying is idempotent: `usage.record` writes a row only if its trace id is not in the ledger
yet (a unique constraint), and charges the balance in the same transaction. So a replay that is
interrupted (the database fails again, the process is killed) is simply run again from the start
of its file, and a row that was spooled although its first write did commit lands once.

Files: `usage-spool.jsonl` takes appends; a replay first renames it to
`usage-spool.replaying.jsonl` (appends then start a new file) and deletes that once every row in
it has landed. A row the database refuses for a reason other than being unavailable (it would
fail forever) moves to `usage-spool.rejected.jsonl` with the reason, and the log says so.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from lmserve.platform.db import is_store_error
from lmserve.platform.usage import UsageEntry

log = logging.getLogger("lmserve.platform")

SPOOL_NAME = "usage-spool.jsonl"
REPLAYING_NAME = "usage-spool.replaying.jsonl"
REJECTED_NAME = "usage-spool.rejected.jsonl"
_LOCK_NAME = "usage-spool.lock"  # flock: another process on the same data directory (a second server)


class UsageSpool:
    """Blocking calls (file writes, fsync, database writes): run them on worker threads."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / SPOOL_NAME
        self.replaying = self.dir / REPLAYING_NAME
        self._lock = threading.Lock()
        # trace id -> request time of every row in the files not landed yet (the metrics)
        self._pending: dict[str, float] = {}
        for path in (self.replaying, self.path):
            for entry in _read(path):
                self._pending[entry.trace_id] = entry.created_at or time.time()

    # ---- state, for metrics and /health/ready ---------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._pending)

    def oldest_age_s(self, now: float | None = None) -> float:
        times = list(self._pending.values())
        return max(0.0, (now or time.time()) - min(times)) if times else 0.0

    # ---- append / replay ------------------------------------------------------------------------

    def append(self, entry: UsageEntry) -> None:
        """Add one row, durably: when this returns, the row survives a crash of the process or
        the machine."""
        line = (json.dumps(dataclasses.asdict(entry), separators=(",", ":")) + "\n").encode()
        with self._lock, self._flock():
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:  # the new file's name must be durable too
                _fsync_dir(self.dir)
            self._pending[entry.trace_id] = entry.created_at or time.time()

    def replay(self, write: Callable[[UsageEntry], bool]) -> int:
        """Land every spooled row through `write` (usage.record): the replay file a replay before
        left (interrupted, or the process killed), then the rows spooled since. Returns the rows
        it wrote now (rows already in the ledger are skipped by the database). A store error
        stops the replay and propagates; the rows not landed stay spooled for the next one."""
        written = 0
        for _ in range(3):  # rows keep arriving while the database is away; the next replay takes the rest
            with self._lock, self._flock():
                if not self.replaying.exists():
                    if not self.path.exists():
                        break
                    os.replace(self.path, self.replaying)
                    _fsync_dir(self.dir)
            written += self._replay_file(write)
        if written:
            log.info("usage spool: %d row(s) landed in the ledger", written)
        return written

    def _replay_file(self, write: Callable[[UsageEntry], bool]) -> int:
        written = 0
        for entry in _read(self.replaying):
            try:
                written += bool(write(entry))
            except Exception as e:
                if is_store_error(e):
                    raise
                self._reject(entry, e)
            self._pending.pop(entry.trace_id, None)
        with self._lock, self._flock():
            self.replaying.unlink(missing_ok=True)
            _fsync_dir(self.dir)
        return written

    def _reject(self, entry: UsageEntry, error: Exception) -> None:
        log.error("usage spool: the database refuses the row of trace %s (%s: %s); kept in %s", entry.trace_id,
                  type(error).__name__, error, self.dir / REJECTED_NAME)
        record = {**dataclasses.asdict(entry), "error": f"{type(error).__name__}: {error}"}
        with open(self.dir / REJECTED_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @contextmanager
    def _flock(self):
        fd = os.open(self.dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def _read(path: Path) -> list[UsageEntry]:
    """The rows of a spool file. A last line cut short (the process died mid-append, before the
    fsync returned, so its request was never answered as recorded) is skipped."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    fields = {f.name for f in dataclasses.fields(UsageEntry)}
    entries = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            entries.append(UsageEntry(**{k: v for k, v in data.items() if k in fields}))
        except (ValueError, TypeError):
            log.warning("usage spool: skipping a torn line in %s", path)
    return entries


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
