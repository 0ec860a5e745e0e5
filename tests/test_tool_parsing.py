"""Reading tool calls out of model text, and prompting templates that know no tools."""

from __future__ import annotations

import json

import pytest

from lmserve.chat.schemas import parse_chat_request
from lmserve.chat.tools import may_be_call, output_constraint, parse_tool_call, plan_tools, template_messages
from lmserve.errors import InvalidParameter
from lmserve.server.app import as_api_error

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _req(**extra):
    return parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [TOOL], **extra})


def test_auto_call_parsing():
    plan = plan_tools(_req())
    assert not plan.forced
    call = parse_tool_call('{"name": "get_weather", "arguments": {"city": "Paris"}}', plan)
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert call["id"].startswith("call_") and call["type"] == "function"
    # Llama 3.1 writes "parameters"
    assert parse_tool_call('{"name": "get_weather", "parameters": {"city": "Rome"}}', plan) is not None
    for text in ('{"name": "other", "arguments": {}}', '{"name": "get_weather", "arguments": 3}',
                 "It is sunny.", '{"name": "get_weather"'):
        assert parse_tool_call(text, plan) is None, text


def test_hold_back_only_while_it_may_be_a_call():
    assert may_be_call("") and may_be_call("  {\"na") and not may_be_call("The weather")


def test_forced_choice_builds_a_call_schema():
    plan = plan_tools(_req(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    spec = output_constraint(_req(), plan)
    schema = json.loads(spec.schema)
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"] == TOOL["function"]["parameters"]
    assert plan_tools(_req(tool_choice="none")) is None


def test_unknown_named_function_is_400():
    with pytest.raises(InvalidParameter) as e:
        plan_tools(_req(tool_choice={"type": "function", "function": {"name": "nope"}}))
    err = as_api_error(e.value)
    assert err.status == 400 and err.param == "tool_choice"


def test_templates_without_tools_get_a_system_message():
    plan = plan_tools(_req())
    msgs, kwargs = template_messages([{"role": "user", "content": "hi"}], plan, "{{ messages }}")
    assert kwargs == {} and msgs[0]["role"] == "system" and "get_weather" in msgs[0]["content"]
    msgs, kwargs = template_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                                     plan, "{{ messages }}")
    assert len(msgs) == 2 and msgs[0]["content"].startswith("Be brief.")
    msgs, kwargs = template_messages([{"role": "user", "content": "hi"}], plan, "{% if tools %}{{ tools }}{% endif %}")
    assert kwargs == {"tools": plan.tools} and len(msgs) == 1
