"""`lmserve chat` in a pseudo-terminal, talking to the suite's running server (--url): replies
stream token by token, Ctrl-C stops a reply and returns to the prompt, history, /reset, /exit,
multi-line input."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time

import pytest

from .conftest import API_KEY, MODEL


class Terminal:
    def __init__(self, argv: list[str], env: dict):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the CLI on the pty as its controlling terminal
            # Ctrl-C as in a terminal a user opened: a suite started in the background (`cmd &` in
            # a script) ignores SIGINT, exec keeps that, and Python then installs no handler
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execvpe(argv[0], argv, env)
        self.out = ""

    def read_until(self, needle: str, timeout: float = 120.0, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.out[start:]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{needle!r} not seen within {timeout}s; terminal so far:\n{self.out}")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"terminal closed before {needle!r}:\n{self.out}")
                self.out += data.decode("utf-8", "replace")
        return self.out

    def read_more(self, enough, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while not enough(self.out):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"not enough output within {timeout}s:\n{self.out}")
            if select.select([self.fd], [], [], remaining)[0]:
                self.out += os.read(self.fd, 4096).decode("utf-8", "replace")
        return self.out

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # drain, so the child never blocks on a full pty
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.out += os.read(self.fd, 4096).decode("utf-8", "replace")
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        raise AssertionError(f"lmserve chat did not exit:\n{self.out}")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture
def terminal(server):
    env = dict(os.environ, LMSERVE_API_KEY=API_KEY, PYTHONUNBUFFERED="1", TERM="dumb")
    t = Terminal([sys.executable, "-m", "lmserve", "chat", "--url", server.base_url, "--model", MODEL,
                  "--temperature", "0", "--max-tokens", "60"], env)
    yield t
    t.close()


def _chat_log_lines(server) -> list[str]:
    """The server's lines for answered chat requests (a reply stopped by Ctrl-C logs 499, and
    may be logged late)."""
    return [line for line in server.output().splitlines() if "POST /v1/chat/completions 200 " in line]


def _next_prompt_tokens(server, seen: int) -> int:
    """prompt_tokens of the first request logged after the first `seen` lines. The request line
    is written once the response is over, which can come after the terminal shows the reply."""
    deadline = time.monotonic() + 15
    while len(lines := _chat_log_lines(server)) <= seen:
        assert time.monotonic() < deadline, "the server never logged the request"
        time.sleep(0.05)
    return int(lines[seen].split("prompt_tokens=")[1].split()[0])


def test_chat_streams_stops_keeps_history_and_exits(terminal, server):
    t = terminal
    t.read_until("you> ")
    assert f"chatting with {MODEL}" in t.out

    # A long reply: its text shows up while it is still being written; Ctrl-C then stops it.
    ask = "Write a very long story about a dragon who learns to cook."
    t.send(ask + "\n")
    start = t.read_until(ask).index(ask) + len(ask)
    t.read_more(lambda out: len(out[start:].strip()) >= 40)
    assert "you> " not in t.out[start:]  # still writing
    t.send("\x03")
    t.read_until("(stopped)", start=start)
    t.read_until("you> ", start=start)

    # Multi-line input between triple quotes, sent with the conversation so far.
    mark, seen = len(t.out), len(_chat_log_lines(server))
    t.send('"""\nMy name is Ada.\nRemember it.\n"""\n')
    t.read_until("you> ", start=mark + 5)
    with_history = _next_prompt_tokens(server, seen)
    assert with_history > 60

    t.send("/reset\n")
    t.read_until("(conversation cleared)")
    mark, seen = len(t.out), len(_chat_log_lines(server))
    t.send("Hi\n")
    t.read_until("you> ", start=mark + 3)
    assert _next_prompt_tokens(server, seen) < 40

    t.send("/exit\n")
    assert t.wait() == 0
