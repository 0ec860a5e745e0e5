"""Reading tool calls out of model text, and prompting templates that know no tools."""

from __future__ import annotations

import json

import pytest

from lmserve.chat.schemas import parse_chat_request
from lmserve.chat.tool_parsers import tool_call_stream
from lmserve.chat.tool_parsers.json_object import may_be_call
from lmserve.chat.tool_parsers.json_object import parse_json_call as parse_tool_call
from lmserve.chat.tools import output_constraint, plan_tools, template_messages
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


def _stream(fmt: str, pieces: list[str], plan, complete: bool = True):
    """Feed a reply piece by piece as the engine streams it: (streamed text, calls at the end)."""
    reader = tool_call_stream(fmt, plan)
    streamed = [reader.feed(p) for p in pieces]
    rest, calls = reader.finish(complete)
    return streamed, rest, calls


def test_hermes_calls_after_prose_stream_the_prose_and_parse_every_block():
    plan = plan_tools(_req())
    pieces = ["Let me ", "check.", "\n<tool", "_call>\n{\"name\": \"get_weather\", ",
              "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n",
              "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>"]
    streamed, rest, calls = _stream("hermes", pieces, plan)
    # Prose streams at once; "<tool" waits until it turns out to open a block.
    assert streamed[:3] == ["Let me ", "check.", "\n"] and "".join(streamed) == "Let me check.\n"
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert [c["index"] for c in calls] == [0, 1] and rest == ""


def test_hermes_plain_text_streams_and_lookalikes_are_released():
    plan = plan_tools(_req())
    streamed, rest, calls = _stream("hermes", ["a <to", "ol> b"], plan)
    assert "".join(streamed) + rest == "a <tool> b" and calls == []


@pytest.mark.parametrize("reply", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',  # bad JSON
    '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',  # unknown function
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # never closed
])
def test_hermes_malformed_calls_come_back_as_content(reply):
    streamed, rest, calls = _stream("hermes", [reply], plan_tools(_req()))
    assert calls == [] and "".join(streamed) + rest == reply


def test_hermes_cut_by_max_tokens_is_content():
    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    streamed, rest, calls = _stream("hermes", [reply], plan_tools(_req()), complete=False)
    assert calls == [] and rest == reply


def test_forced_calls_use_the_json_reader_whatever_the_family():
    plan = plan_tools(_req(tool_choice="required"))
    streamed, rest, calls = _stream("hermes", ['{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}'], plan)
    assert streamed == ["", ""] and rest == "" and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}


def test_tool_call_arguments_reach_templates_as_objects():
    req = parse_chat_request({"model": "m", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "cold"}]})
    call = req.messages[1].for_template()["tool_calls"][0]
    assert call["function"]["arguments"] == {"city": "Oslo"}


def _args(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_glm4_name_line_then_json_arguments():
    plan = plan_tools(_req())
    streamed, rest, calls = _stream("glm4", ["get_", "weather", "\n{\"city\": ", "\"Paris\"}"], plan)
    assert streamed == ["", "", "", ""] and rest == ""
    assert _args(calls) == [("get_weather", {"city": "Paris"})]
    # Two calls in a row (decoding drops the <|assistant|> between them).
    _, rest, calls = _stream("glm4", ['get_weather\n{"city": "Paris"}get_weather\n{"city": "Rome"}'], plan)
    assert _args(calls) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]


def test_chatglm3_python_tool_call_is_read_as_literals():
    plan = plan_tools(_req())
    reply = 'get_weather\n ```python\ntool_call(city="Paris", days=2)\n```'
    streamed, rest, calls = _stream("glm4", [reply], plan)
    assert rest == "" and _args(calls) == [("get_weather", {"city": "Paris", "days": 2})]
    # Code that is not literal keyword arguments is never evaluated: the reply is content.
    reply = 'get_weather\n```python\ntool_call(city=__import__("os").getcwd())\n```'
    streamed, rest, calls = _stream("glm4", [reply], plan)
    assert calls == [] and "".join(streamed) + rest == reply


def test_glm4_prose_streams_once_the_first_line_is_no_function_name():
    plan = plan_tools(_req())
    streamed, rest, calls = _stream("glm4", ["get", " the forecast", " first.\nget_weather"], plan)
    assert streamed == ["", "get the forecast", " first.\nget_weather"] and calls == [] and rest == ""
    streamed, rest, calls = _stream("glm4", ["The weather", "\n"], plan)
    assert streamed == ["The weather", "\n"] and calls == []


@pytest.mark.parametrize("reply", [
    'get_weather\n{"city": "Paris"',  # bad JSON
    'get_weather\n{"city": "Paris"} and more',  # trailing prose
    "get_weather\n",  # no arguments
])
def test_glm4_malformed_calls_come_back_as_content(reply):
    streamed, rest, calls = _stream("glm4", [reply], plan_tools(_req()))
    assert calls == [] and "".join(streamed) + rest == reply


def test_internlm2_action_blocks_after_prose():
    plan = plan_tools(_req())
    pieces = ["I will check.", "<|action_", "start|><|plugin|>\n", '{"name": "get_weather", "parameters": ',
              '{"city": "Paris"}}<|action_end|>']
    streamed, rest, calls = _stream("internlm2", pieces, plan)
    assert "".join(streamed) == "I will check." and rest == ""
    assert _args(calls) == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("reply", [
    '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}<|action_end|>',
    '<|action_start|><|plugin|>\n{"name": "nope", "parameters": {}}<|action_end|>',
    "<|action_start|><|interpreter|>\n```python\nprint(1)\n```<|action_end|>",
])
def test_internlm2_malformed_or_interpreter_blocks_are_content(reply):
    streamed, rest, calls = _stream("internlm2", ["Sure. ", reply], plan_tools(_req()))
    assert calls == [] and "".join(streamed) + rest == "Sure. " + reply


