"""Accounts and their API keys: creation (the key is shown once), listing, revocation, and
turning a presented key into a `Principal`.

A key is `sk-` + 43 random URL-safe characters (256 bits). The database keeps its first
characters (`prefix`, to find the row and to show in listings) and sha256(salt + key) with a
per-key salt, compared in constant time; the key itself is never stored. Keys from the config
or LMSERVE_API_KEYS (bootstrap keys, any format) belong to the unlimited `bootstrap` account and
are matched in memory, so a fresh `lmserve serve` answers with no setup; the key a keyless start
generates belongs to that server instance alone (see `register_generated_key`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update

from lmserve.config import LIMIT_NAMES
from lmserve.platform.db import Account, ApiKey, Database, from_nanos, now, to_nanos

KEY_PREFIX_LEN = 12  # "sk-" + 9 random characters: 54 bits to find the row, 204 left secret
BOOTSTRAP_ACCOUNT = "bootstrap"


class NotFound(LookupError):
    """A key operation that names something that does not exist or cannot be done."""


@dataclass
class Principal:
    """Who is asking: a key and its account, as read at authentication."""

    key_id: int
    key_prefix: str
    account_id: int
    account_name: str
    tier: str
    models: list[str] | None
    key_limits: dict[str, int | None]
    account_limits: dict[str, int | None]
    unlimited: bool
    is_admin: bool
    total_balance_nanos: int = 0

    def may_use(self, model: str) -> bool:
        return self.models is None or any(fnmatch.fnmatchcase(model, p) for p in self.models)


class AuthFailed(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def generate_key() -> str:
    return "sk-" + secrets.token_urlsafe(32)


def hash_key(key: str, salt: str) -> str:
    return hashlib.sha256(salt.encode() + key.encode()).hexdigest()


def _display_prefix(key: str) -> str:
    # Bootstrap keys may be short: show only a few characters of those.
    return key[:KEY_PREFIX_LEN] if len(key) >= 40 else key[: min(6, len(key) // 3)]


def get_or_create_account(db: Database, name: str, tier: str = "free", unlimited: bool = False) -> Account:
    with db.session() as s:
        account = s.scalar(select(Account).where(Account.name == name))
        if account is None:
            account = Account(name=name, tier=tier, balance_nanos=0, charge_balance_nanos=0, status="active",
                              unlimited=unlimited, created_at=now())
            s.add(account)
            s.flush()
        return account


def create_key(db: Database, account: str, *, tier: str | None = None, limits: dict[str, int | None] | None = None,
               models: list[str] | None = None, balance: str | None = None, expires_at: float | None = None,
               name: str = "", is_admin: bool = False) -> tuple[str, ApiKey]:
    """A new key for `account` (created with `tier` if new). `balance` is granted credit added to
    the account. Returns (the key, shown only now; its row)."""
    acct = get_or_create_account(db, account, tier or "free")
    key = generate_key()
    salt = secrets.token_hex(16)
    row = ApiKey(account_id=acct.id, name=name, prefix=key[:KEY_PREFIX_LEN], salt=salt, key_hash=hash_key(key, salt),
                 tier=tier, models=models or None, is_admin=is_admin, bootstrap=False, created_at=now(),
                 expires_at=expires_at, **{k: (limits or {}).get(k) for k in LIMIT_NAMES})
    with db.session() as s:
        s.add(row)
        if balance is not None:
            s.execute(update(Account).where(Account.id == acct.id)
                      .values(balance_nanos=Account.balance_nanos + to_nanos(balance)))
    return key, row


def list_keys(db: Database, account: str | None = None, include_revoked: bool = False) -> list[dict]:
    with db.session() as s:
        q = select(ApiKey, Account).join(Account, ApiKey.account_id == Account.id).order_by(ApiKey.id)
        if account:
            q = q.where(Account.name == account)
        if not include_revoked:
            q = q.where(ApiKey.revoked_at.is_(None))
        return [key_view(k, a) for k, a in s.execute(q).all()]


def key_view(k: ApiKey, a: Account) -> dict:
    t = now()
    state = ("revoked" if k.revoked_at else "expired" if k.expires_at is not None and k.expires_at <= t
             # a generated key whose server died without revoking it (killed): no server accepts it
             else "orphaned" if k.owner and owner_alive(k.owner) is False
             else "active")
    return {"id": k.id, "prefix": k.prefix + "...", "name": k.name, "account": a.name,
            "tier": k.tier or a.tier, "limits": {n: getattr(k, n) for n in LIMIT_NAMES}, "models": k.models,
            "admin": k.is_admin, "bootstrap": k.bootstrap,
            "owner": _owner_label(k.owner) if k.owner else None, "status": state, "created_at": k.created_at,
            "expires_at": k.expires_at, "revoked_at": k.revoked_at}


def revoke_key(db: Database, key_id_or_prefix: str | int) -> dict:
    """Revoke by id or by the prefix a listing shows (with or without its trailing dots)."""
    with db.session() as s:
        if isinstance(key_id_or_prefix, int) or str(key_id_or_prefix).isdigit():
            rows = s.scalars(select(ApiKey).where(ApiKey.id == int(key_id_or_prefix))).all()
        else:
            rows = s.scalars(select(ApiKey).where(ApiKey.prefix == str(key_id_or_prefix).rstrip("."))).all()
        if len(rows) != 1:
            raise NotFound(f"no key {key_id_or_prefix!r}" if not rows else f"{key_id_or_prefix!r} names several keys")
        row = rows[0]
        if row.revoked_at is None:
            row.revoked_at = now()
        account = s.get(Account, row.account_id)
        return key_view(row, account)


def topup(db: Database, account: str, amount: str, granted: bool = False) -> dict:
    """Add paid credit (chargeBalance), or granted credit (balance) with `granted`."""
    nanos = to_nanos(amount)
    with db.session() as s:
        acct = s.scalar(select(Account).where(Account.name == account))
        if acct is None:
            raise NotFound(f"no account {account!r}")
        column = "balance_nanos" if granted else "charge_balance_nanos"
        s.execute(update(Account).where(Account.id == acct.id)
                  .values({column: getattr(Account, column) + nanos}))
    return account_view(db, account)


def update_account(db: Database, name: str, *, tier: str | None = None, status: str | None = None,
                   limits: dict[str, int | None] | None = None, clear_limits: bool = False) -> dict:
    """Change an account's tier, status (active | disabled) or account-wide limits (over all its
    keys, per model; `clear_limits` removes them first)."""
    if status not in (None, "active", "disabled"):
        raise ValueError(f"status must be active or disabled, not {status!r}")
    with db.session() as s:
        acct = s.scalar(select(Account).where(Account.name == name))
        if acct is None:
            raise NotFound(f"no account {name!r}")
        if tier:
            acct.tier = tier
        if status:
            acct.status = status
        for limit in LIMIT_NAMES:
            if clear_limits:
                setattr(acct, limit, None)
            if (limits or {}).get(limit) is not None:
                setattr(acct, limit, limits[limit])
    return account_view(db, name)


def account_view(db: Database, name: str) -> dict:
    with db.session() as s:
        a = s.scalar(select(Account).where(Account.name == name))
        if a is None:
            raise NotFound(f"no account {name!r}")
        return _account_dict(a)


def list_accounts(db: Database) -> list[dict]:
    with db.session() as s:
        return [_account_dict(a) for a in s.scalars(select(Account).order_by(Account.id)).all()]


def _account_dict(a: Account) -> dict:
    return {"id": a.id, "name": a.name, "tier": a.tier, "status": a.status, "unlimited": a.unlimited,
            "balance": from_nanos(a.balance_nanos), "charge_balance": from_nanos(a.charge_balance_nanos),
            "total_balance": from_nanos(a.balance_nanos + a.charge_balance_nanos),
            "limits": {n: getattr(a, n) for n in LIMIT_NAMES}}


def import_bootstrap_keys(db: Database, keys: list[str], admin: bool = False) -> dict[str, int]:
    """Give each config key a row under the unlimited bootstrap account (so usage rows name it).
    Returns {key: key id}. Matching is by salted hash: the plaintext is never stored.

    Other rows are left alone: several servers may share the database, each with its own config,
    so a key missing from this server's config may well be another server's."""
    account = get_or_create_account(db, BOOTSTRAP_ACCOUNT, "pro", unlimited=True)
    ids: dict[str, int] = {}
    with db.session() as s:
        rows = s.scalars(select(ApiKey).where(ApiKey.account_id == account.id, ApiKey.bootstrap.is_(True),
                                              ApiKey.is_admin.is_(admin), ApiKey.owner.is_(None))).all()
        for key in keys:
            match = next((r for r in rows if hmac.compare_digest(hash_key(key, r.salt), r.key_hash)), None)
            if match is None:
                salt = secrets.token_hex(16)
                match = ApiKey(account_id=account.id, name="admin (config)" if admin else "config",
                               prefix=_display_prefix(key), salt=salt, key_hash=hash_key(key, salt),
                               is_admin=admin, bootstrap=True, created_at=now())
                s.add(match)
                s.flush()
            match.revoked_at = None  # the config names it again: whoever revoked it, it is accepted
            ids[key] = match.id
    return ids


# ---- the key a keyless `lmserve serve` makes up ----------------------------------------------
# It belongs to that one server instance: its row is written once the models have loaded (a
# failed start leaves none), records the instance as `owner`, and is revoked when that server
# stops. A start touches no other server's key; the one exception is a generated key whose owner
# process is provably gone (same host, that pid no longer the process that started), which no
# server can accept any more and is revoked so that `keys list` says so.


def instance_owner(port: int) -> str:
    """This process as a key owner: "host/pid/start-ticks:port" (start ticks tell a reused pid apart)."""
    return f"{socket.gethostname()}/{os.getpid()}/{_process_start(os.getpid()) or 0}:{port}"


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces


def owner_alive(owner: str) -> bool | None:
    """Whether the owning server still runs: None when this host cannot tell (another host)."""
    try:
        host, pid, start_port = owner.split("/", 2)
        start = int(start_port.split(":", 1)[0])
        pid_n = int(pid)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    if not Path("/proc").is_dir():
        try:
            os.kill(pid_n, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return _process_start(pid_n) == start if start else _process_start(pid_n) is not None


def _owner_label(owner: str) -> str:
    host, _, rest = owner.partition("/")
    pid, _, start_port = rest.partition("/")
    port = start_port.partition(":")[2]
    return f"lmserve serve pid {pid} on {host}:{port}"


def register_generated_key(db: Database, key: str, owner: str) -> int:
    """The row of the key this server instance generated (bootstrap account, `owner` set). Revokes
    generated keys of servers on this host that are gone first. Returns its id."""
    account = get_or_create_account(db, BOOTSTRAP_ACCOUNT, "pro", unlimited=True)
    with db.session() as s:
        for r in s.scalars(select(ApiKey).where(ApiKey.owner.is_not(None), ApiKey.revoked_at.is_(None))).all():
            if owner_alive(r.owner) is False:
                r.revoked_at = now()
        salt = secrets.token_hex(16)
        row = ApiKey(account_id=account.id, name="generated (serve)", prefix=_display_prefix(key), salt=salt,
                     key_hash=hash_key(key, salt), is_admin=False, bootstrap=True, owner=owner, created_at=now())
        s.add(row)
        s.flush()
        return row.id


def release_generated_key(db: Database, key_id: int) -> None:
    """The owning server stops: no one accepts its key any more."""
    with db.session() as s:
        s.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=now()))


def authenticate(db: Database, token: str) -> Principal:
    """The principal behind a generated key, or AuthFailed (unknown, revoked, expired)."""
    with db.session() as s:
        rows = s.execute(select(ApiKey, Account).join(Account, ApiKey.account_id == Account.id)
                         .where(ApiKey.prefix == token[:KEY_PREFIX_LEN], ApiKey.bootstrap.is_(False))).all()
        found = None
        for k, a in rows:  # every candidate is compared: the time does not tell which one matched
            if hmac.compare_digest(hash_key(token, k.salt), k.key_hash):
                found = (k, a)
        if found is None:
            raise AuthFailed("invalid API key")
        k, a = found
        if k.revoked_at is not None:
            raise AuthFailed("this API key has been revoked")
        if k.expires_at is not None and k.expires_at <= now():
            raise AuthFailed("this API key has expired")
        if a.status != "active":
            raise AuthFailed("this API key's account is disabled")
        return principal_of(k, a)


def principal_of(k: ApiKey, a: Account) -> Principal:
    return Principal(key_id=k.id, key_prefix=k.prefix, account_id=a.id, account_name=a.name, tier=k.tier or a.tier,
                     models=k.models, key_limits={n: getattr(k, n) for n in LIMIT_NAMES},
                     account_limits={n: getattr(a, n) for n in LIMIT_NAMES}, unlimited=a.unlimited,
                     is_admin=k.is_admin, total_balance_nanos=a.balance_nanos + a.charge_balance_nanos)


def bootstrap_principal(db: Database, key_id: int) -> Principal:
    with db.session() as s:
        k = s.get(ApiKey, key_id)
        return principal_of(k, s.get(Account, k.account_id))


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, *, future: bool) -> float:
    """A point in time from a duration ("30d", "12h": from now, forward if `future` else back) or
    an ISO date/datetime (UTC when it names no zone). ValueError with a readable message."""
    import datetime as dt

    text = text.strip()
    if len(text) >= 2 and text[-1] in _UNITS and text[:-1].isdigit():
        seconds = int(text[:-1]) * _UNITS[text[-1]]
        return now() + seconds if future else now() - seconds
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (30d, 12h, 90m) nor an ISO date (2026-12-31)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()
