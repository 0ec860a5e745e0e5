"""POST /v1/chat/completions, non-streamed: response shape, finish reasons, messages, usage,
defaults, seed, logprobs, through the official openai SDK (sync and async) and raw httpx."""

from __future__ import annotations

import asyncio
import math
import time

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PRO_MODEL = "Pro/HuggingFaceTB/SmolLM2-135M-Instruct"
PRO_MAX_MODEL_LEN = 256
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- response shape ---------------------------------------------------------------------------


def test_response_shape_raw(api, checks, count_prompt_tokens):
    before = int(time.time())
    r = api.chat({"model": MODEL, "messages": FRANCE, "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    checks.trace_headers(r)
    body = r.json()
    assert isinstance(body["id"], str) and body["id"]
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and before - 5 <= body["created"] <= time.time() + 5
    assert body["model"] == MODEL
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] in ("eos", "length")
    assert "logprobs" in choice and choice["logprobs"] is None
    usage = body["usage"]
    assert usage["prompt_tokens"] == count_prompt_tokens(FRANCE)
    assert 1 <= usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_sdk_sync_greedy(client):
    resp = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=24, temperature=0)
    assert resp.object == "chat.completion"
    assert resp.model == MODEL
    assert resp.choices[0].message.role == "assistant"
    assert "Paris" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "eos"
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_sdk_async_greedy(make_async_client, client):
    sync = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=24, temperature=0)

    async def main():
        async with make_async_client() as ac:
            return await ac.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=24, temperature=0)

    resp = asyncio.run(main())
    assert resp.choices[0].message.content == sync.choices[0].message.content
    assert resp.usage.model_dump() == sync.usage.model_dump()


def test_unknown_fields_are_ignored(api):
    body = api.chat_ok({"model": MODEL, "messages": FRANCE, "max_tokens": 4, "temperature": 0,
                        "no_such_field": {"nested": [1, 2, 3]}, "user": "someone", "x_platform_flag": True,
                        "messages_extra": "ignored"})
    assert body["choices"][0]["message"]["content"]


def test_sdk_extra_body_fields(client):
    """top_k and min_p are platform fields the SDK only sends through extra_body; each keeps only
    the most likely token at its extreme (top_k 1; min_p 1: at least the top token's probability),
    so a hot sampled request then equals greedy, and without them the same request does not."""
    def text(temperature, **extra):
        return client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=24, temperature=temperature,
                                              seed=3, extra_body=extra or None).choices[0].message.content

    greedy = text(0)
    assert text(1.5, top_k=1) == greedy
    assert text(1.5, min_p=1.0) == greedy
    assert text(1.5, top_k=0, top_p=1.0) != greedy  # the same seed without the cut samples elsewhere


# --- finish reasons ---------------------------------------------------------------------------


