"""`lmserve` command line: `serve` runs the API server, `chat` talks to a model in the terminal."""

from __future__ import annotations

import argparse
import sys

from lmserve.models.loader import DEFAULT_MODEL_ID


def _chat(args: argparse.Namespace) -> int:
    from lmserve import LLM, SamplingParams

    print(f"loading {args.model} ...", file=sys.stderr)
    llm = LLM(args.model, dtype=args.dtype)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            frequency_penalty=args.frequency_penalty)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("type a message; an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line:
            return 0
        history.append({"role": "user", "content": line})
        out = llm.chat(history, params)[0].outputs[0]
        print(f"assistant> {out.text}")
        history.append({"role": "assistant", "content": out.text})


def _serve(args: argparse.Namespace) -> int:
    from lmserve.config import ConfigError, load_config
    from lmserve.models.loader import CheckpointError
    from lmserve.server.serve import serve

    try:
        config = load_config(args.config, args.model, args.host, args.port)
        return serve(config)
    except (ConfigError, CheckpointError) as e:
        print(f"lmserve serve: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmserve", description="Self-hosted LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat with a model in the terminal (offline engine)")
    chat.add_argument("--model", default=DEFAULT_MODEL_ID, help="checkpoint directory, .gguf file or the default id")
    chat.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", type=float, default=0.7)
    chat.add_argument("--frequency-penalty", type=float, default=0.5)
    chat.set_defaults(func=_chat)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible chat API")
    serve.add_argument("--config", help="deployment config file (YAML or TOML)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8000)")
    serve.add_argument("--model", action="append", metavar="PATH_OR_ID",
                       help="deploy this model (repeatable); with no config and no --model, the bundled SmolLM2")
    serve.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
