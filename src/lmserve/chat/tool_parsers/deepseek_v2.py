"""DeepSeek-V2.5 calls (also DeepSeek-Coder-V2-Instruct-0724): after optional prose, one section

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

as the checkpoint's chat template writes past calls (calls separated by a newline; the reply then
ends with end of sentence). Text streams until the section opens (a trailing piece that could be
the start of the opening marker waits for the next token); from there on the rest is held and
read when the reply ends. Any malformed call (unknown function, arguments that are not a JSON
object, stray text inside the section) makes the whole held text plain content.

DeepSeek-V2-Chat and Coder-V2-Instruct have no tool format (their templates render no tools):
they are asked, as every such model is, to reply with one JSON object {"name", "arguments"}. So
a reply that starts with "{" is read as that object, as the JSON reader does.
"""

from __future__ import annotations

import json
import re

from lmserve.chat.tool_parsers.base import MarkedCallsStream, make_call

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
# The markers the model must be able to write: kept in decoded text even where the tokenizer
# flags them special (chat/formats.py, DEEPSEEK_V2.tool_call_tokens).
MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)

_CALL = re.compile(re.escape(CALL_BEGIN) + r"(.*?)" + re.escape(CALL_END), re.DOTALL)
# function<｜tool▁sep｜>NAME\n```json\nARGS\n```  (the fence's language tag is optional)
_BODY = re.compile(r"\s*(\w+)" + re.escape(SEP) + r"([^\n]+)\n```[a-z]*\n(.*?)\n?```\s*", re.DOTALL)


def parse_calls(section: str, plan) -> list[dict] | None:
    """The calls of a section (the text after CALLS_BEGIN), or None if anything is malformed."""
    body, _, _ = section.partition(CALLS_END)
    calls: list[dict] = []
    for block in _CALL.finditer(body):
        match = _BODY.fullmatch(block.group(1))
        if match is None or match.group(1) != "function":
            return None
        try:
            args = json.loads(match.group(3))
        except ValueError:
            return None
        call = make_call({"name": match.group(2).strip(), "arguments": args}, plan, len(calls))
        if call is None or not isinstance(args, dict):
            return None
        calls.append(call)
    if not calls or _CALL.sub("", body).strip():
        return None  # no call, or text between the calls that is not one
    return calls


class DeepseekV2ToolCallStream(MarkedCallsStream):
    opener = CALLS_BEGIN

    def parse_calls(self, held: str):
        section = held[len(CALLS_BEGIN):]
        calls = parse_calls(section, self.plan)
        if calls is None:
            return None
        _, _, after = section.partition(CALLS_END)
        return after.strip(), calls
