"""Tool calls and response formats: what to constrain and how to prompt.

With tool_choice "required" or a named function the output is constrained by grammar to exactly
one JSON object {"name": <function>, "arguments": {...}}, so it always parses; with "auto" the
model decides, and the family's own call format is read from its reply (chat/tool_parsers).
Templates that know tools get them through `tools=`; for the others the functions are described
in a system message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lmserve.chat.schemas import ChatCompletionRequest
from lmserve.errors import InvalidParameter
from lmserve.sampling_params import StructuredOutput


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]]  # as the chat template takes them
    names: set[str]
    forced: bool  # the output must be a call (grammar-constrained); else the model decides


def plan_tools(req: ChatCompletionRequest) -> ToolPlan | None:
    if not req.tools or req.tool_choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    names = {t.function.name for t in req.tools}
    choice = req.tool_choice or "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise InvalidParameter("tool_choice", "tool_choice must be none, auto, required or "
                                   "{\"type\": \"function\", \"function\": {\"name\": <one of the tools>}}")
        return ToolPlan([t for t in tools if t["function"]["name"] == name], {name}, forced=True)
    return ToolPlan(tools, names, forced=choice == "required")


def output_constraint(req: ChatCompletionRequest, plan: ToolPlan | None) -> StructuredOutput | None:
    if plan is not None and plan.forced:
        return StructuredOutput.json_schema(_calls_schema(plan.tools))
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput("json_object")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidParameter("response_format", "response_format json_schema needs "
                                                  "{\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
    return StructuredOutput.json_schema(fmt.json_schema.schema_)


def _calls_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    options = [{"type": "object",
                "properties": {"name": {"const": t["function"]["name"]},
                               "arguments": t["function"].get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def template_messages(messages: list[dict], plan: ToolPlan | None, template: str) -> tuple[list[dict], dict]:
    """Messages and extra template arguments: `tools=` where the template renders tools, else a
    system message that describes them."""
    if plan is None:
        return messages, {}
    if "tools" in (template or ""):
        return messages, {"tools": plan.tools}
    described = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in plan.tools)
    instruction = ("You can call these functions:\n" + described + "\nTo call one, reply with only a JSON object "
                   "{\"name\": <function name>, \"arguments\": <arguments object>}.")
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + instruction}
        return [first, *messages[1:]], {}
    return [{"role": "system", "content": instruction}, *messages], {}
