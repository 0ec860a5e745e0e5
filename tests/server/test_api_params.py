"""Request validation: every field of API.md's request table, in range (accepted) and out of range
(400, type invalid_request_error, `param` naming the field), over raw HTTP and through the SDK."""

from __future__ import annotations

import asyncio

import openai
import pytest

from .conftest import ALL_MODELS

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PRO_MODEL = "Pro/HuggingFaceTB/SmolLM2-135M-Instruct"
PRO_MAX_MODEL_LEN = 256
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
BASE = {"model": MODEL, "messages": FRANCE, "max_tokens": 2}


BAD = [
    # (field, bad value)
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", "many"),
    ("max_tokens", 2.5),
    ("stop", ["a", "b", "c", "d", "e"]),
    ("stop", 7),
    ("temperature", -0.1),
    ("temperature", 2.01),
    ("temperature", "hot"),
    ("top_p", 0),
    ("top_p", -0.5),
    ("top_p", 1.01),
    ("top_k", -2),
    ("top_k", 1.5),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("frequency_penalty", -2.01),
    ("frequency_penalty", 2.01),
    ("presence_penalty", -2.01),
    ("presence_penalty", 2.01),
    ("n", 0),
    ("n", 17),
    ("n", -1),
    ("top_logprobs", -1),
    ("top_logprobs", 21),
    ("logprobs", "maybe"),
    ("stream", "sometimes"),
    ("seed", "abc"),
    ("stream_options", "yes"),
    ("messages", []),
    ("messages", "hello"),
    ("messages", [{"role": "robot", "content": "hi"}]),
    ("messages", [{"role": "user"}]),
    ("messages", [{"role": "user", "content": None}]),
    ("messages", [{"role": "system", "content": "Be brief."}, {"role": "user"}]),
    ("messages", [{"content": "hi"}]),
    ("messages", [{"role": "user", "content": 42}]),
    ("messages", [{"role": "user", "content": [{"type": "text"}]}]),
    ("messages", ["just a string"]),
    ("model", 123),
]


def _param_matches(param: str | None, field: str) -> bool:
    """The field itself, or a path inside it (messages[0].role / messages.0.role)."""
    if param == field:
        return True
    return param is not None and field == "messages" and param.startswith(("messages.", "messages["))


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}"[:40] for f, v in BAD])
def test_bad_value_is_400_naming_param(api, checks, field, value):
    r = api.chat(dict(BASE, **{field: value}))
    body = checks.error_body(r, 400, "invalid_request_error")
    assert _param_matches(body["error"]["param"], field), body


@pytest.mark.parametrize("field", ["model", "messages"])
def test_missing_required_field_is_400(api, checks, field):
    body = {k: v for k, v in BASE.items() if k != field}
    err = checks.error_body(api.chat(body), 400, "invalid_request_error")
    assert err["error"]["param"] == field, err


GOOD = [
    ("max_tokens", 1),
    ("stop", "x"),
    ("stop", ["a", "b", "c", "d"]),
    ("stop", []),
    ("stop", None),
    ("temperature", 0),
    ("temperature", 2),
    ("temperature", 0.3),
    ("top_p", 1),
    ("top_p", 0.01),
    ("top_k", 0),
    ("top_k", -1),
    ("top_k", 1),
    ("min_p", 0),
    ("min_p", 1),
    ("min_p", 0.5),
    ("frequency_penalty", -2),
    ("frequency_penalty", 2),
    ("presence_penalty", -2),
    ("presence_penalty", 2),
    ("n", 1),
    ("n", 2),
    ("seed", 0),
    ("seed", 2**31),
    ("logprobs", False),
    ("top_logprobs", 0),
    ("stream", False),
    ("stream_options", None),
    ("response_format", {"type": "text"}),
]


@pytest.mark.parametrize("field,value", GOOD, ids=[f"{f}={v!r}"[:40] for f, v in GOOD])
def test_in_range_value_accepted(api, field, value):
    body = api.chat_ok(dict(BASE, **{field: value}))
    n = value if field == "n" else 1
    assert len(body["choices"]) == n
    assert body["usage"]["completion_tokens"] >= n


