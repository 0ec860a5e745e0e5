"""`lmserve usage`: requests, tokens and cost per account and model, from the usage ledger."""

from __future__ import annotations

import argparse
import json

from lmserve.cli._platform import add_database_flags, fit_table, run_command


def register(sub) -> None:
    usage = sub.add_parser("usage", help="usage per account and model (the ledger)")
    usage.add_argument("--account")
    usage.add_argument("--model")
    usage.add_argument("--since", help="a duration back from now (24h, 7d) or a date (2026-11-01)")
    usage.add_argument("--json", action="store_true", help="print JSON")
    add_database_flags(usage)
    usage.set_defaults(func=_usage)


def _usage(args: argparse.Namespace) -> int:
    from lmserve.platform import keys, usage

    def work(db):
        since = keys.parse_time(args.since, future=False) if args.since else None
        rows = usage.summary(db, args.account, args.model, since)
        if args.json:
            print(json.dumps(rows))
            return 0
        from rich.console import Console

        console = Console()
        table = fit_table(["account", "model", "requests", "errors", "prompt\ntokens", "completion\ntokens", "cost"],
                          [[r["account"], r["model"], str(r["requests"]), _errors(r), str(r["prompt_tokens"]),
                            str(r["completion_tokens"]), r["cost"]] for r in rows], squeeze=1, width=console.width)
        console.print(table)
        return 0

    return run_command("usage", args, work)


def _errors(row: dict) -> str:
    """"5 (429: 3, 403: 2)": the errors and how many of each status."""
    by_status = ", ".join(f"{status}: {n}" for status, n in row["errors_by_status"].items())
    return f"{row['errors']} ({by_status})" if by_status else str(row["errors"])
