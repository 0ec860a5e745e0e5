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
