"""`lmserve accounts list|topup|set`: accounts, their balances, tiers and account-wide limits."""

from __future__ import annotations

import argparse
import json

from lmserve.cli._platform import add_database_flags, run_command
from lmserve.cli._types import positive_int


def register(sub) -> None:
    accounts = sub.add_parser("accounts", help="list accounts, top up balances")
    asub = accounts.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")

    topup = asub.add_parser("topup", help="add credit to an account")
    topup.add_argument("account")
    topup.add_argument("amount", help="a positive decimal amount, e.g. 10.50")
    topup.add_argument("--granted", action="store_true",
                       help="add to the granted balance (spent first) instead of the paid chargeBalance")
    add_database_flags(topup)
    topup.set_defaults(func=_topup)

    update = asub.add_parser("set", help="change an account's tier, status or account-wide limits")
    update.add_argument("account")
    update.add_argument("--tier", help="the tier its keys get unless they name their own")
    update.add_argument("--status", choices=["active", "disabled"], help="a disabled account's keys get 401")
    for limit in ("rpm", "tpm", "rpd", "tpd"):
        update.add_argument(f"--{limit}", type=positive_int,
                            help=f"{limit.upper()} over all the account's keys, per model")
    update.add_argument("--clear-limits", action="store_true", help="remove the account-wide limits first")
    add_database_flags(update)
    update.set_defaults(func=_set)

    ls = asub.add_parser("list", help="accounts with their tiers and balances")
    ls.add_argument("--json", action="store_true", help="print JSON")
    add_database_flags(ls)
    ls.set_defaults(func=_list)


def _topup(args: argparse.Namespace) -> int:
    from lmserve.platform import keys
    from lmserve.platform.db import to_nanos

    def work(db):
        if to_nanos(args.amount) <= 0:
            raise ValueError(f"the amount must be positive, not {args.amount!r}")
        a = keys.topup(db, args.account, args.amount, granted=args.granted)
        print(f"{a['name']}: balance {a['balance']}, chargeBalance {a['charge_balance']}, "
              f"total {a['total_balance']}")
        return 0

    return run_command("accounts topup", args, work)


def _set(args: argparse.Namespace) -> int:
    from lmserve.platform import keys

    def work(db):
        limits = {n: getattr(args, n) for n in ("rpm", "rpd", "tpm", "tpd")}
        if any(v is not None and v < 1 for v in limits.values()):
            raise ValueError("limits must be positive integers")
        a = keys.update_account(db, args.account, tier=args.tier, status=args.status, limits=limits,
                                clear_limits=args.clear_limits)
        shown = " ".join(f"{n}={v}" for n, v in a["limits"].items() if v) or "none"
        print(f"{a['name']}: tier {a['tier']}, status {a['status']}, account-wide limits {shown}")
        return 0

    return run_command("accounts set", args, work)


def _list(args: argparse.Namespace) -> int:
    from lmserve.platform import keys

    def work(db):
        rows = keys.list_accounts(db)
        if args.json:
            print(json.dumps(rows))
            return 0
        from rich.console import Console
        from rich.table import Table

        table = Table("id", "name", "tier", "balance", "chargeBalance", "total", "status")
        for a in rows:
            table.add_row(str(a["id"]), a["name"], a["tier"], a["balance"], a["charge_balance"], a["total_balance"],
                          "unlimited" if a["unlimited"] else a["status"])
        Console().print(table)
        return 0

    return run_command("accounts list", args, work)
