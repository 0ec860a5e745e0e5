"""InternLM2.5 calls: optional prose, then for each call

    <|action_start|><|plugin|>
    {"name": "get_weather", "parameters": {"city": "Paris"}}<|action_end|>

(the family's tokenizer keeps these action tokens in the decoded text). Text streams until an
action block opens (a trailing piece that could start `<|action_start|>` waits); from there the
rest is held and read when the reply ends. The prose stays content; a malformed block, or an
interpreter block (`<|interpreter|>`, code to run, not a function call), makes the whole reply
content.
"""

from __future__ import annotations

import json
import re

from lmserve.chat.tool_parsers.base import ToolCallStream, make_call

OPEN, PLUGIN, CLOSE = "<|action_start|>", "<|plugin|>", "<|action_end|>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


def _partial_open(text: str) -> int:
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


class InternLM2ToolCallStream(ToolCallStream):
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
            body = block.group(1).strip()
            if not body.startswith(PLUGIN):
                return held, []
            try:
                call = make_call(json.loads(body[len(PLUGIN):].strip()), self.plan, len(calls))
            except ValueError:
                call = None
            if call is None:
                return held, []
            calls.append(call)
        if not calls or _BLOCK.sub("", held).strip():
            return held, []  # text after the first block that is not a block: not a clean call
        return "", calls
