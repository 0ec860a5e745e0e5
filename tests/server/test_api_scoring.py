"""Scoring text through the API: /v1/completions with echo + logprobs (OpenAI's legacy shape, also
with max_tokens 0), vLLM's prompt_logprobs field on both endpoints, and lm-evaluation-harness's
loglikelihood requests, checked against the engine run in this process on the same weights."""

from __future__ import annotations

import math

from .conftest import MODEL

PROMPT = "The lighthouse keeper climbed the spiral stairs and lit the great lamp."


def score(client, prompt, k: int = 2, **extra):
    return client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=k, max_tokens=0,
                                      temperature=0, **extra)


def test_echo_logprobs_max_tokens_0_scores_the_prompt(client, smollm, hf_tokenizer):
    from lmserve.engine.scoring import perplexity

    ids = hf_tokenizer.encode(PROMPT)
    r = score(client, PROMPT, k=3)
    choice = r.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == PROMPT
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 3 <= len(top) <= 4 and top[token] == value and max(top.values()) >= value
    # The sum equals the engine's own score of the same tokens (one prefill, full logits).
    total = sum(lp.token_logprobs[1:])
    assert math.isclose(total, -math.log(perplexity(smollm.engine, ids)) * (len(ids) - 1), rel_tol=1e-4)
    # The prompt as token ids scores the same.
    by_ids = score(client, ids, k=3).choices[0].logprobs
    assert by_ids.tokens == lp.tokens
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(by_ids.token_logprobs[1:], lp.token_logprobs[1:]))


def test_echo_logprobs_with_generation_and_streamed(client):
    scored = score(client, PROMPT).choices[0].logprobs
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2).choices[0]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True)
    choice = r.choices[0]
    assert choice.text == PROMPT + plain.text
    n = len(scored.tokens)
    lp = choice.logprobs
    assert lp.tokens == scored.tokens + plain.logprobs.tokens
    assert lp.token_logprobs[:n] == scored.token_logprobs
    assert lp.token_logprobs[n:] == plain.logprobs.token_logprobs
    assert lp.text_offset[n] == len(PROMPT)  # the completion's offsets follow the echoed text
    # Streamed, the same response arrives in pieces: the echo (with its scores) first.
    chunks = [c for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                                   logprobs=2, echo=True, stream=True) if c.choices]
    assert chunks[0].choices[0].text == PROMPT and chunks[0].choices[0].logprobs.tokens == scored.tokens
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert sum((c.choices[0].logprobs.token_logprobs for c in chunks if c.choices[0].logprobs), []) == \
        lp.token_logprobs


def test_vllm_prompt_logprobs_field_on_both_endpoints(client, count_prompt_tokens):
    scored = score(client, PROMPT, k=2).choices[0].logprobs
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                  extra_body={"prompt_logprobs": 2})
    pl = r.choices[0].model_extra["prompt_logprobs"]  # vLLM has it per choice on completions
    assert len(pl) == len(scored.tokens) and pl[0] is None
    for entry, token, value in zip(pl[1:], scored.tokens[1:], scored.token_logprobs[1:]):
        first = next(iter(entry.values()))  # the prompt's own token, then the top 2 by rank
        assert first["decoded_token"] == token and math.isclose(first["logprob"], value, abs_tol=1e-5)
        assert first["rank"] >= 1 and 2 <= len(entry) <= 3
        assert {v["rank"] for v in entry.values()} >= {1, 2}
        assert all(v["rank"] <= 2 for v in list(entry.values())[1:])
    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    pl = chat.model_extra["prompt_logprobs"]  # ...and at the top on chat
    assert len(pl) == chat.usage.prompt_tokens == count_prompt_tokens(messages) and pl[0] is None
    assert all(len(e) == 1 and next(iter(e.values()))["logprob"] <= 0 for e in pl[1:])
    assert "prompt_logprobs" not in client.chat.completions.create(model=MODEL, messages=messages,
                                                                   max_tokens=1).model_extra


def test_scoring_errors(api, checks):
    def post(path, body):
        return api.http.post(path, json={"model": MODEL, **body}, headers=api.headers())

    checks.error_body(post("/v1/completions", {"prompt": "x", "max_tokens": 0}), 400, param="max_tokens")
    checks.error_body(post("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 21}), 400, param="logprobs")
    checks.error_body(post("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}), 400, param="prompt_logprobs")
    checks.error_body(post("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}), 400,
                      param="prompt_logprobs")
    checks.error_body(post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                    "prompt_logprobs": 1, "stream": True}), 400,
                      param="prompt_logprobs")


# --- lm-evaluation-harness's loglikelihood requests -------------------------------------------------

# A tiny multiple-choice set: (context, choices, index of the answer).
MULTIPLE_CHOICE = [
    ("The capital of France is", [" Paris", " London", " Berlin"], 0),
    ("Monday, Tuesday, Wednesday,", [" Thursday", " Sunday", " April"], 0),
    ("One, two, three, four,", [" five", " nine", " seven"], 0),
]


def harness_loglikelihood(client, hf_tokenizer, context: str, continuation: str) -> tuple[float, bool, list[int]]:
    """What lm-eval's `local-completions` model sends and parses: the context and continuation as
    token ids, echo, logprobs 1, max_tokens 0; the continuation's summed logprob and whether each
    of its tokens was the top choice."""
    ctx = hf_tokenizer.encode(context)
    cont = hf_tokenizer.encode(continuation, add_special_tokens=False)
    r = client.completions.create(model=MODEL, prompt=ctx + cont, echo=True, logprobs=1, max_tokens=0,
                                  temperature=0, seed=1234)
    lp = r.choices[0].logprobs
    logprob = sum(lp.token_logprobs[len(ctx):])
    greedy = all(max(top, key=top.get) == token
                 for token, top in zip(lp.tokens[len(ctx):], lp.top_logprobs[len(ctx):]))
    return logprob, greedy, ctx + cont


def test_lm_eval_harness_multiple_choice(client, smollm, hf_tokenizer):
    from lmserve import SamplingParams

    right = 0
    for context, choices, answer in MULTIPLE_CHOICE:
        scores = []
        for continuation in choices:
            logprob, greedy, ids = harness_loglikelihood(client, hf_tokenizer, context, continuation)
            # The engine in this process, asked directly for prompt logprobs, agrees.
            own = smollm.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
            n_cont = len(ids) - len(hf_tokenizer.encode(context))
            tail = own[len(ids) - n_cont:]
            assert math.isclose(logprob, sum(e.logprob for e in tail), abs_tol=1e-3)
            assert greedy == all(e.rank == 1 for e in tail)
            scores.append(logprob)
        right += max(range(len(choices)), key=scores.__getitem__) == answer
    assert right >= 2, "the bundled model should get these easy questions right"
