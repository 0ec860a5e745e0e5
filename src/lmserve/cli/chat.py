"""`lmserve chat`: talk to a model in the terminal, token by token.

Runs the engine in this process (the bundled model by default), or talks to a running server
with --url. The conversation is kept until /reset; Ctrl-C stops the reply being written and
returns to the prompt; /exit or Ctrl-D quits. A line `\"\"\"` starts and ends a multi-line message,
and a line ending in a backslash continues on the next one."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Iterator

from lmserve.cli._types import number, positive_int
from lmserve.defaults import DEFAULT_MODEL_ID

HELP = ("commands: /reset (forget the conversation), /exit (or Ctrl-D); Ctrl-C stops a reply; "
        '\"\"\" starts and ends a multi-line message')


def register(sub) -> None:
    chat = sub.add_parser("chat", help="chat with a model in the terminal (streamed)",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_argument("--url", help="talk to a running lmserve (or any OpenAI-compatible) server at this base URL, "
                                    "e.g. http://127.0.0.1:8000/v1; default: run the model in this process")
    chat.add_argument("--api-key", help="the server's API key (default: $LMSERVE_API_KEY, $OPENAI_API_KEY)")
    chat.add_argument("--model", default=None, help="checkpoint directory, .gguf file, or model id on the server "
                                                    f"(default: {DEFAULT_MODEL_ID}, or the server's first model)")
    chat.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                      help="compute dtype (in-process only)")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-tokens", type=positive_int, default=512)
    chat.add_argument("--temperature", type=number, default=0.7)
    chat.add_argument("--top-p", type=number, default=0.7)
    chat.add_argument("--frequency-penalty", type=number, default=0.5)
    chat.set_defaults(func=run)


class LocalChat:
    """The engine in this process, stepped here: each step's new text is printed at once."""

    def __init__(self, args: argparse.Namespace):
        from lmserve.engine.llm_engine import LLMEngine
        from lmserve.sampling_params import SamplingParams

        self.engine = LLMEngine(args.model or DEFAULT_MODEL_ID, args.dtype)
        self.params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                     frequency_penalty=args.frequency_penalty)
        self.ids = itertools.count()
        self.name = args.model or DEFAULT_MODEL_ID

    def reply(self, messages: list[dict]) -> Iterator[str]:
        from lmserve.chat.prompt import render_chat

        text = render_chat(self.engine.tokenizer, messages)
        prompt = self.engine.encode(text, add_special_tokens=False)
        room = self.engine.max_seq_len - len(prompt)
        if room < 1:
            raise ValueError(f"the conversation ({len(prompt)} tokens) no longer fits the context; /reset")
        params = self.params
        if params.max_tokens > room:
            from dataclasses import replace

            params = replace(params, max_tokens=room)
        request_id = f"chat-{next(self.ids)}"
        self.engine.add_request(request_id, prompt, params)
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    for o in out.outputs:
                        if o.text:
                            yield o.text
        finally:  # Ctrl-C (or any error) mid-reply: free the request's KV blocks
            self.engine.abort_request(request_id)


class RemoteChat:
    """A server's /chat/completions, streamed (SSE)."""

    def __init__(self, args: argparse.Namespace):
        import httpx

        self.base = args.url.rstrip("/")
        key = args.api_key or os.environ.get("LMSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.http = httpx.Client(headers={"Authorization": f"Bearer {key}"} if key else {},
                                 timeout=httpx.Timeout(600.0, connect=10.0))
        self.name = args.model or self._first_model()
        self.body = {"model": self.name, "max_tokens": args.max_tokens, "temperature": args.temperature,
                     "top_p": args.top_p, "frequency_penalty": args.frequency_penalty, "stream": True}

    def _first_model(self) -> str:
        r = self.http.get(f"{self.base}/models")
        if r.status_code != 200:
            raise ValueError(f"{self.base}/models answered {r.status_code}: {_error_message(r.text)}")
        data = r.json().get("data") or []
        if not data:
            raise ValueError(f"{self.base} serves no models")
        return data[0]["id"]

    def reply(self, messages: list[dict]) -> Iterator[str]:
        with self.http.stream("POST", f"{self.base}/chat/completions", json={**self.body, "messages": messages}) as r:
            if r.status_code != 200:
                raise ValueError(f"the server answered {r.status_code}: {_error_message(r.read().decode())}")
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ValueError(_error_message(data))
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


def read_message(prompt: str = "you> ") -> str | None:
    """One message from the user; None at end of input. Ctrl-C at the prompt clears the line."""
    lines: list[str] = []
    block = False
    while True:
        line = input(prompt if not lines and not block else "...> ")
        if line.strip() == '"""':
            if block:
                return "\n".join(lines)
            block = True
            continue
        if not block and line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        if not block:
            return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    where = args.url or "this process"
    print(f"loading {args.model or DEFAULT_MODEL_ID} ..." if not args.url else f"connecting to {where} ...",
          file=sys.stderr, flush=True)
    try:
        session = RemoteChat(args) if args.url else LocalChat(args)
    except KeyboardInterrupt:
        print("\nlmserve chat: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bad path, an unreachable server: one line
        print(f"lmserve chat: {e}", file=sys.stderr)
        return 2
    print(f"chatting with {session.name}; {HELP}", file=sys.stderr, flush=True)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    while True:
        try:
            message = read_message()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)  # Ctrl-C at the prompt: a fresh prompt
            continue
        command = message.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr, flush=True)
            continue
        if command in ("/help", "/?"):
            print(HELP, file=sys.stderr, flush=True)
            continue
        history.append({"role": "user", "content": message})
        reply = ""
        stopped = False
        try:
            for piece in session.reply(system + history):
                reply += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stopped = True
        except Exception as e:
            print(f"\n(error: {e})", file=sys.stderr, flush=True)
            history.pop()
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stopped:
            print("(stopped)", file=sys.stderr, flush=True)
        history.append({"role": "assistant", "content": reply})
