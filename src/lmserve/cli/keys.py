"""`lmserve keys create|list|revoke`: API keys in the platform database (shared with every
server that uses it; a revoked key is refused from its next request)."""

from __future__ import annotations

import argparse
import json

from lmserve.cli._platform import add_database_flags, run_command
from lmserve.cli._types import positive_int


def register(sub) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    create = ksub.add_parser("create", help="create a key (printed once)")
    create.add_argument("--account", required=True, help="the owning account (created if new)")
    create.add_argument("--tier", help="free or pro (or a tier of the config); default: the account's (free)")
    create.add_argument("--name", default="", help="a label for listings")
    for limit in ("rpm", "tpm", "rpd", "tpd"):
        create.add_argument(f"--{limit}", type=positive_int, help=f"override the tier's {limit.upper()} for this key")
    create.add_argument("--models", nargs="+", metavar="GLOB", help="allow only these model ids (globs: 'Pro/*')")
    create.add_argument("--balance", help="granted credit to add to the account, e.g. 10.50")
    create.add_argument("--expires", help="a duration (30d, 12h) or a date (2026-12-31)")
    create.add_argument("--admin", action="store_true", help="the key may use the /admin API")
    create.add_argument("--json", action="store_true", help="print JSON")
    add_database_flags(create)
    create.set_defaults(func=_create)

    ls = ksub.add_parser("list", help="list keys (prefixes only; keys are never stored)")
    ls.add_argument("--account")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    ls.add_argument("--json", action="store_true", help="print JSON")
    add_database_flags(ls)
    ls.set_defaults(func=_list)

    revoke = ksub.add_parser("revoke", help="revoke a key by id or prefix")
    revoke.add_argument("key", help="the id or the prefix `keys list` shows")
    add_database_flags(revoke)
    revoke.set_defaults(func=_revoke)


def _create(args: argparse.Namespace) -> int:
    from lmserve.platform import keys
    from lmserve.platform.db import to_nanos

    def work(db):
        expires_at = keys.parse_time(args.expires, future=True) if args.expires else None
        if args.balance is not None and to_nanos(args.balance) < 0:
            raise ValueError("--balance must not be negative")
        limits = {n: getattr(args, n) for n in ("rpm", "rpd", "tpm", "tpd")}
        key, row = keys.create_key(db, args.account, tier=args.tier, limits=limits, models=args.models,
                                   balance=args.balance, expires_at=expires_at, name=args.name, is_admin=args.admin)
        view = next(k for k in keys.list_keys(db, args.account) if k["id"] == row.id)
        if args.json:
            print(json.dumps({"key": key, **view}))
            return 0
        print(key)
        limits_text = ", ".join(f"{n}={v}" for n, v in view["limits"].items() if v) or "the tier's"
        print(f"  id {view['id']}, account {view['account']}, tier {view['tier']}, limits {limits_text}"
              f"{', models ' + ' '.join(view['models']) if view['models'] else ''}")
        print("  (shown once: store it now)")
        return 0

    return run_command("keys create", args, work)


def _list(args: argparse.Namespace) -> int:
    from lmserve.platform import keys

    def work(db):
        rows = keys.list_keys(db, args.account, include_revoked=args.all)
        if args.json:
            print(json.dumps(rows))
            return 0
        from rich.console import Console
        from rich.table import Table

        table = Table("id", "prefix", "account", "tier", "limits", "models", "status", "name")
        for k in rows:
            limits = " ".join(f"{n}={v}" for n, v in k["limits"].items() if v) or "-"
            table.add_row(str(k["id"]), k["prefix"], k["account"], k["tier"], limits,
                          " ".join(k["models"] or ["*"]), k["status"] + (" admin" if k["admin"] else ""),
                          k["name"] + (f" ({k['owner']})" if k.get("owner") else ""))
        Console().print(table)
        return 0

    return run_command("keys list", args, work)


def _revoke(args: argparse.Namespace) -> int:
    from lmserve.platform import keys

    def work(db):
        view = keys.revoke_key(db, args.key)
        print(f"revoked key {view['id']} ({view['prefix']}) of account {view['account']}")
        return 0

    return run_command("keys revoke", args, work)
