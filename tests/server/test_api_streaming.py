"""Streaming (SSE): framing, chunk shape, equality with the non-streamed answer, n>1 interleaving,
include_usage, client disconnects freeing the KV cache, and 50 concurrent streams."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PRO_MODEL = "Pro/HuggingFaceTB/SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_sse_framing_and_chunk_shape(api, checks):
    before = int(time.time())
    s = api.stream({"model": MODEL, "messages": FRANCE, "max_tokens": 12, "temperature": 0})
    checks.trace_headers(s.response)
    assert s.raw.startswith("data: "), s.raw[:80]
    assert s.chunks, "no chunks before [DONE]"
    ids = {c["id"] for c in s.chunks}
    created = {c["created"] for c in s.chunks}
    assert len(ids) == 1 and next(iter(ids))
    assert len(created) == 1 and before - 5 <= next(iter(created)) <= time.time() + 5
    for c in s.chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == MODEL
        assert "usage" in c and c["usage"] is None, c  # no include_usage: usage is null in every chunk
        assert len(c["choices"]) == 1
        ch = c["choices"][0]
        assert ch["index"] == 0
        assert isinstance(ch["delta"], dict)
        assert "finish_reason" in ch
    first, last = s.chunks[0]["choices"][0], s.chunks[-1]["choices"][0]
    assert first["delta"].get("role") == "assistant"
    assert all("role" not in c["choices"][0]["delta"] or c["choices"][0]["delta"]["role"] == "assistant"
               for c in s.chunks)
    assert last["finish_reason"] == "eos"
    assert all(c["choices"][0]["finish_reason"] is None for c in s.chunks[:-1])
    assert "Paris" in s.content()


@pytest.mark.parametrize("messages,max_tokens", [
    (FRANCE, 24),
    (user("Write a haiku about the sea."), 24),
    (user("How do you say 'thank you' in Japanese? Answer with the Japanese characters."), 24),
    (user("Reply with three emoji about food and nothing else."), 16),
], ids=["france", "haiku", "japanese", "emoji"])
def test_streamed_equals_non_streamed(api, messages, max_tokens):
    req = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    full = api.chat_ok(req)
    s = api.stream(req)
    text = s.content()
    assert text == full["choices"][0]["message"]["content"]
    assert "\ufffd" not in text  # UTF-8 never split across deltas
    for c in s.chunks:
        for ch in c["choices"]:
            assert "\ufffd" not in (ch["delta"].get("content") or "")
    assert s.finish_reason() == full["choices"][0]["finish_reason"]


def test_streamed_stop_string_never_leaks(api):
    req = {"model": MODEL, "messages": FRANCE, "max_tokens": 48, "temperature": 0, "stop": ["Par"]}
    full = api.chat_ok(req)
    s = api.stream(req)
    assert s.finish_reason() == "stop"
    assert "Par" not in s.content()
    assert s.content() == full["choices"][0]["message"]["content"]


def test_streamed_pro_reports_stop(api):
    s = api.stream({"model": PRO_MODEL, "messages": FRANCE, "max_tokens": 48, "temperature": 0})
    assert s.finish_reason() == "stop"
    assert all(c["model"] == PRO_MODEL for c in s.chunks)


def test_streamed_length(api):
    s = api.stream({"model": MODEL, "messages": user("Write a long story about a dragon."), "max_tokens": 6,
                    "temperature": 0, "stream_options": {"include_usage": True}})
    assert s.finish_reason() == "length"
    assert s.chunks[-1]["usage"]["completion_tokens"] == 6


def test_include_usage(api, count_prompt_tokens):
    req = {"model": MODEL, "messages": FRANCE, "max_tokens": 10, "temperature": 0}
    full = api.chat_ok(req)
    s = api.stream(dict(req, stream_options={"include_usage": True}))
    last = s.chunks[-1]
    assert last["choices"] == []
    assert last["object"] == "chat.completion.chunk"
    assert last["usage"] == full["usage"]
    assert last["usage"]["prompt_tokens"] == count_prompt_tokens(FRANCE)
    for c in s.chunks[:-1]:
        assert c["usage"] is None, c
        assert c["choices"], c


def test_include_usage_false(api):
    s = api.stream({"model": MODEL, "messages": FRANCE, "max_tokens": 4, "temperature": 0,
                    "stream_options": {"include_usage": False}})
    assert all(c["usage"] is None and c["choices"] for c in s.chunks)


def test_n3_streamed_interleaved(api):
    s = api.stream({"model": MODEL, "messages": user("Write a long story about a dragon."), "max_tokens": 8,
                    "temperature": 1.0, "n": 3, "stream_options": {"include_usage": True}})
    order = [ch["index"] for c in s.chunks for ch in c["choices"]]
    assert set(order) == {0, 1, 2}
    per: dict[int, list[dict]] = {0: [], 1: [], 2: []}
    for c in s.chunks:
        for ch in c["choices"]:
            per[ch["index"]].append(ch)
    for i, chs in per.items():
        assert chs[0]["delta"].get("role") == "assistant", (i, chs[0])
        assert chs[-1]["finish_reason"] in ("length", "eos"), (i, chs[-1])
        assert all(ch["finish_reason"] is None for ch in chs[:-1]), i
    # interleaved: choice 0 is not finished before choices 1 and 2 start
    first_of = {i: order.index(i) for i in (0, 1, 2)}
    last_of = {i: len(order) - 1 - order[::-1].index(i) for i in (0, 1, 2)}
    assert first_of[1] < last_of[0] and first_of[2] < last_of[0], order
    usage = s.chunks[-1]["usage"]
    assert usage["completion_tokens"] <= 24
    if all(per[i][-1]["finish_reason"] == "length" for i in per):
        assert usage["completion_tokens"] == 24


def test_sdk_sync_stream(client):
    req = dict(model=MODEL, messages=FRANCE, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**req)
    chunks = list(client.chat.completions.create(**req, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [full.choices[0].finish_reason] == ["eos"]


def test_sdk_async_stream(make_async_client, client):
    req = dict(model=MODEL, messages=user("Write a haiku about the sea."), max_tokens=16, temperature=0)
    full = client.chat.completions.create(**req)

    async def main():
        async with make_async_client() as ac:
            stream = await ac.chat.completions.create(**req, stream=True)
            return [c async for c in stream]

    chunks = asyncio.run(main())
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content


def _kv_usage(api, model=MODEL) -> float:
    m = api.metrics()
    series = m.series("lmserve_kv_cache_usage_ratio", model=model)
    assert series, f"no lmserve_kv_cache_usage_ratio{{model={model!r}}} in /metrics"
    return sum(v for _, v in series)


def _running(api) -> float:
    return api.metrics().value("lmserve_num_requests_running")


CANCEL_DEADLINE_S = 120.0  # how long a busy 2-core machine may take to notice a client left
LONG = 2000  # max_tokens of a request that must be cancelled: minutes of CPU decoding, never reached


def _finished_requests(api) -> tuple[float, float]:
    m = api.metrics()
    return m.value("lmserve_requests_total", model=MODEL), m.value("lmserve_generation_tokens_total", model=MODEL)


def _assert_cancelled(api, before: tuple[float, float], what: str) -> None:
    """The request ended (counted once in lmserve_requests_total), its KV blocks are free, nothing
    runs, and it generated fewer than its max_tokens: it was cancelled, not run to its end."""
    deadline = time.monotonic() + CANCEL_DEADLINE_S
    while True:
        (requests, generated), usage, running = _finished_requests(api), _kv_usage(api), _running(api)
        if requests == before[0] + 1 and usage == 0.0 and running == 0:
            break
        assert time.monotonic() < deadline, (f"{CANCEL_DEADLINE_S:.0f} s after {what}: {requests - before[0]} "
                                             f"requests ended, KV usage {usage}, {running} running")
        time.sleep(0.1)
    assert generated - before[1] < LONG, f"the request ran to max_tokens after {what}: it was not cancelled"


def test_client_disconnect_frees_kv_blocks(api, server):
    assert _kv_usage(api) == 0.0, "KV cache not empty before the test"
    req = {"model": MODEL, "messages": user("Count from 1 to 1000, one number per line."), "max_tokens": LONG,
           "temperature": 0, "frequency_penalty": 0, "ignore_eos": True, "stream": True}
    before = _finished_requests(api)
    with httpx.Client(base_url=server.url, timeout=60.0) as http:
        with http.stream("POST", "/v1/chat/completions", json=req, headers=api.headers()) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: ") and line != "data: [DONE]":
                    got += 1
                    if got == 3:
                        break
            assert got == 3
            assert _kv_usage(api) > 0.0, "KV cache usage is 0 while a request is generating"
            assert _running(api) >= 1
        # leaving the `with` closes the unfinished response, and so the connection
    _assert_cancelled(api, before, "the client went away")
    # the server is fine afterwards
    body = api.chat_ok({"model": MODEL, "messages": FRANCE, "max_tokens": 4, "temperature": 0})
    assert body["choices"][0]["message"]["content"]


def test_sdk_stream_close_frees_kv_blocks(api, client):
    before = _finished_requests(api)
    stream = client.chat.completions.create(
        model=MODEL, messages=user("Count from 1 to 1000, one number per line."), max_tokens=LONG,
        temperature=0, frequency_penalty=0, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    _assert_cancelled(api, before, "the SDK closed the stream")


def test_50_concurrent_streams(make_async_client, api, count_prompt_tokens):
    prompts = [user(f"Give me one fun fact about the number {i}.") for i in range(50)]
    expected_prompt = [count_prompt_tokens(m) for m in prompts]

    async def one(ac, messages):
        stream = await ac.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        return chunks

    async def main():
        async with make_async_client(timeout=240.0) as ac:
            return await asyncio.gather(*[one(ac, m) for m in prompts])

    t0 = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - t0
    assert len(results) == 50
    ids = set()
    for i, chunks in enumerate(results):
        ids.add(chunks[0].id)
        assert chunks[0].choices[0].delta.role == "assistant"
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(reasons) == 1 and reasons[0] in ("length", "eos"), (i, reasons)
        usage = chunks[-1].usage
        assert chunks[-1].choices == []
        assert usage is not None, i
        assert usage.prompt_tokens == expected_prompt[i], (i, usage)
        assert 1 <= usage.completion_tokens <= 8, (i, usage)
        if reasons[0] == "length":
            assert usage.completion_tokens == 8, (i, usage)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(ids) == 50, "completion ids are not unique"
    assert _kv_usage(api) == 0.0
    print(f"50 concurrent streams finished in {elapsed:.1f} s")


def test_streamed_logprobs_equal_non_streamed(api):
    req = {"model": MODEL, "messages": FRANCE, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    full = api.chat_ok(req)["choices"][0]["logprobs"]["content"]
    s = api.stream(req)
    streamed = [e for c in s.chunks for ch in c["choices"] for e in ((ch.get("logprobs") or {}).get("content") or [])]
    assert [e["token"] for e in streamed] == [e["token"] for e in full]
    for a, b in zip(streamed, full):
        assert abs(a["logprob"] - b["logprob"]) < 1e-4
        assert [t["token"] for t in a["top_logprobs"]] == [t["token"] for t in b["top_logprobs"]]


def test_non_streamed_client_timeout_frees_kv_blocks(api, server):
    """A non-streamed request whose client gives up is cancelled too (no completion nobody reads)."""
    assert _kv_usage(api) == 0.0
    req = {"model": MODEL, "messages": user("Count from 1 to 1000, one number per line."), "max_tokens": LONG,
           "temperature": 0, "frequency_penalty": 0, "ignore_eos": True}
    before = _finished_requests(api)
    # The client gives up long before LONG tokens could be generated on any CPU.
    with httpx.Client(base_url=server.url, timeout=1.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json=req, headers=api.headers())
    _assert_cancelled(api, before, "the client gave up")