def test_finish_reason_eos(api):
    body = api.chat_ok({"model": MODEL, "messages": FRANCE, "max_tokens": 48, "temperature": 0})
    assert body["choices"][0]["finish_reason"] == "eos"
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_finish_reason_eos_reported_as_stop_by_deployment_switch(api):
    base = api.chat_ok({"model": MODEL, "messages": FRANCE, "max_tokens": 48, "temperature": 0})
    body = api.chat_ok({"model": PRO_MODEL, "messages": FRANCE, "max_tokens": 48, "temperature": 0})
    assert body["model"] == PRO_MODEL
    assert base["choices"][0]["finish_reason"] == "eos"
    assert body["choices"][0]["finish_reason"] == "stop"
    # same weights, same greedy request: same text
    assert body["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]


def test_finish_reason_length(api):
    body = api.chat_ok({"model": MODEL, "messages": user("Write a long story about a dragon."),
                        "max_tokens": 5, "temperature": 0})
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_max_tokens_one(api):
    body = api.chat_ok({"model": MODEL, "messages": FRANCE, "max_tokens": 1, "temperature": 0})
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 1


def test_finish_reason_stop_string(api):
    full = api.chat_ok({"model": MODEL, "messages": FRANCE, "max_tokens": 48, "temperature": 0})
    text = full["choices"][0]["message"]["content"]
    assert "Paris" in text
    body = api.chat_ok({"model": MODEL, "messages": FRANCE, "max_tokens": 48, "temperature": 0, "stop": "Paris"})
    out = body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert "Paris" not in out
    assert out == text[:text.index("Paris")]


def test_stop_string_inside_a_token(api):
    """'Par' ends in the middle of the token ' Paris': the text stops right before it."""
    full = api.chat_ok({"model": MODEL, "messages": FRANCE, "max_tokens": 48, "temperature": 0})
    text = full["choices"][0]["message"]["content"]
    body = api.chat_ok({"model": MODEL, "messages": FRANCE, "max_tokens": 48, "temperature": 0,
                        "stop": ["zzzz", "Par"]})
    out = body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert "Par" not in out
    assert out == text[:text.index("Par")]


def test_stop_four_strings_accepted(api):
    body = api.chat_ok({"model": MODEL, "messages": FRANCE, "max_tokens": 48, "temperature": 0,
                        "stop": ["qqq1", "qqq2", "France", "qqq3"]})
    assert body["choices"][0]["finish_reason"] == "stop"
    assert "France" not in body["choices"][0]["message"]["content"]


def test_stop_string_on_pro_deployment_is_stop(api):
    body = api.chat_ok({"model": PRO_MODEL, "messages": FRANCE, "max_tokens": 48, "temperature": 0, "stop": "Paris"})
    assert body["choices"][0]["finish_reason"] == "stop"
    assert "Paris" not in body["choices"][0]["message"]["content"]


def test_context_runs_out_without_max_tokens_is_length(api, count_prompt_tokens):
    """No max_tokens sent, the 256-token context runs out first: finish_reason length, not a 400."""
    filler = "Numbers are fun and counting is a good exercise for the mind. "
    messages = [{"role": "system", "content": ""},
                {"role": "user", "content": "Count from 1 to 1000, one number per line."}]
    reps = 0
    while True:  # a prompt that leaves ~16-40 tokens of context, so the test stays quick
        messages[0]["content"] = "You are a counting assistant. " + filler * reps
        p = count_prompt_tokens(messages)
        if p >= PRO_MAX_MODEL_LEN - 40:
            break
        reps += 1
    assert p < PRO_MAX_MODEL_LEN - 8, p
    body = api.chat_ok({"model": PRO_MODEL, "messages": messages, "temperature": 0, "frequency_penalty": 0})
    usage = body["usage"]
    assert usage["prompt_tokens"] == p
    assert body["choices"][0]["finish_reason"] == "length", body
    assert usage["total_tokens"] in (PRO_MAX_MODEL_LEN - 1, PRO_MAX_MODEL_LEN), usage


def test_prompt_plus_max_tokens_at_context_limit_ok(api, count_prompt_tokens):
    p = count_prompt_tokens(FRANCE)
    body = api.chat_ok({"model": PRO_MODEL, "messages": FRANCE, "temperature": 0,
                        "max_tokens": PRO_MAX_MODEL_LEN - p})
    assert "Paris" in body["choices"][0]["message"]["content"]


# --- messages ---------------------------------------------------------------------------------


def test_prompt_tokens_match_rendered_template(api, count_prompt_tokens):
    for messages in (
        user("Hi!"),
        [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name a color."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
         {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "Say 'ok'."}],
        user("Ünïcödé テキスト 🚀 — test"),
    ):
        body = api.chat_ok({"model": MODEL, "messages": messages, "max_tokens": 2, "temperature": 0})
        assert body["usage"]["prompt_tokens"] == count_prompt_tokens(messages), messages


def test_content_parts_equal_plain_string(api, count_prompt_tokens):
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    a = api.chat_ok({"model": MODEL, "messages": plain, "max_tokens": 12, "temperature": 0})
    b = api.chat_ok({"model": MODEL, "messages": parts, "max_tokens": 12, "temperature": 0})
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"] == count_prompt_tokens(plain)
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_content_several_text_parts(api, count_prompt_tokens):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                         {"type": "text", "text": " of France?"}]}]
    body = api.chat_ok({"model": MODEL, "messages": msgs, "max_tokens": 4, "temperature": 0})
    # Text parts are joined as they are: the prompt of the whole question.
    assert body["usage"]["prompt_tokens"] == count_prompt_tokens(FRANCE)
    assert body["choices"][0]["message"]["content"] == api.chat_ok(
        {"model": MODEL, "messages": FRANCE, "max_tokens": 4, "temperature": 0})["choices"][0]["message"]["content"]


def test_all_roles_including_tool(api):
    msgs = [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 21, \"sky\": \"sunny\"}"},
        {"role": "user", "content": "So, is it warm?"},
    ]
    body = api.chat_ok({"model": MODEL, "messages": msgs, "max_tokens": 4, "temperature": 0})
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] > 20


def test_sdk_multi_turn(client, count_prompt_tokens):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}]
    resp = client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0,
        messages=turns + [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}])
    assert resp.choices[0].message.content
    assert resp.usage.prompt_tokens == count_prompt_tokens(turns + [{"role": "user", "content": "What is 2+2?"}])