# DeepSeek-V2.5: the section its chat template writes for past calls.
DS_CALL = ("<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{{\"city\": \"{}\"}}\n```"
           "<｜tool▁call▁end｜>")
DS_REPLY = "<｜tool▁calls▁begin｜>" + DS_CALL.format("Paris") + "\n" + DS_CALL.format("Rome") + "<｜tool▁calls▁end｜>"


def test_deepseek_v2_calls_after_prose_stream_the_prose_and_parse_every_call():
    plan = plan_tools(_req())
    pieces = ["Let me ", "check.", "\n<｜tool", "▁calls▁begin｜>", DS_REPLY[len("<｜tool▁calls▁begin｜>"):]]
    streamed, rest, calls = _stream("deepseek_v2", pieces, plan)
    # Prose streams at once; "<｜tool" waits until it turns out to open the section.
    assert streamed[:3] == ["Let me ", "check.", "\n"] and "".join(streamed) == "Let me check.\n"
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert [c["function"]["name"] for c in calls] == ["get_weather"] * 2
    assert [c["index"] for c in calls] == [0, 1] and rest == ""


def test_deepseek_v2_calls_streamed_token_by_token():
    plan = plan_tools(_req())
    pieces = [DS_REPLY[i:i + 3] for i in range(0, len(DS_REPLY), 3)]
    streamed, rest, calls = _stream("deepseek_v2", pieces, plan)
    assert "".join(streamed) == "" and rest == "" and len(calls) == 2


def test_deepseek_v2_plain_text_and_lookalikes_stream():
    plan = plan_tools(_req())
    streamed, rest, calls = _stream("deepseek_v2", ["a <｜to", "ol> b"], plan)
    assert "".join(streamed) + rest == "a <｜tool> b" and calls == []


@pytest.mark.parametrize("reply", [
    DS_REPLY.replace('"Paris"}', '"Paris"'),  # bad JSON
    DS_REPLY.replace("get_weather", "launch_rockets"),  # unknown function
    DS_REPLY.replace("```json\n", ""),  # no fenced arguments
    DS_REPLY.replace("function<｜tool▁sep｜>", "<｜tool▁sep｜>"),  # no call type
    DS_REPLY.replace("\n<｜tool▁call▁begin｜>", "\nand then <｜tool▁call▁begin｜>"),  # stray text between calls
    "<｜tool▁calls▁begin｜>" + DS_CALL.format("Paris")[:40],  # never closed
    "<｜tool▁calls▁begin｜><｜tool▁calls▁end｜>",  # no call
    "<｜tool▁calls▁begin｜>" + DS_CALL.format("Paris").replace('{"city": "Paris"}', '["Paris"]'),  # not an object
])
def test_deepseek_v2_malformed_calls_come_back_as_content(reply):
    streamed, rest, calls = _stream("deepseek_v2", [reply], plan_tools(_req()))
    assert calls == [] and "".join(streamed) + rest == reply


def test_deepseek_v2_without_the_closing_section_marker_and_cut_by_max_tokens():
    plan = plan_tools(_req())
    reply = "<｜tool▁calls▁begin｜>" + DS_CALL.format("Oslo")
    _, rest, calls = _stream("deepseek_v2", [reply], plan)
    assert rest == "" and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    _, rest, calls = _stream("deepseek_v2", [DS_REPLY], plan, complete=False)
    assert calls == [] and rest == DS_REPLY


def test_deepseek_v2_chat_replies_with_the_json_object_it_is_asked_for():
    """V2-Chat and Coder-V2 have no tool format: they get the JSON-object instruction."""
    plan = plan_tools(_req())
    pieces = [' {"name": "get_weather", ', '"arguments": {"city": "Oslo"}}']
    streamed, rest, calls = _stream("deepseek_v2", pieces, plan)
    assert "".join(streamed) == "" and rest == "" and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    streamed, rest, calls = _stream("deepseek_v2", ['{"name": "nope"', ", \"arguments\": {}}"], plan)
    assert calls == [] and "".join(streamed) + rest == '{"name": "nope", "arguments": {}}'
    streamed, rest, calls = _stream("deepseek_v2", ["Sunny ", "{today}"], plan)
    assert streamed == ["Sunny ", "{today}"] and calls == []


@pytest.mark.parametrize("fmt", ["hermes", "internlm2", "deepseek_v2"])
def test_marker_formats_also_read_a_reply_that_is_one_json_object_call(fmt):
    # What a model whose template renders no tools (Qwen2-Instruct) is asked to write.
    streamed, rest, calls = _stream(fmt, ['{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}'],
                                    plan_tools(_req()))
    assert streamed == ["", ""] and rest == "" and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    streamed, rest, calls = _stream(fmt, ['{"answer": ', '42}'], plan_tools(_req()))
    assert calls == [] and "".join(streamed) + rest == '{"answer": 42}'


def test_every_architecture_has_its_chat_format():
    """The chat-format registry covers exactly the architectures a model class is registered for,
    and the model classes no longer carry chat knowledge of their own."""
    from lmserve.chat.formats import architectures_with_formats, chat_format
    from lmserve.models.registry import get_model_class, supported_architectures

    assert architectures_with_formats() == supported_architectures()
    for arch in supported_architectures():
        cls = get_model_class(arch)
        assert not any(hasattr(cls, a) for a in ("end_of_turn_tokens", "tool_call_format", "tool_call_tokens")), arch
    assert chat_format("Qwen2MoeForCausalLM").tool_call_format == "hermes"
    assert "<｜tool▁sep｜>" in chat_format("DeepseekV2ForCausalLM").tool_call_tokens
    assert chat_format("NoSuchForCausalLM").tool_call_format == "json"
