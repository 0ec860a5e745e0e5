"""GLM-4 and ChatGLM3 calls: right after `<|assistant|>` the model writes the function name on
its own line, then the arguments, and stops on `<|observation|>`:

    get_weather
    {"city": "Paris"}

GLM-4 writes the arguments as JSON (several calls follow one another, each after its own
`<|assistant|>`, which decoding drops); ChatGLM3 writes a python block
```python\\ntool_call(city="Paris")\\n``` whose keyword values are read as literals (never run).
The reply streams as content as soon as its first line cannot be a known function's name; a
reply whose first line names one is held and read when it ends. Anything malformed is content.
"""

from __future__ import annotations

import ast
import json
import re

from lmserve.chat.tool_parsers.base import ToolCallStream, make_call

_PYTHON_BLOCK = re.compile(r"\s*```(?:python)?\s*\n(.*?)\n?```\s*", re.DOTALL)


def _python_arguments(code: str) -> dict | None:
    """`tool_call(a=1, b="x")` -> {"a": 1, "b": "x"}: literals only, nothing is evaluated."""
    try:
        node = ast.parse(code.strip(), mode="eval").body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
            return None
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None


def parse_calls(text: str, plan) -> list[dict] | None:
    """Every `name\\n<arguments>` call in the reply, or None when any part is not one."""
    calls: list[dict] = []
    rest = text.lstrip()
    decoder = json.JSONDecoder()
    while rest:
        if "\n" not in rest:
            return None
        name, rest = rest.split("\n", 1)
        block = _PYTHON_BLOCK.match(rest)
        if block:
            args, rest = _python_arguments(block.group(1)), rest[block.end():]
        else:
            try:
                args, end = decoder.raw_decode(rest.lstrip())
            except ValueError:
                return None
            rest = rest.lstrip()[end:]
        call = make_call({"name": name.strip(), "arguments": args}, plan, len(calls)) if args is not None else None
        if call is None:
            return None
        calls.append(call)
        rest = rest.lstrip()
    return calls or None


class Glm4ToolCallStream(ToolCallStream):
    def __init__(self, plan):
        super().__init__(plan)
        self.held = ""
        self.mode = "undecided"  # then "content" or "call"

    def _may_be_name(self, first_line: str) -> bool:
        stripped = first_line.strip()
        return any(name.startswith(stripped) for name in self.plan.names)

    def feed(self, text: str) -> str:
        if self.mode == "content":
            return text
        self.held += text
        if self.mode == "call":
            return ""
        first, newline, _ = self.held.partition("\n")
        if newline and first.strip() in self.plan.names:
            self.mode = "call"
            return ""
        if newline or not self._may_be_name(first):
            self.mode = "content"
            out, self.held = self.held, ""
            return out
        return ""

    def finish(self, complete: bool):
        held, self.held = self.held, ""
        if self.mode != "call" or not complete:
            return held, []
        calls = parse_calls(held, self.plan)
        return ("", calls) if calls else (held, [])