# --- n, defaults, seed, logprobs --------------------------------------------------------------


def test_n_choices(api):
    body = api.chat_ok({"model": MODEL, "messages": user("Write a long story about a dragon."),
                        "max_tokens": 4, "temperature": 1.0, "n": 3})
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for c in body["choices"]:
        assert c["message"]["role"] == "assistant"
        assert c["finish_reason"] in ("eos", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 12
    if all(c["finish_reason"] == "length" for c in body["choices"]):
        assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_n_at_cap(api):
    body = api.chat_ok({"model": MODEL, "messages": FRANCE, "max_tokens": 1, "n": 16})
    assert sorted(c["index"] for c in body["choices"]) == list(range(16))
    assert body["usage"]["completion_tokens"] == 16


def test_seed_reproducible(api):
    req = {"model": MODEL, "messages": user("Write a short poem about autumn."), "max_tokens": 16,
           "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 1234}
    a = api.chat_ok(req)["choices"][0]["message"]["content"]
    b = api.chat_ok(req)["choices"][0]["message"]["content"]
    assert a == b
    others = {api.chat_ok(dict(req, seed=s))["choices"][0]["message"]["content"] for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds at temperature 1 all gave the same text"


def test_seed_reproducible_sdk(client):
    kw = dict(model=MODEL, messages=user("Invent a name for a cat."), max_tokens=12, temperature=1.0, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_omitted_fields_use_platform_defaults(api):
    """With a fixed seed, omitting the sampling fields == sending the documented defaults."""
    base = {"model": MODEL, "messages": user("Write a short poem about autumn."), "max_tokens": 16, "seed": 99}
    omitted = api.chat_ok(base)["choices"][0]["message"]["content"]
    explicit = api.chat_ok(dict(base, temperature=0.7, top_p=0.7, top_k=50, min_p=0, frequency_penalty=0.5,
                                presence_penalty=0))["choices"][0]["message"]["content"]
    assert omitted == explicit


def test_default_max_tokens_fits(api):
    """No max_tokens: the default (512) applies; a short answer ends with eos well before it."""
    body = api.chat_ok({"model": MODEL, "messages": FRANCE, "temperature": 0})
    assert body["choices"][0]["finish_reason"] == "eos"
    assert body["usage"]["completion_tokens"] <= 512


def test_logprobs(api, hf_model, hf_tokenizer, prompt_ids):
    """The reported logprobs are transformers' teacher-forced log-softmax at each position, within
    1e-4, with the same top tokens (frequency_penalty 0: pure greedy, as the reference)."""
    import torch

    body = api.chat_ok({"model": MODEL, "messages": FRANCE, "max_tokens": 5, "temperature": 0,
                        "frequency_penalty": 0, "logprobs": True, "top_logprobs": 3})
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 5
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    ids = prompt_ids(FRANCE)
    with torch.inference_mode():
        for e in content:
            ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            top_vals, top_ids = ref.topk(3)
            assert isinstance(e["logprob"], float) and math.isfinite(e["logprob"])
            assert e["token"] == hf_tokenizer.decode([int(top_ids[0])])  # greedy: the most likely one
            assert abs(e["logprob"] - float(top_vals[0])) < 1e-4
            assert [t["token"] for t in e["top_logprobs"]] == [hf_tokenizer.decode([int(i)]) for i in top_ids]
            for t, v in zip(e["top_logprobs"], top_vals.tolist()):
                assert abs(t["logprob"] - v) < 1e-4
            ids.append(int(top_ids[0]))


def test_logprobs_sdk(client):
    resp = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in content)


def test_logprobs_without_top(api):
    body = api.chat_ok({"model": MODEL, "messages": FRANCE, "max_tokens": 3, "temperature": 0, "logprobs": True})
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    assert all(e.get("top_logprobs", []) == [] for e in content)


# --- two deployments from one config ----------------------------------------------------------


def test_two_models_served(client):
    a = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8, temperature=0)
    b = client.chat.completions.create(model=PRO_MODEL, messages=FRANCE, max_tokens=8, temperature=0)
    assert a.model == MODEL and b.model == PRO_MODEL
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_two_models_concurrently(make_async_client):
    async def main():
        async with make_async_client() as ac:
            return await asyncio.gather(*[
                ac.chat.completions.create(model=m, messages=FRANCE, max_tokens=8, temperature=0)
                for m in (MODEL, PRO_MODEL, MODEL, PRO_MODEL)])

    outs = asyncio.run(main())
    assert [o.model for o in outs] == [MODEL, PRO_MODEL, MODEL, PRO_MODEL]
    assert len({o.choices[0].message.content for o in outs}) == 1
