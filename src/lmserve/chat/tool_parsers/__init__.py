"""Reading tool calls out of a model's reply, one module per output format.

Each family names its format (`tool_call_format` in chat/formats.py); a forced call (tool_choice
"required" or a named function) is grammar-constrained to the plain JSON object, so it always
uses the JSON reader. Unknown formats fall back to JSON.
"""

from __future__ import annotations

from lmserve.chat.tool_parsers.base import ToolCallStream
from lmserve.chat.tool_parsers.deepseek_v2 import DeepseekV2ToolCallStream
from lmserve.chat.tool_parsers.glm4 import Glm4ToolCallStream
from lmserve.chat.tool_parsers.hermes import HermesToolCallStream
from lmserve.chat.tool_parsers.internlm2 import InternLM2ToolCallStream
from lmserve.chat.tool_parsers.json_object import JsonToolCallStream

_FORMATS: dict[str, type[ToolCallStream]] = {
    "json": JsonToolCallStream,
    "hermes": HermesToolCallStream,
    "glm4": Glm4ToolCallStream,  # GLM-4 and ChatGLM3: name line, then the arguments
    "internlm2": InternLM2ToolCallStream,
    "deepseek_v2": DeepseekV2ToolCallStream,
}


def tool_call_stream(fmt: str, plan) -> ToolCallStream:
    """A reader for one choice's text (it keeps state across the stream)."""
    if plan.forced:
        return JsonToolCallStream(plan)
    return _FORMATS.get(fmt, JsonToolCallStream)(plan)


__all__ = ["ToolCallStream", "tool_call_stream"]
