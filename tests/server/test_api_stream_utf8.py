"""Streaming never splits a character across deltas (issue 21): seeded, emoji- and CJK-heavy
generations of the bundled model through the server (the detokenizer itself is fuzzed over
thousands of token sequences in tests/engine/test_detokenizer_utf8.py), sampled hot so that the
byte-level tokens carrying a piece of a character come often, streamed through every path (chat,
chat with logprobs, legacy completions with n=2, a forced tool call) and compared with

- the text of the stream's own tokens, decoded at once from the bytes its logprobs report (so
  a U+FFFD that a split made in a delta is caught even if the model's sampling changed), and
- the non-streamed answer to the same request and seed.

A U+FFFD in the text is only right where the model's bytes themselves are not valid UTF-8.
"""

from __future__ import annotations

import json

import httpx
import pytest

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPTS = ["用中文写一首关于月亮的短诗 🌙✨", "Reply only with emoji: 😀🎉👍🏽🔥🌈🍕🚀",
           "日本語と한국어で挨拶して 🇯🇵🇰🇷", "Écris une phrase avec des accents: café, naïve, cœur, € ✓ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
HOT = {"temperature": 1.6, "top_p": 1.0, "top_k": 0, "frequency_penalty": 0, "presence_penalty": 0,
       "max_tokens": 16}


def _events(r: httpx.Response) -> list[dict]:
    out = []
    for line in r.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[len("data: "):]))
    return out


def _decoded(raw: bytes) -> str:
    """The tokens' bytes as the whole text: an incomplete character at the very end is dropped
    (generation stopped inside it), anything else invalid is U+FFFD, as a decoder sees it."""
    return raw[:len(raw) - _incomplete_tail(raw)].decode("utf-8", errors="replace")


def _incomplete_tail(raw: bytes) -> int:
    """Bytes at the end that start a multi-byte character and are too few to finish it."""
    for back in range(1, min(4, len(raw)) + 1):
        b = raw[-back]
        if b & 0xC0 == 0x80:  # a continuation byte: keep looking for its lead
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return back if need > back else 0
    return 0


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=600, headers={"Authorization": "Bearer sk-test-key"}) as c:
        yield c


def _warm(http: httpx.Client, path: str, body: dict) -> None:
    """The request once, so that the two ways compared after it both find its prompt in the prefix
    cache. A prompt computed cold and one served from the cache round their first logits apart (the
    cached prompt's last token is a decode step, not a row of a prefill), which hot sampling can turn
    into different tokens: the comparison is of streaming, so both sides start from the same cache."""
    assert http.post(path, json=body).status_code == 200


def _stream(http: httpx.Client, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        return _events(r)


@pytest.mark.parametrize("seed", range(8))
def test_chat_stream_with_logprobs_matches_its_bytes_and_the_plain_answer(http, seed):
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[seed % len(PROMPTS)]}], "seed": seed,
            "logprobs": True, **HOT}
    _warm(http, "/v1/chat/completions", body)
    events = _stream(http, "/v1/chat/completions", body)
    deltas = [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]
    raw = b"".join(bytes(t["bytes"]) for e in events if e["choices"] and e["choices"][0].get("logprobs")
                   for t in e["choices"][0]["logprobs"]["content"])
    streamed = "".join(deltas)
    assert streamed == _decoded(raw), (deltas, raw)
    plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert streamed == plain


@pytest.mark.parametrize("seed", range(8, 12))
def test_chat_stream_without_logprobs_matches_the_plain_answer(http, seed):
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[seed % len(PROMPTS)]}], "seed": seed,
            **HOT}
    _warm(http, "/v1/chat/completions", body)
    deltas = [e["choices"][0]["delta"].get("content") or "" for e in _stream(http, "/v1/chat/completions", body)
              if e["choices"]]
    plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert "".join(deltas) == plain
    if "\ufffd" not in plain:
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("seed", range(12, 15))
def test_completions_n2_stream_matches_the_plain_answer(http, seed):
    body = {"model": MODEL, "prompt": PROMPTS[seed % len(PROMPTS)], "seed": seed, "n": 2, "logprobs": 1, **HOT}
    _warm(http, "/v1/completions", body)
    events = _stream(http, "/v1/completions", body)
    texts = {0: "", 1: ""}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
    plain = http.post("/v1/completions", json=body).json()["choices"]
    assert [texts[0], texts[1]] == [c["text"] for c in sorted(plain, key=lambda c: c["index"])]
    for c in plain:
        if "\ufffd" not in c["text"]:
            assert "\ufffd" not in texts[c["index"]]


@pytest.mark.parametrize("seed", range(15, 17))
def test_tool_call_arguments_stream_matches_the_plain_answer(http, seed):
    tools = [{"type": "function", "function": {"name": "say", "description": "Say something in Chinese with emoji",
                                               "parameters": {"type": "object", "properties": {
                                                   "text": {"type": "string"}}, "required": ["text"]}}}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[seed % len(PROMPTS)]}], "seed": seed,
            "tools": tools, "tool_choice": {"type": "function", "function": {"name": "say"}},
            **{**HOT, "max_tokens": 32}}
    _warm(http, "/v1/chat/completions", body)
    content, args = "", ""
    for e in _stream(http, "/v1/chat/completions", body):
        delta = e["choices"][0]["delta"] if e["choices"] else {}
        content += delta.get("content") or ""
        for call in delta.get("tool_calls") or []:
            args += call.get("function", {}).get("arguments") or ""
    message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    # a call cut short by max_tokens stays text: compare what each way made of the same tokens
    plain_args = "".join(c["function"]["arguments"] for c in message.get("tool_calls") or [])
    assert (content, args) == (message.get("content") or "", plain_args)
    if "\ufffd" not in plain_args + (message.get("content") or ""):
        assert "\ufffd" not in content + args
