"""GET /v1/models (and its filters), GET /health, GET /metrics (Prometheus text)."""

from __future__ import annotations

import time

import pytest

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PRO_MODEL = "Pro/HuggingFaceTB/SmolLM2-135M-Instruct"
ALL_MODELS = [MODEL, PRO_MODEL, "test/SmolLM2-one-at-a-time"]  # as deployed by conftest.CONFIG_YAML
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]

REQUIRED_METRICS = [
    "lmserve_requests_total",
    "lmserve_prompt_tokens_total",
    "lmserve_generation_tokens_total",
    "lmserve_time_to_first_token_seconds",
    "lmserve_inter_token_latency_seconds",
    "lmserve_num_requests_running",
    "lmserve_num_requests_waiting",
    "lmserve_kv_cache_usage_ratio",
    "lmserve_prefix_cache_hit_rate",
]


# --- /v1/models -------------------------------------------------------------------------------


def test_models_list(api, checks):
    r = api.http.get("/v1/models", headers=api.headers())
    assert r.status_code == 200, r.text
    checks.trace_headers(r)
    body = r.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert sorted(ids) == sorted(ALL_MODELS)
    for m in body["data"]:
        assert m["object"] == "model"
        assert isinstance(m["created"], int) and not isinstance(m["created"], bool)
        assert isinstance(m["owned_by"], str) and m["owned_by"]


@pytest.mark.parametrize("query,expected", [
    ({"type": "text"}, set(ALL_MODELS)),
    ({"sub_type": "chat"}, set(ALL_MODELS)),
    ({"type": "text", "sub_type": "chat"}, set(ALL_MODELS)),
    ({"type": "image"}, set()),
    ({"type": "audio"}, set()),
    ({"sub_type": "embedding"}, set()),
    ({"sub_type": "reranker"}, set()),
    ({"type": "text", "sub_type": "embedding"}, set()),
    ({"type": "image", "sub_type": "chat"}, set()),
], ids=lambda v: str(v))
def test_models_filters(api, query, expected):
    r = api.http.get("/v1/models", params=query, headers=api.headers())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    assert {m["id"] for m in body["data"]} == expected


def test_models_sdk(client):
    ids = sorted(m.id for m in client.models.list())
    assert ids == sorted(ALL_MODELS)


def test_models_sdk_async(make_async_client):
    import asyncio

    async def main():
        async with make_async_client() as ac:
            return [m.id async for m in ac.models.list()]

    assert sorted(asyncio.run(main())) == sorted(ALL_MODELS)


# --- /health ----------------------------------------------------------------------------------


def test_health(api, checks):
    r = api.http.get("/health")  # no key needed
    assert r.status_code == 200, r.text
    checks.trace_headers(r)


# --- /metrics ---------------------------------------------------------------------------------


def test_metrics_format_and_names(api, checks):
    api.chat_ok({"model": MODEL, "messages": FRANCE, "max_tokens": 2})  # at least one request recorded
    r = api.http.get("/metrics")  # no key needed
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain"), r.headers["content-type"]
    checks.trace_headers(r)
    m = api.metrics()
    names = m.names()
    for name in REQUIRED_METRICS:
        assert name in names or f"{name}_bucket" in names, f"{name} missing from /metrics"
    for hist in ("lmserve_time_to_first_token_seconds", "lmserve_inter_token_latency_seconds"):
        assert m.types.get(hist) == "histogram", (hist, m.types.get(hist))
        buckets = m.series(f"{hist}_bucket")
        assert buckets and all("le" in lb for lb, _ in buckets), hist
        assert any(lb["le"] == "+Inf" for lb, _ in buckets), hist
        assert m.series(f"{hist}_count") and m.series(f"{hist}_sum"), hist
    for counter in ("lmserve_requests_total", "lmserve_prompt_tokens_total", "lmserve_generation_tokens_total"):
        assert m.types.get(counter) == "counter" or m.types.get(counter.removesuffix("_total")) == "counter", counter
    for gauge in ("lmserve_num_requests_running", "lmserve_num_requests_waiting", "lmserve_kv_cache_usage_ratio",
                  "lmserve_prefix_cache_hit_rate"):
        assert m.types.get(gauge) == "gauge", (gauge, m.types.get(gauge))
    reqs = m.series("lmserve_requests_total")
    assert reqs and all("model" in lb and "status" in lb for lb, _ in reqs), reqs


def test_metrics_idle_gauges(api):
    m = api.metrics()
    for model in (MODEL, PRO_MODEL):
        series = m.series("lmserve_kv_cache_usage_ratio", model=model)
        assert series, f"no kv_cache_usage_ratio for {model}"
        assert all(v == 0.0 for _, v in series), (model, series)
    assert m.value("lmserve_num_requests_running") == 0
    assert m.value("lmserve_num_requests_waiting") == 0
    for _, v in m.series("lmserve_prefix_cache_hit_rate"):
        assert 0.0 <= v <= 1.0


def _settled(api, check, timeout=60.0):
    """/metrics once `check` holds (metrics are settled after the response is sent), or at the
    deadline: generous, since a passing check returns at once."""
    deadline = time.monotonic() + timeout
    while True:
        m = api.metrics()
        if check(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_metrics_count_a_request(api):
    before = api.metrics()
    body = api.chat_ok({"model": PRO_MODEL, "messages": FRANCE, "max_tokens": 6, "temperature": 0})
    usage = body["usage"]

    def d(m, name, **labels):
        return m.value(name, **labels) - before.value(name, **labels)

    after = _settled(api, lambda m: d(m, "lmserve_requests_total", model=PRO_MODEL) >= 1
                     and d(m, "lmserve_generation_tokens_total") >= usage["completion_tokens"])
    assert d(after, "lmserve_requests_total", model=PRO_MODEL) == 1
    ok = [lb["status"] for lb, _ in after.series("lmserve_requests_total", model=PRO_MODEL)]
    assert ok, "no lmserve_requests_total series for the model"
    assert d(after, "lmserve_prompt_tokens_total") == usage["prompt_tokens"]
    assert d(after, "lmserve_generation_tokens_total") == usage["completion_tokens"]
    assert d(after, "lmserve_time_to_first_token_seconds_count") == 1
    assert d(after, "lmserve_inter_token_latency_seconds_count") >= 1
    assert d(after, "lmserve_time_to_first_token_seconds_sum") > 0


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"max_tokens": 100_000}], ids=["bad-param", "over-context"])
def test_metrics_count_400s_by_status(api, bad):
    """lmserve_requests_total counts requests by final status: a 400 for a known model is counted."""
    before = api.metrics()
    r = api.chat(dict({"model": PRO_MODEL, "messages": FRANCE}, **bad))
    assert r.status_code == 400, r.text
    after = _settled(api, lambda m: m.value("lmserve_requests_total") > before.value("lmserve_requests_total"))
    grew = {lb.get("status"): v - before.value("lmserve_requests_total", **lb)
            for lb, v in after.series("lmserve_requests_total", model=PRO_MODEL)
            if v > before.value("lmserve_requests_total", **lb)}
    assert grew == {"400": 1.0}, f"a 400 for {PRO_MODEL} was not counted as status=400: {grew}"
