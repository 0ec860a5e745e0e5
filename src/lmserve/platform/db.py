"""The platform's tables (SQLAlchemy 2) and the database they live in.

SQLite (a file in the data directory, WAL mode, so readers never wait for the writer) by
default; PostgreSQL by a `postgresql+psycopg://` URL where several API servers share accounts
and usage. The schema is created and upgraded by the Alembic migrations shipped in
`lmserve/platform/migrations`, never by `create_all`, so an existing database always upgrades.

Money is an integer count of nanos (1e-9 of the currency unit): exact sums on both databases,
and a price of 0.07 per million tokens still costs a whole number (70) per token.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

NANOS = 10**9  # nanos per currency unit
MIGRATIONS = Path(__file__).parent / "migrations"


def to_nanos(amount: str | int | float | Decimal) -> int:
    """A currency amount ("10.5") as integer nanos; raises ValueError for anything else."""
    try:
        value = Decimal(str(amount))
    except ArithmeticError:
        raise ValueError(f"not an amount: {amount!r}") from None
    if not value.is_finite():
        raise ValueError(f"not an amount: {amount!r}")
    return int((value * NANOS).to_integral_value())


def from_nanos(nanos: int) -> str:
    """Integer nanos as a decimal string with no trailing zeros ("1.5", "100", "-0.000002")."""
    text = f"{Decimal(nanos) / NANOS:.9f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def now() -> float:
    return time.time()


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    tier: Mapped[str] = mapped_column(String(50), default="free")
    # Granted credit is spent first, then what was paid in (topped up), as on the platform.
    balance_nanos: Mapped[int] = mapped_column(BigInteger, default=0)
    charge_balance_nanos: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(20), default="active")  # active | disabled
    unlimited: Mapped[bool] = mapped_column(Boolean, default=False)  # the bootstrap account: no limits, no balance
    # Account-wide limits over all its keys, per model (None: none beyond the keys' own).
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rpd: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpd: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(32), index=True)  # the key's first characters: lookup and display
    salt: Mapped[str] = mapped_column(String(64))
    key_hash: Mapped[str] = mapped_column(String(128))  # sha256(salt + key), hex
    tier: Mapped[str | None] = mapped_column(String(50), nullable=True)  # None: the account's tier
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rpd: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpd: Mapped[int | None] = mapped_column(Integer, nullable=True)
    models: Mapped[list | None] = mapped_column(JSON, nullable=True)  # glob patterns; None: every model
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    bootstrap: Mapped[bool] = mapped_column(Boolean, default=False)  # from the config / LMSERVE_API_KEYS
    # a generated key's server instance ("host/pid/start:port", keys.instance_owner); None otherwise
    owner: Mapped[str | None] = mapped_column(String(300), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class UsageRecord(Base):
    """One row per admitted request, however it ended."""

    __tablename__ = "usage"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float, default=now, index=True)
    key_id: Mapped[int] = mapped_column(Integer, index=True)
    account_id: Mapped[int] = mapped_column(Integer, index=True)
    model: Mapped[str] = mapped_column(String(300), index=True)
    tier: Mapped[str] = mapped_column(String(50))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    cost_nanos: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[int] = mapped_column(Integer)  # the HTTP status the client got (499: it went away)
    latency_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Unique: a row retried after a lost commit confirmation, or replayed from the spool after it
    # did land, is dropped by the database (ON CONFLICT DO NOTHING), never written twice.
    trace_id: Mapped[str] = mapped_column(String(64), index=True, unique=True)
    batch_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # a batch line's row: its batch


@dataclass(frozen=True)
class Timeouts:
    """Bounds on every wait for the database (seconds): opening a connection, one statement
    (PostgreSQL's statement_timeout; SQLite's lock wait), a free connection from the pool."""

    connect_s: float = 3.0
    statement_s: float = 10.0
    pool_s: float = 5.0


def is_store_error(exc: BaseException) -> bool:
    """The database or Redis is unreachable, restarting or too slow: the request may succeed
    later (a 503 with Retry-After), unlike a bug (a 500)."""
    import redis.exceptions
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError,
                        redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, TimeoutError,
                        ConnectionError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(exc, (psycopg.OperationalError, psycopg.errors.QueryCanceled))


_MIGRATION_LOCK_ID = 0x6C6D7376  # "lmsv": the advisory lock that serialises schema migrations


class Database:
    """An engine plus sessions. Calls are synchronous: the server runs them in worker threads."""

    def __init__(self, url: str, timeouts: Timeouts | None = None):
        self.url = url
        self.timeouts = timeouts or Timeouts()
        self.engine = _make_engine(url, self.timeouts)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self):
        with self.sessions.begin() as s:
            yield s

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def migrate(self) -> None:
        """Create or upgrade the schema to the newest migration."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                # Several servers starting at once on one database (docs/deployment.md): one
                # migrates, the others wait here and then find the schema current. The lock is
                # the transaction's: released at its commit.
                conn.exec_driver_sql("SET LOCAL statement_timeout = 0")  # a migration may outlast a request
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_ID})")
            cfg.attributes["connection"] = conn
            # "heads": migrations added on parallel branches of the project apply together
            command.upgrade(cfg, "heads")

    def close(self) -> None:
        self.engine.dispose()


def _make_engine(url: str, timeouts: Timeouts) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # A local file: the only wait is for the writer's lock, which queues (busy_timeout) for
        # at least 30 s, since under a burst of writers that wait is normal, not an outage.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               pool_size=8, max_overflow=16, pool_timeout=timeouts.pool_s)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            # WAL: readers never block on the writer; busy_timeout: writers queue instead of failing.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    connect_args = {}
    if parsed.get_backend_name() == "postgresql":
        # libpq's connect_timeout is whole seconds (at least 2, below that libpq uses 2)
        connect_args = {"connect_timeout": max(2, round(timeouts.connect_s)),
                        "options": f"-c statement_timeout={int(timeouts.statement_s * 1000)}"}
    return create_engine(url, pool_size=8, max_overflow=24, pool_pre_ping=True, pool_timeout=timeouts.pool_s,
                         connect_args=connect_args)
