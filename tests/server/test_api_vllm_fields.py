"""Request fields that OpenAI-compatible tools send beyond the OpenAI spec (vLLM's sampling
extras, the `developer` role) and the clear 400 for non-text content."""

from __future__ import annotations

import pytest

from .conftest import MODEL

MAX = 48
SHORT = [{"role": "user", "content": "Reply with just the word yes."}]


def _chat(client, **extra):
    return client.chat.completions.create(model=MODEL, messages=SHORT, max_tokens=MAX, temperature=0,
                                          extra_body=extra or None)


@pytest.fixture(scope="module")
def natural(client):
    """The greedy reply ends by itself well before max_tokens (the premise of these tests)."""
    r = _chat(client)
    assert r.choices[0].finish_reason == "eos" and r.usage.completion_tokens < MAX - 8, r
    return r


def test_min_tokens_holds_back_the_end(client, natural):
    want = natural.usage.completion_tokens + 5
    r = _chat(client, min_tokens=want)
    assert r.usage.completion_tokens >= want
    assert r.choices[0].message.content.startswith(natural.choices[0].message.content)


def test_ignore_eos_runs_to_max_tokens(client, natural):
    r = _chat(client, ignore_eos=True)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == MAX


def test_skip_special_tokens(client, natural):
    shown = _chat(client, ignore_eos=True, skip_special_tokens=False).choices[0].message.content
    hidden = _chat(client, ignore_eos=True).choices[0].message.content
    assert "<|im_end|>" in shown and "<|im_end|>" not in hidden


def test_stop_token_ids(client, natural, hf_tokenizer):
    ids = hf_tokenizer.encode(natural.choices[0].message.content, add_special_tokens=False)
    assert len(ids) >= 2
    r = _chat(client, stop_token_ids=[ids[1]])
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 2


def test_repetition_penalty_follows_the_transformers_rule(client, api, checks, hf_model, hf_tokenizer, prompt_ids):
    """repetition_penalty divides the positive logits (multiplies the negative) of every token already
    in the prompt or output: greedy with it equals transformers' generate with its own
    RepetitionPenaltyLogitsProcessor, and differs from greedy without it."""
    import torch

    messages = [{"role": "user", "content": "Repeat the word apple ten times."}]

    def served(**extra):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                              frequency_penalty=0, extra_body=extra or None).choices[0]

    ids = prompt_ids(messages)
    with torch.inference_mode():
        ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=24, do_sample=False, repetition_penalty=1.3)[0, len(ids):].tolist()
    end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ref = ref[:ref.index(end)] if end in ref else ref
    penalized = served(repetition_penalty=1.3)
    assert penalized.message.content == hf_tokenizer.decode(ref, skip_special_tokens=True)
    assert penalized.message.content != served().message.content
    r = api.chat({"model": MODEL, "messages": SHORT, "repetition_penalty": 0})
    checks.error_body(r, 400, "invalid_request_error", "repetition_penalty")
    r = api.chat({"model": MODEL, "messages": SHORT, "max_tokens": 4, "min_tokens": 5})
    checks.error_body(r, 400, "invalid_request_error", "min_tokens")


def test_developer_role_is_system(client, api, count_prompt_tokens):
    as_dev = api.chat_ok({"model": MODEL, "max_tokens": 1, "messages": [
        {"role": "developer", "content": "You are terse."}, {"role": "user", "content": "hi"}]})
    expected = count_prompt_tokens([{"role": "system", "content": "You are terse."},
                                    {"role": "user", "content": "hi"}])
    assert as_dev["usage"]["prompt_tokens"] == expected


def test_image_part_is_a_clear_400(api, checks):
    r = api.chat({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
    body = checks.error_body(r, 400, "invalid_request_error", "messages")
    assert "text only" in body["error"]["message"] and "image_url" in body["error"]["message"]
