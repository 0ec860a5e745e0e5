"""`lmserve batches list|show|cancel`: the batch API's batches, from the platform database (an
operator's view: every account's, or one account's with --account)."""

from __future__ import annotations

import argparse
import json
import time

from lmserve.cli._platform import add_database_flags, fit_table, run_command
from lmserve.cli._types import positive_int


def register(sub) -> None:
    batches = sub.add_parser("batches", help="batch API jobs: list, show, cancel")
    actions = batches.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="batches, newest first")
    ls.add_argument("--account", help="only this account's")
    ls.add_argument("--limit", type=positive_int, default=20)
    show = actions.add_parser("show", help="one batch (the API's batch object)")
    show.add_argument("batch_id")
    cancel = actions.add_parser("cancel", help="stop starting its lines; the running ones finish")
    cancel.add_argument("batch_id")
    for p in (ls, show, cancel):
        p.add_argument("--json", action="store_true", help="print JSON")
        add_database_flags(p)
        p.set_defaults(func=_batches)


def _batches(args: argparse.Namespace) -> int:
    from lmserve.platform import batches as store
    from lmserve.platform.keys import NotFound

    def work(db):
        if args.action == "list":
            account = _account_id(db, args.account) if args.account else None
            rows, _ = store.list_batches(db, account, None, args.limit)
            return _print(args, rows, table=True)
        try:
            found = (store.get if args.action == "show" else store.cancel)(db, args.batch_id, None)
        except store.BatchError as e:
            raise ValueError(e.message) from None
        if found is None:
            raise NotFound(f"no batch {args.batch_id}")
        return _print(args, [found], table=False)

    return run_command("batches", args, work)


def _account_id(db, name: str) -> int:
    from sqlalchemy import select

    from lmserve.platform.db import Account
    from lmserve.platform.keys import NotFound

    with db.session() as s:
        found = s.scalar(select(Account.id).where(Account.name == name))
    if found is None:
        raise NotFound(f"no account {name!r}")
    return found


def _print(args, rows: list[dict], table: bool) -> int:
    if args.json:
        print(json.dumps(rows if table else rows[0]))
        return 0
    from rich.console import Console

    console = Console()
    if not table:
        console.print_json(json.dumps(rows[0]))
        return 0
    console.print(fit_table(
        ["id", "status", "progress", "failed", "endpoint", "created"],
        [[b["id"], b["status"], _progress(b), str(b["request_counts"]["failed"]), b["endpoint"],
          time.strftime("%Y-%m-%d %H:%M", time.gmtime(b["created_at"]))] for b in rows],
        squeeze=4, width=console.width))
    return 0


def _progress(b: dict) -> str:
    c = b["request_counts"]
    done = c["completed"] + c["failed"]
    return f"{done}/{c['total']}" + (f" ({100 * done // c['total']}%)" if c["total"] else "")
