"""response_format (grammar-constrained JSON) and tools (forced calls constrained by grammar,
"auto" calls parsed from the output)."""

from __future__ import annotations

import json

import jsonschema
import pytest

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PERSON = [{"role": "user", "content": "Give me a JSON object with the name and age of a fictional person."}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_Q = [{"role": "user", "content": "What's the weather in Paris right now?"}]


def _not_cut(choice) -> str:
    """The reply ended by itself (the schemas are bounded and max_tokens ample): the text is whole."""
    assert choice["finish_reason"] == "eos", choice
    return choice["message"]["content"]


# Bounded: short strings, a small integer range, no extra keys, so a whole object always fits.
PERSON_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                 "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 30},
                                "age": {"type": "integer", "minimum": 0, "maximum": 150}}}


def test_json_object(api):
    body = api.chat_ok({"model": MODEL, "messages": PERSON, "max_tokens": 200, "temperature": 0,
                        "response_format": {"type": "json_object"}})
    jsonschema.validate(json.loads(_not_cut(body["choices"][0])), {"type": "object"})


def test_json_schema(api):
    body = api.chat_ok({"model": MODEL, "messages": PERSON, "max_tokens": 200, "temperature": 0,
                        "response_format": {"type": "json_schema", "json_schema": {
                            "name": "person", "schema": PERSON_SCHEMA, "strict": True}}})
    jsonschema.validate(json.loads(_not_cut(body["choices"][0])), PERSON_SCHEMA)


def test_json_object_streamed_equals_non_streamed(api):
    req = {"model": MODEL, "messages": PERSON, "max_tokens": 200, "temperature": 0,
           "response_format": {"type": "json_object"}}
    text = _not_cut(api.chat_ok(req)["choices"][0])
    assert api.stream(req).content() == text


@pytest.mark.parametrize("fmt", [{"type": "bogus"}, {"type": "json_schema"}, "json", {"type": "json_schema",
                                                                                        "json_schema": {"schema": 5}}],
                         ids=["bogus-type", "schema-missing", "not-an-object", "schema-not-object"])
def test_bad_response_format_is_400(api, checks, fmt):
    r = api.chat({"model": MODEL, "messages": PERSON, "max_tokens": 2, "response_format": fmt})
    body = checks.error_body(r, 400, "invalid_request_error")
    assert str(body["error"]["param"]).startswith("response_format"), body


def test_sdk_json_object(client):
    resp = client.chat.completions.create(model=MODEL, messages=PERSON, max_tokens=200, temperature=0,
                                          response_format={"type": "json_object"})
    assert resp.choices[0].finish_reason == "eos"
    jsonschema.validate(json.loads(resp.choices[0].message.content), {"type": "object"})


# --- tools ------------------------------------------------------------------------------------


def _check_tool_calls(choice, names):
    calls = choice["message"].get("tool_calls")
    assert calls, choice
    for c in calls:
        assert c["type"] == "function"
        assert isinstance(c["id"], str) and c["id"]
        assert c["function"]["name"] in names
        assert isinstance(json.loads(c["function"]["arguments"]), dict)


def test_tools_auto(api):
    """"auto" (also the default with tools) lets the model choose: this greedy reply is prose, so it
    comes back as content with no call, the same with the choice implied or explicit. (A call in
    the output is parsed by the family parsers: tests/chat/test_tool_parsing.py.)"""
    req = {"model": MODEL, "messages": WEATHER_Q, "max_tokens": 64, "temperature": 0, "tools": [WEATHER_TOOL]}
    implied = api.chat_ok(req)["choices"][0]
    explicit = api.chat_ok(dict(req, tool_choice="auto"))["choices"][0]
    assert implied == explicit
    assert implied["finish_reason"] == "eos" and not implied["message"].get("tool_calls"), implied
    assert "Paris" in implied["message"]["content"]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_tools_forced(api, tool_choice):
    choice = api.chat_ok({"model": MODEL, "messages": WEATHER_Q, "max_tokens": 48, "temperature": 0,
                          "tools": [WEATHER_TOOL], "tool_choice": tool_choice})["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] is None
    _check_tool_calls(choice, {"get_weather"})


def test_tools_forced_streamed(api):
    sse = api.stream({"model": MODEL, "messages": WEATHER_Q, "max_tokens": 48, "temperature": 0,
                      "tools": [WEATHER_TOOL], "tool_choice": "required"})
    deltas = [c for chunk in sse.chunks for c in chunk["choices"]]
    calls = [call for d in deltas for call in d["delta"].get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    assert isinstance(json.loads(calls[0]["function"]["arguments"]), dict)
    assert sse.finish_reason() == "tool_calls"
    assert sse.content() == "", "a forced call is not streamed as text"


def test_tools_none(api):
    choice = api.chat_ok({"model": MODEL, "messages": WEATHER_Q, "max_tokens": 16, "temperature": 0,
                          "tools": [WEATHER_TOOL], "tool_choice": "none"})["choices"][0]
    assert choice["finish_reason"] != "tool_calls"
    assert not choice["message"].get("tool_calls")


@pytest.mark.parametrize("tools", [[{"type": "nope", "function": {"name": "f"}}], [{"type": "function"}], "x"],
                         ids=["bad-type", "no-function", "not-a-list"])
def test_bad_tools_is_400(api, checks, tools):
    r = api.chat({"model": MODEL, "messages": WEATHER_Q, "max_tokens": 2, "tools": tools})
    body = checks.error_body(r, 400, "invalid_request_error")
    assert str(body["error"]["param"]).startswith("tools"), body


def test_sdk_tools(client):
    resp = client.chat.completions.create(model=MODEL, messages=WEATHER_Q, max_tokens=48, temperature=0,
                                          tools=[WEATHER_TOOL], tool_choice="required")
    assert resp.choices[0].finish_reason == "tool_calls"
    assert resp.choices[0].message.tool_calls[0].function.name == "get_weather"
