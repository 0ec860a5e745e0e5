"""`lmserve` command line. Each command group lives in its own module under lmserve/cli/ and
registers itself through `register(subparsers)`; adding a group is one module plus one line in
COMMAND_MODULES. Modules import heavy dependencies (torch, the server) inside their handlers, so
`lmserve --help` and a bad flag answer at once."""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order in `lmserve --help`.
COMMAND_MODULES = ["lmserve.cli.serve", "lmserve.cli.chat", "lmserve.cli.keys", "lmserve.cli.accounts",
                   "lmserve.cli.usage", "lmserve.cli.batches", "lmserve.cli.plan", "lmserve.cli.perplexity"]


def build_parser() -> argparse.ArgumentParser:
    from lmserve import __version__

    parser = argparse.ArgumentParser(prog="lmserve", description="Self-hosted LLM serving.")
    parser.add_argument("--version", action="version", version=f"lmserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # Ctrl-C outside a command's own handling (e.g. while a model loads): one line, no traceback.
        print("\nlmserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
