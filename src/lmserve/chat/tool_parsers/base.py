"""The shape every tool-call reader has: text in as it streams, content out as soon as it is
surely not part of a call, the calls at the end."""

from __future__ import annotations

import json
import uuid
from typing import Any


class ToolCallStream:
    def __init__(self, plan):
        self.plan = plan

    def feed(self, text: str) -> str:
        """Take the next piece of the reply; return the text that can be streamed now."""
        raise NotImplementedError

    def finish(self, complete: bool) -> tuple[str, list[dict[str, Any]]]:
        """The reply ended (`complete` False when cut by max_tokens): (the content still held
        back, the tool calls). Malformed calls come back as content, never as an error."""
        raise NotImplementedError


def make_call(value: Any, plan, index: int) -> dict[str, Any] | None:
    """An OpenAI tool_calls entry from a decoded {"name", "arguments"} object naming a known
    function, else None."""
    if not isinstance(value, dict) or value.get("name") not in plan.names:
        return None
    args = value.get("arguments", value.get("parameters", {}))  # Llama 3.1 says "parameters"
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_json_call(text: str, plan) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return make_call(value, plan, 0)


def may_be_call(text: str) -> bool:
    stripped = text.lstrip()
    return not stripped or stripped.startswith("{")


class MarkedCallsStream(ToolCallStream):
    """Formats where the calls begin at a marker, possibly after some prose (hermes'
    `<tool_call>`, InternLM2's `<|action_start|>`, DeepSeek's `<｜tool▁calls▁begin｜>`).

    Text streams until the marker appears; a trailing piece that could be the start of the
    marker waits for the next token. From the marker on, the rest is held and handed to
    `parse_calls` when the reply ends; a reply cut by max_tokens, or calls that do not parse,
    come back whole as content.

    A reply that is one JSON object {"name", "arguments"} is a call too: it is what a model is
    asked to write when its template renders no tools (Qwen2-Instruct, DeepSeek-V2-Chat), so
    while the reply so far may still be one it is held back, as the JSON reader does.
    """

    opener: str

    def __init__(self, plan):
        super().__init__(plan)
        self.held = ""
        self.in_calls = False
        self.maybe_json = True  # nothing but whitespace and "{..." so far

    def feed(self, text: str) -> str:
        self.held += text
        if self.in_calls:
            return ""
        if self.maybe_json:
            if may_be_call(self.held):
                return ""
            self.maybe_json = False
        return self._release()

    def _release(self) -> str:
        start = self.held.find(self.opener)
        if start >= 0:
            self.in_calls = True
            out, self.held = self.held[:start], self.held[start:]
            return out
        cut = len(self.held) - _partial_marker(self.held, self.opener)
        out, self.held = self.held[:cut], self.held[cut:]
        return out

    def finish(self, complete: bool):
        held, self.held = self.held, ""
        if self.maybe_json and complete and held.strip():
            call = parse_json_call(held.strip(), self.plan)
            return ("", [call]) if call is not None else (held, [])
        if not (self.in_calls and complete):
            return held, []
        parsed = self.parse_calls(held)
        return (held, []) if parsed is None else parsed

    def parse_calls(self, held: str) -> tuple[str, list[dict[str, Any]]] | None:
        """(content left around the calls, calls) from the text that starts at the marker, or
        None when anything in it is malformed."""
        raise NotImplementedError


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
