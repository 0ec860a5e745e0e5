"""The error table (401, 404, 413, 400, never a stack trace), the double error body, the SDK's
exception classes, and the trace-id headers on every response."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
BASE = {"model": MODEL, "messages": FRANCE, "max_tokens": 2}
MAX_BODY_BYTES = 4 * 1024 * 1024


# --- 401 --------------------------------------------------------------------------------------


def test_missing_key_is_401(api, checks):
    r = api.http.post("/v1/chat/completions", json=BASE)
    checks.error_body(r, 401, "authentication_error")


@pytest.mark.parametrize("auth", ["Bearer sk-wrong", "Bearer", "sk-test-key", "Basic c2stdGVzdC1rZXk6",
                                  "Bearer sk-test-key-and-more"])
def test_invalid_key_is_401(api, checks, auth):
    r = api.http.post("/v1/chat/completions", json=BASE, headers={"Authorization": auth})
    checks.error_body(r, 401, "authentication_error")


def test_models_list_needs_key(api, checks):
    checks.error_body(api.http.get("/v1/models"), 401, "authentication_error")
    checks.error_body(api.http.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401,
                      "authentication_error")


def test_sdk_authentication_error(server):
    c = openai.OpenAI(api_key="sk-wrong", base_url=server.base_url, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as ei:
        c.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2)
    assert ei.value.status_code == 401
    assert ei.value.message
    assert ei.value.type == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
    c.close()


def test_sdk_async_authentication_error(make_async_client):
    async def main():
        async with make_async_client(api_key="sk-wrong") as ac:
            with pytest.raises(openai.AuthenticationError) as ei:
                await ac.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2, stream=True)
            return ei.value

    assert asyncio.run(main()).status_code == 401


def test_bad_key_checked_before_body(api, checks):
    """An invalid key with an invalid body is a 401, not a 400 that would leak validation."""
    r = api.http.post("/v1/chat/completions", json={"model": "nope", "messages": []},
                      headers={"Authorization": "Bearer sk-wrong"})
    checks.error_body(r, 401, "authentication_error")


# --- 404 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,path", [("GET", "/nope"), ("POST", "/v1/nope"), ("GET", "/v1/chat/completions/x"),
                                         ("POST", "/v2/chat/completions")])
def test_unknown_route_is_404(api, checks, method, path):
    r = api.http.request(method, path, headers=api.headers(), json={} if method == "POST" else None)
    checks.error_body(r, 404, "not_found_error")


def test_sdk_not_found_error(server):
    c = openai.OpenAI(api_key="sk-test-key", base_url=server.url + "/v9", max_retries=0)
    with pytest.raises(openai.NotFoundError) as ei:
        c.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2)
    assert ei.value.status_code == 404
    assert ei.value.type == "not_found_error"
    c.close()


def test_wrong_method_is_an_error_body(api, checks):
    r = api.http.get("/v1/chat/completions", headers=api.headers())
    checks.error_body(r, 405)  # the route exists, only for POST


# --- 413 --------------------------------------------------------------------------------------


# --- 503 --------------------------------------------------------------------------------------


def test_queue_full_is_503_with_retry_after(api, checks):
    # This deployment admits one request at a time; a second one while the first streams is 503.
    limited = "test/SmolLM2-one-at-a-time"
    story = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
    long = {"model": limited, "messages": story, "max_tokens": 300, "temperature": 0, "stream": True}
    with api.http.stream("POST", "/v1/chat/completions", json=long, headers=api.headers()) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        while '"content":"' not in next(lines):
            pass  # wait until the first request is generating (a story runs for many steps)
        r = api.chat({"model": limited, "messages": FRANCE, "max_tokens": 2})
        body = checks.error_body(r, 503, "overloaded_error")
        assert int(r.headers["retry-after"]) >= 1
        assert "overloaded" in body["error"]["message"]
    # Once the first client leaves, the deployment takes requests again.
    deadline = time.monotonic() + 5
    while True:
        r = api.chat({"model": limited, "messages": FRANCE, "max_tokens": 2})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text


# --- 413 --------------------------------------------------------------------------------------


def test_body_over_cap_is_413(api, checks):
    big = "a" * (MAX_BODY_BYTES + 1024)
    r = api.chat({"model": MODEL, "messages": [{"role": "user", "content": big}], "max_tokens": 1})
    checks.error_body(r, 413, "request_too_large")


def test_body_over_cap_without_content_length_is_413(api, checks):
    """A chunked upload (no Content-Length) cannot slip past the cap."""
    payload = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a" * (MAX_BODY_BYTES + 1024)}],
                          "max_tokens": 1}).encode()

    def gen():
        for i in range(0, len(payload), 65536):
            yield payload[i:i + 65536]

    try:
        r = api.http.post("/v1/chat/completions", content=gen(),
                          headers=api.headers(**{"content-type": "application/json"}))
    except httpx.TransportError as e:  # pragma: no cover - the server may close before reading it all
        pytest.fail(f"server dropped the connection instead of answering 413: {e!r}")
    checks.error_body(r, 413, "request_too_large")


def test_sdk_413(client):
    with pytest.raises(openai.APIStatusError) as ei:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "b" * (MAX_BODY_BYTES + 10)}],
                                       max_tokens=1)
    assert ei.value.status_code == 413
    assert ei.value.type == "request_too_large"


def test_body_just_under_cap_is_not_413(api):
    """A body under the cap is read and judged on its content (here: a prompt too long -> 400)."""
    text = "a " * ((MAX_BODY_BYTES - 4096) // 2)
    r = api.chat({"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1})
    assert r.status_code == 400, r.text[:500]


# --- 400 body for SDK classes -----------------------------------------------------------------


def test_sdk_error_body_attributes(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=0)
    e = ei.value
    assert e.param == "max_tokens"
    assert isinstance(e.body, dict) and e.body["param"] == "max_tokens"
    full = e.response.json()
    assert isinstance(full["code"], int)
    assert full["data"] is None
    assert full["error"]["message"] in e.message


# --- 500 never shows a stack trace ------------------------------------------------------------


WEIRD_BODIES = [
    {"model": MODEL, "messages": [{"role": "user", "content": None}], "max_tokens": 1},
    {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "max_tokens": 1},
    {"model": MODEL, "messages": [{"role": "user", "content": [None]}], "max_tokens": 1},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**30},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "seed": 10**30},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "seed": -1},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stop": [""]},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stop": [None]},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "n": None},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": None},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream_options": {"x": 1}},
    {"model": MODEL, "messages": [{"role": "assistant", "content": "only an assistant turn"}], "max_tokens": 1},
    {"model": MODEL, "messages": [{"role": "tool", "content": "orphan tool result"}], "max_tokens": 1},
    {"model": MODEL, "messages": [{"role": "user", "content": "\x00\udbff"}], "max_tokens": 1},
    {"model": None, "messages": [{"role": "user", "content": "hi"}]},
    {"model": "", "messages": [{"role": "user", "content": "hi"}]},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 3000, "max_tokens": 1},
]


@pytest.mark.parametrize("body", WEIRD_BODIES, ids=[f"weird{i}" for i in range(len(WEIRD_BODIES))])
def test_odd_requests_never_leak_a_stack_trace(api, checks, body):
    r = api.http.post("/v1/chat/completions", content=json.dumps(body).encode(),
                      headers=api.headers(**{"content-type": "application/json"}))
    if r.status_code == 200:  # a valid reading of an odd request: then a whole, ordinary completion
        body = r.json()
        assert body["object"] == "chat.completion" and len(body["choices"]) == 1, body
        assert body["choices"][0]["finish_reason"] in ("length", "eos") and body["usage"]["prompt_tokens"] > 0, body
        assert body["usage"]["completion_tokens"] == 1 or body["choices"][0]["finish_reason"] == "eos", body
        checks.trace_headers(r)
        return
    checks.error_body(r, r.status_code)  # the shape, no traceback, trace headers
    if r.status_code == 500:
        assert r.json()["error"]["type"] == "internal_error"
    assert r.status_code < 500, f"odd input gave a server error: {r.text}"


def test_invalid_utf8_body_is_400(api, checks):
    r = api.http.post("/v1/chat/completions", content=b'{"model": "\xff\xfe", "messages": []}',
                      headers=api.headers(**{"content-type": "application/json"}))
    checks.error_body(r, 400, "invalid_request_error")


def test_nan_and_infinity_rejected(api, checks):
    for tok in ("NaN", "Infinity", "-Infinity"):
        raw = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 1, ' \
              f'"temperature": {tok}}}'
        r = api.http.post("/v1/chat/completions", content=raw.encode(),
                          headers=api.headers(**{"content-type": "application/json"}))
        body = checks.error_body(r, 400, "invalid_request_error")
        assert body["error"]["param"] in ("temperature", None), body


# --- trace headers on every response ----------------------------------------------------------


def test_trace_headers_everywhere(api, checks):
    responses = [
        api.chat(BASE),                                                     # 200
        api.chat(dict(BASE, temperature=9)),                                # 400
        api.chat(dict(BASE, model="nope")),                                 # 400 unknown model
        api.http.post("/v1/chat/completions", json=BASE),                   # 401
        api.http.get("/nope"),                                              # 404
        api.http.get("/v1/models", headers=api.headers()),
        api.http.get("/health"),
        api.http.get("/metrics"),
    ]
    traces = [checks.trace_headers(r) for r in responses]
    assert len(set(traces)) == len(traces), "trace ids are not unique per request"


def test_trace_header_on_stream(api, checks):
    s = api.stream(dict(BASE))
    checks.trace_headers(s.response)


def test_sdk_exposes_request_id(client):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=FRANCE, max_tokens=2)
    assert raw.headers["x-request-id"] == raw.headers["x-siliconcloud-trace-id"]
    assert raw.parse().choices
