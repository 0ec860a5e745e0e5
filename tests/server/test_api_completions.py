"""POST /v1/completions (legacy prompt API), /tokenize and /detokenize, the OpenAPI document and
CORS, through the openai SDK and raw HTTP."""

from __future__ import annotations

from .conftest import CORS_ORIGIN, MODEL

PROMPT = "The capital of France is"


def test_completion_greedy_matches_chat_engine_tokens(client, hf_tokenizer):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    choice = r.choices[0]
    assert choice.text and choice.finish_reason in ("length", "eos", "stop")
    assert r.usage.prompt_tokens == len(hf_tokenizer.encode(PROMPT))
    # Token ids as the prompt give the same greedy text.
    ids = client.completions.create(model=MODEL, prompt=hf_tokenizer.encode(PROMPT), max_tokens=6, temperature=0)
    assert ids.choices[0].text == choice.text


def test_completion_n_echo_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=3, temperature=1.0, seed=7,
                                  echo=True)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.text.startswith(PROMPT) and len(c.text) > len(PROMPT) for c in r.choices)
    assert 3 <= r.usage.completion_tokens <= 12
    lp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2).choices[0]
    assert len(lp.logprobs.tokens) == len(lp.logprobs.token_logprobs) == len(lp.logprobs.top_logprobs) == 3
    assert "".join(lp.logprobs.tokens) == lp.text
    assert lp.logprobs.text_offset[0] == 0 and all(v <= 0 for v in lp.logprobs.token_logprobs)
    assert all(len(top) >= 2 for top in lp.logprobs.top_logprobs)


def test_completion_streaming(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            echo=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == PROMPT + whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens >= 1


def test_completion_errors(api, checks):
    def post(body):
        return api.http.post("/v1/completions", json=body, headers=api.headers())

    checks.error_body(post({"model": MODEL}), 400, "invalid_request_error", "prompt")
    checks.error_body(post({"model": MODEL, "prompt": ["a", "b"]}), 400, "invalid_request_error", "prompt")
    checks.error_body(post({"model": MODEL, "prompt": [10 ** 9]}), 400, "invalid_request_error", "prompt")
    checks.error_body(post({"model": MODEL, "prompt": "x", "max_tokens": 0}), 400, param="max_tokens")  # no echo
    checks.error_body(post({"model": "nope", "prompt": "x"}), 400, param="model")
    checks.error_body(api.http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}), 401)


def test_tokenize_detokenize(api, checks, hf_tokenizer, count_prompt_tokens):
    r = api.http.post("/tokenize", json={"model": MODEL, "prompt": "hello world"}, headers=api.headers())
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == hf_tokenizer.encode("hello world") and body["count"] == 2
    assert body["max_model_len"] > 0
    messages = [{"role": "user", "content": "hi there"}]
    r = api.http.post("/tokenize", json={"model": MODEL, "messages": messages}, headers=api.headers())
    assert r.json()["count"] == count_prompt_tokens(messages)
    r = api.http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]}, headers=api.headers())
    assert r.json() == {"prompt": "hello world"}
    checks.error_body(api.http.post("/tokenize", json={"model": MODEL}, headers=api.headers()), 400)
    checks.error_body(api.http.post("/detokenize", json={"model": MODEL, "tokens": [-1]}, headers=api.headers()),
                      400, param="tokens")
    checks.error_body(api.http.post("/tokenize", json={"model": MODEL, "prompt": "x"}), 401)


def test_openapi_describes_the_real_bodies(api):
    doc = api.http.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/v1/models/{model_id}"):
        assert path in doc["paths"], path
    ref = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    chat = doc["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]
    assert {"model", "messages", "temperature", "min_tokens", "stream"} <= set(chat["properties"])
    assert "messages" in chat["required"]
    assert api.http.get("/docs").status_code == 200


def test_cors(api):
    pre = api.http.options("/v1/chat/completions", headers={
        "Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == CORS_ORIGIN
    r = api.http.get("/v1/models", headers=api.headers(Origin=CORS_ORIGIN))
    assert r.headers["access-control-allow-origin"] == CORS_ORIGIN
    other = api.http.get("/v1/models", headers=api.headers(Origin="http://evil.example"))
    assert "access-control-allow-origin" not in other.headers
