"""response_format (grammar-constrained JSON) and tools (forced calls constrained by grammar,
"auto" calls parsed from the output)."""

from __future__ import annotations

import json

import pytest

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PERSON = [{"role": "user", "content": "Give me a JSON object with the name and age of a fictional person."}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_Q = [{"role": "user", "content": "What's the weather in Paris right now?"}]


def _unsupported(checks, r, params) -> bool:
    """The features are implemented: every such request must succeed (returns False to go on)."""
    assert r.status_code == 200, r.text
    return False


def test_json_object(api, checks):
    r = api.chat({"model": MODEL, "messages": PERSON, "max_tokens": 96, "temperature": 0,
                  "response_format": {"type": "json_object"}})
    if _unsupported(checks, r, ("response_format",)):
        return
    choice = r.json()["choices"][0]
    text = choice["message"]["content"]
    if choice["finish_reason"] == "length":
        assert text.lstrip().startswith("{"), text
        return
    assert isinstance(json.loads(text), dict), text


def _check_schema(value, schema):
    t = schema.get("type")
    if t == "object":
        assert isinstance(value, dict), value
        for k in schema.get("required", []):
            assert k in value, (k, value)
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                _check_schema(value[k], sub)
    elif t == "string":
        assert isinstance(value, str), value
    elif t == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), value


def test_json_schema(api, checks):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = api.chat({"model": MODEL, "messages": PERSON, "max_tokens": 64, "temperature": 0,
                  "response_format": {"type": "json_schema",
                                      "json_schema": {"name": "person", "schema": schema, "strict": True}}})
    if _unsupported(checks, r, ("response_format",)):
        return
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "length":
        assert choice["message"]["content"].lstrip().startswith("{")
        return
    value = json.loads(choice["message"]["content"])
    _check_schema(value, schema)
    assert set(value) <= {"name", "age"}


def test_json_object_streamed_equals_non_streamed(api, checks):
    req = {"model": MODEL, "messages": PERSON, "max_tokens": 48, "temperature": 0,
           "response_format": {"type": "json_object"}}
    r = api.chat(req)
    if _unsupported(checks, r, ("response_format",)):
        return
    assert api.stream(req).content() == r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("fmt", [{"type": "bogus"}, {"type": "json_schema"}, "json", {"type": "json_schema",
                                                                                        "json_schema": {"schema": 5}}],
                         ids=["bogus-type", "schema-missing", "not-an-object", "schema-not-object"])
def test_bad_response_format_is_400(api, checks, fmt):
    r = api.chat({"model": MODEL, "messages": PERSON, "max_tokens": 2, "response_format": fmt})
    body = checks.error_body(r, 400, "invalid_request_error")
    assert str(body["error"]["param"]).startswith("response_format"), body


def test_sdk_json_object(client):
    resp = client.chat.completions.create(model=MODEL, messages=PERSON, max_tokens=96, temperature=0,
                                          response_format={"type": "json_object"})
    if resp.choices[0].finish_reason != "length":
        assert isinstance(json.loads(resp.choices[0].message.content), dict)


# --- tools ------------------------------------------------------------------------------------


def _check_tool_calls(choice, names):
    calls = choice["message"].get("tool_calls")
    assert calls, choice
    for c in calls:
        assert c["type"] == "function"
        assert isinstance(c["id"], str) and c["id"]
        assert c["function"]["name"] in names
        assert isinstance(json.loads(c["function"]["arguments"]), dict)


@pytest.mark.parametrize("tool_choice", [None, "auto"])
def test_tools_auto(api, checks, tool_choice):
    req = {"model": MODEL, "messages": WEATHER_Q, "max_tokens": 48, "temperature": 0, "tools": [WEATHER_TOOL]}
    if tool_choice:
        req["tool_choice"] = tool_choice
    r = api.chat(req)
    if _unsupported(checks, r, ("tools", "tool_choice")):
        return
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] in ("tool_calls", "eos", "stop", "length"), choice
    if choice["finish_reason"] == "tool_calls":
        _check_tool_calls(choice, {"get_weather"})


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_tools_forced(api, checks, tool_choice):
    r = api.chat({"model": MODEL, "messages": WEATHER_Q, "max_tokens": 48, "temperature": 0,
                  "tools": [WEATHER_TOOL], "tool_choice": tool_choice})
    _unsupported(checks, r, ("tools", "tool_choice"))
    choice = r.json()["choices"][0]
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


def test_tools_none(api, checks):
    r = api.chat({"model": MODEL, "messages": WEATHER_Q, "max_tokens": 16, "temperature": 0,
                  "tools": [WEATHER_TOOL], "tool_choice": "none"})
    if _unsupported(checks, r, ("tools", "tool_choice")):
        return
    choice = r.json()["choices"][0]
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
