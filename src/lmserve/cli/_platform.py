"""What the account commands (keys, accounts, usage) share: the database named by the same
config `lmserve serve` reads (or --database-url), migrated on open, and the error path."""

from __future__ import annotations

import argparse
import sys


def add_database_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("platform database (the one `lmserve serve` uses with the same flags)")
    group.add_argument("--config", metavar="FILE", help="the deployment config whose platform database to use")
    group.add_argument("--data-dir", metavar="DIR",
                       help="the data directory of `lmserve serve --data-dir DIR` (its lmserve.db; default "
                            "$LMSERVE_DATA_DIR or ~/.local/share/lmserve)")
    group.add_argument("--database-url", metavar="URL",
                       help="SQLAlchemy URL, e.g. postgresql+psycopg://... (default: the config's, else the "
                            "data directory's SQLite file)")


def open_database(args: argparse.Namespace):
    from lmserve.config import load_config
    from lmserve.platform.db import Database

    url = args.database_url or load_config(args.config, data_dir=args.data_dir).platform.db_url
    db = Database(url)
    db.migrate()
    return db


def run_command(name: str, args: argparse.Namespace, work) -> int:
    """Run `work(db)`; a config, database or lookup problem is one line and exit status 2."""
    from sqlalchemy.exc import SQLAlchemyError

    from lmserve.config import ConfigError
    from lmserve.platform.keys import NotFound

    try:
        db = open_database(args)
    except ConfigError as e:
        print(f"lmserve {name}: {e}", file=sys.stderr)
        return 2
    except SQLAlchemyError as e:
        print(f"lmserve {name}: cannot open the platform database: {e.__class__.__name__}: {e.orig or e}"
              .splitlines()[0], file=sys.stderr)
        return 2
    try:
        return work(db) or 0
    except (NotFound, ValueError) as e:
        print(f"lmserve {name}: {e}", file=sys.stderr)
        return 2
    finally:
        db.close()


def fit_table(headers: list[str], rows: list[list[str]], *, squeeze: int, width: int):
    """A rich Table of `rows` no wider than `width`: the `squeeze` column (a model id) gives up
    the room, abbreviated in the middle so that both its start and its distinguishing end stay
    (`HuggingFaceTB/SmolLM2-135M-Instruct` -> `Hugg…/SmolLM2-135M-Instruct`); the rest never
    shrink. Headers may span lines ("prompt\ntokens") to leave the model more room."""
    from rich.table import Table

    widths = [max([len(line) for line in h.splitlines()] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    gaps = 2 * (len(headers) - 1)  # no box: only the padding, one space each side between columns
    room = width - gaps - sum(w for i, w in enumerate(widths) if i != squeeze)
    room = max(room, 12)
    table = Table(*headers, box=None, pad_edge=False, header_style="bold")
    for i, column in enumerate(table.columns):
        column.no_wrap = i != squeeze
        column.overflow = "fold"  # narrower than even `room`: wrapped, never cut
    for r in rows:
        table.add_row(*[abbreviate_middle(v, room) if i == squeeze else v for i, v in enumerate(r)])
    return table


def abbreviate_middle(text: str, width: int) -> str:
    """`text` in at most `width` characters: some of its head and most of its tail (the last path
    segment whole where it fits: that is what tells models apart), joined by …"""
    if len(text) <= width:
        return text
    last = text.rsplit("/", 1)[-1]
    tail = min(max((2 * (width - 1)) // 3, len(last) + 1), width - 2)
    return text[: width - 1 - tail] + "…" + text[len(text) - tail:]
