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

from lmserve.chat.tool_parsers.base import MarkedCallsStream, make_call

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


class HermesToolCallStream(MarkedCallsStream):
    opener = OPEN

    def parse_calls(self, held: str):
        calls = []
        for block in _BLOCK.finditer(held):
            try:
                call = make_call(json.loads(block.group(1).strip()), self.plan, len(calls))
            except ValueError:
                call = None
            if call is None:
                return None  # one malformed block: the whole reply is content
            calls.append(call)
        if not calls:
            return None
        return _BLOCK.sub("", held).strip(), calls
