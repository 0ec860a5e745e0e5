"""`lmserve serve`: the OpenAI-compatible API server."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible chat API")
    serve.add_argument("--config", help="deployment config file (YAML or TOML)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8000)")
    serve.add_argument("--model", action="append", metavar="PATH_OR_ID",
                       help="deploy this model (repeatable); with no config and no --model, the bundled SmolLM2")
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmserve.config import ConfigError, load_config
    from lmserve.models.loader import CheckpointError
    from lmserve.server.serve import serve

    try:
        config = load_config(args.config, args.model, args.host, args.port)
        return serve(config)
    except (ConfigError, CheckpointError) as e:
        print(f"lmserve serve: {e}", file=sys.stderr)
        return 2
