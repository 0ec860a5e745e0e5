"""The generic format: the whole reply is one JSON object {"name": ..., "arguments": {...}}.

Forced calls are grammar-constrained to exactly this; with "auto" the reply is held back while
it may still become such an object (empty, or starting with "{") and streamed once it cannot.
"""

from __future__ import annotations

from lmserve.chat.tool_parsers.base import ToolCallStream, may_be_call, parse_json_call

__all__ = ["JsonToolCallStream", "may_be_call", "parse_json_call"]


class JsonToolCallStream(ToolCallStream):
    def __init__(self, plan):
        super().__init__(plan)
        self.held = ""
        self.streaming = False

    def feed(self, text: str) -> str:
        if self.streaming:
            return text
        self.held += text
        if not self.plan.forced and not may_be_call(self.held):
            self.streaming = True  # plain text after all: release what was held
            out, self.held = self.held, ""
            return out
        return ""

    def finish(self, complete: bool):
        held, self.held = self.held, ""
        call = parse_json_call(held, self.plan) if complete and held else None
        return ("", [call]) if call is not None else (held, [])
