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
