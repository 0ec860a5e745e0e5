"""`lmserve chat`: talk to a model in the terminal."""

from __future__ import annotations

import argparse
import sys

from lmserve.models.loader import DEFAULT_MODEL_ID


def register(sub) -> None:
    chat = sub.add_parser("chat", help="chat with a model in the terminal (offline engine)")
    chat.add_argument("--model", default=DEFAULT_MODEL_ID, help="checkpoint directory, .gguf file or the default id")
    chat.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", type=float, default=0.7)
    chat.add_argument("--frequency-penalty", type=float, default=0.5)
    chat.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