def test_top_logprobs_20_accepted(api):
    body = api.chat_ok(dict(BASE, logprobs=True, top_logprobs=20, max_tokens=1))
    assert len(body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20


def test_not_a_json_object_is_400(api, checks):
    for raw in (b"[1, 2, 3]", b"\"a string\"", b"null", b"42"):
        r = api.http.post("/v1/chat/completions", content=raw,
                          headers=api.headers(**{"content-type": "application/json"}))
        checks.error_body(r, 400, "invalid_request_error")


def test_malformed_json_is_400(api, checks):
    r = api.http.post("/v1/chat/completions", content=b"{\"model\": \"x\", \"messages\": [",
                      headers=api.headers(**{"content-type": "application/json"}))
    checks.error_body(r, 400, "invalid_request_error")


def test_unknown_model_is_400_20012(api, checks):
    r = api.chat(dict(BASE, model="no-such-org/no-such-model"))
    body = checks.error_body(r, 400, "invalid_request_error", param="model")
    assert body["code"] == 20012, body
    assert "Model does not exist" in body["message"], body
    assert "Model does not exist" in body["error"]["message"], body
    # the ids this key may use, so a typo is seen at once (the shape stays the platform's)
    assert body["message"].endswith(f"Deployed models: {', '.join(ALL_MODELS)}"), body


def test_unknown_model_with_pro_prefix_is_400_20012(api, checks):
    r = api.chat(dict(BASE, model="Pro/no-such-org/no-such-model"))
    assert checks.error_body(r, 400, "invalid_request_error", param="model")["code"] == 20012


def test_prompt_plus_max_tokens_over_context_is_400(api, checks, count_prompt_tokens):
    p = count_prompt_tokens(FRANCE)
    r = api.chat({"model": PRO_MODEL, "messages": FRANCE, "max_tokens": PRO_MAX_MODEL_LEN - p + 1})
    checks.error_body(r, 400, "invalid_request_error")


def test_prompt_alone_over_context_is_400(api, checks):
    long = "word " * 600
    r = api.chat({"model": PRO_MODEL, "messages": [{"role": "user", "content": long}], "max_tokens": 1})
    checks.error_body(r, 400, "invalid_request_error")
    # no max_tokens at all: the prompt alone does not fit, still 400 (not a 200 with nothing generated)
    r = api.chat({"model": PRO_MODEL, "messages": [{"role": "user", "content": long}]})
    checks.error_body(r, 400, "invalid_request_error")


def test_huge_max_tokens_on_default_model_is_400(api, checks):
    r = api.chat(dict(BASE, max_tokens=10_000_000))
    checks.error_body(r, 400, "invalid_request_error")


# --- through the SDK ---------------------------------------------------------------------------


def test_sdk_bad_request_error_sets_param(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2, temperature=5)
    e = ei.value
    assert e.status_code == 400
    assert e.param == "temperature"
    assert e.type == "invalid_request_error"
    assert "temperature" in e.message
    assert e.request_id and e.request_id == e.response.headers["x-siliconcloud-trace-id"]


def test_sdk_unknown_model(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="nope/nope", messages=FRANCE, max_tokens=2)
    assert ei.value.param == "model"
    assert "Model does not exist" in ei.value.message
    assert ei.value.response.json()["code"] == 20012


def test_sdk_empty_messages(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert ei.value.param == "messages"


def test_sdk_async_bad_request(make_async_client):
    async def main():
        async with make_async_client() as ac:
            with pytest.raises(openai.BadRequestError) as ei:
                await ac.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2, n=99)
            return ei.value

    e = asyncio.run(main())
    assert e.param == "n"
    assert e.message


def test_sdk_stream_bad_request_raises_before_streaming(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2, top_p=0, stream=True)
    assert ei.value.param == "top_p"
