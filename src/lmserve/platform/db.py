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
    trace_id: Mapped[str] = mapped_column(String(64), index=True)


_MIGRATION_LOCK_ID = 0x6C6D7376  # "lmsv": the advisory lock that serialises schema migrations


class Database:
    """An engine plus sessions. Calls are synchronous: the server runs them in worker threads."""

    def __init__(self, url: str):
        self.url = url
        self.engine = _make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self):
        with self.sessions.begin() as s:
            yield s

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
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_ID})")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               pool_size=8, max_overflow=16)

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
    return create_engine(url, pool_size=8, max_overflow=24, pool_pre_ping=True)
