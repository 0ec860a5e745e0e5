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

from lmserve.chat.tool_parsers.base import MarkedCallsStream, make_call

OPEN, PLUGIN, CLOSE = "<|action_start|>", "<|plugin|>", "<|action_end|>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


class InternLM2ToolCallStream(MarkedCallsStream):
    opener = OPEN

    def parse_calls(self, held: str):
        calls = []
        for block in _BLOCK.finditer(held):
            body = block.group(1).strip()
            if not body.startswith(PLUGIN):
                return None
            try:
                call = make_call(json.loads(body[len(PLUGIN):].strip()), self.plan, len(calls))
            except ValueError:
                call = None
            if call is None:
                return None
            calls.append(call)
        if not calls or _BLOCK.sub("", held).strip():
            return None  # text after the first block that is not a block: not a clean call
        return "", calls
