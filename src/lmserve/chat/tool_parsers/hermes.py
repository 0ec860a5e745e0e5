"""Hermes-style calls (Qwen2.5, TeleChat2): any number of blocks

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

possibly after some prose. Text streams until a block opens (a trailing piece that could be the
start of "<tool_call>" waits for the next token); from the first block on, the rest is held and
read when the reply ends. Text around the blocks stays content.
"""

from __future__ import annotations

import json
import re

from lmserve.chat.tool_parsers.base import ToolCallStream, make_call

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


def _partial_open(text: str) -> int:
    """Length of the longest end of `text` that is a proper start of OPEN."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


class HermesToolCallStream(ToolCallStream):
    def __init__(self, plan):
        super().__init__(plan)
        self.held = ""
        self.in_calls = False

    def feed(self, text: str) -> str:
        self.held += text
        if self.in_calls:
            return ""
        start = self.held.find(OPEN)
        if start >= 0:
            self.in_calls = True
            out, self.held = self.held[:start], self.held[start:]
            return out
        keep = _partial_open(self.held)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def finish(self, complete: bool):
        held, self.held = self.held, ""
        if not (self.in_calls and complete):
            return held, []
        calls = []
        for block in _BLOCK.finditer(held):
            try:
                call = make_call(json.loads(block.group(1).strip()), self.plan, len(calls))
            except ValueError:
                call = None
            if call is None:
                return held, []  # one malformed block: the whole reply is content
            calls.append(call)
        if not calls:
            return held, []
        content = _BLOCK.sub("", held).strip()
        return content, calls
