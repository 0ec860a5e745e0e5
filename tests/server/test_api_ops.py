"""Operator-facing surface of the running server: probes, port conflicts, model retrieval."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from .conftest import API_KEY, MODEL, PRO_MAX_MODEL_LEN, PRO_MODEL


def test_port_in_use_fails_fast_with_a_clear_message(server, tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmserve", "serve", "--port", str(server.port)], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, HF_HUB_OFFLINE="1", LMSERVE_DATA_DIR=str(tmp_path)))
    assert r.returncode == 1, r.stderr
    assert f"port {server.port} on 127.0.0.1 is already in use" in r.stderr
    assert "Traceback" not in r.stderr and "loading" not in r.stderr
    # Fails before any model or database work (the port is bound first): nothing was loaded.
    assert "weights of" not in r.stderr + r.stdout and "platform database" not in r.stderr + r.stdout


def test_probes_when_ready(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    head = httpx.head(f"{server.url}/health")
    assert head.status_code == 200 and head.content == b""
    assert httpx.get(f"{server.url}/health/ready").status_code == 200
    assert httpx.get(f"{server.url}/health/live").json() == {"status": "alive", "phase": "ready"}


def test_models_retrieve(client, api, checks):
    m = client.models.retrieve(PRO_MODEL)  # an id with slashes
    assert (m.id, m.object) == (PRO_MODEL, "model")
    assert client.models.retrieve(MODEL).id == MODEL
    r = api.http.get("/v1/models/no/such-model", headers=api.headers())
    checks.error_body(r, 404, "not_found_error", "model")
    checks.error_body(api.http.get(f"/v1/models/{MODEL}"), 401)


def test_model_cards_carry_the_deployment_defaults(api):
    """What the playground shows greyed in each empty field: this deployment's defaults (the
    suite's config sets the platform's values) and its context length."""
    cards = {m["id"]: m for m in api.http.get("/v1/models", headers=api.headers()).json()["data"]}
    for m in cards.values():
        assert {"temperature": 0.7, "top_p": 0.7, "top_k": 50, "frequency_penalty": 0.5,
                "max_tokens": 512, "n": 1}.items() <= m["defaults"].items(), m
    assert cards[PRO_MODEL]["max_model_len"] == PRO_MAX_MODEL_LEN
    one = api.http.get(f"/v1/models/{PRO_MODEL}", headers=api.headers()).json()
    assert one["defaults"] == cards[PRO_MODEL]["defaults"] and one["max_model_len"] == PRO_MAX_MODEL_LEN


def test_web_ui_is_served_from_the_package(server, checks):
    """The pages and their modules come from the installed package, under a policy that allows
    this origin only (the browser tests in test_web_ui.py drive them)."""
    for page in ("/playground", "/console"):
        r = httpx.get(server.url + page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), (page, r.status_code)
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert "http://" not in r.text and "https://" not in r.text  # nothing fetched from elsewhere
    for asset in ("playground.js", "console.js", "api.js", "charts.js", "tabs.js", "app.css"):
        r = httpx.get(f"{server.url}/ui/{asset}")
        assert r.status_code == 200 and r.text, asset
        assert r.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript", "text/css")
        assert "https://" not in r.text, asset
    checks.error_body(httpx.get(f"{server.url}/ui/nope.js"), 404)
    checks.error_body(httpx.get(f"{server.url}/ui/../conftest.py"), 404)
    checks.error_body(httpx.post(f"{server.url}/playground"), 405)
    root = httpx.get(server.url + "/")
    assert root.status_code == 307 and root.headers["location"] == "/playground"


LOG_DEADLINE_S = 60.0


def _log_line(server, *parts: str) -> str:
    """The first server log line holding every part, waited for (the log is written asynchronously)."""
    deadline = time.monotonic() + LOG_DEADLINE_S
    while True:
        lines = [line for line in server.output().splitlines() if all(p in line for p in parts)]
        if lines:
            return lines[0]
        assert time.monotonic() < deadline, f"no log line with {parts}:\n{server.output()[-2000:]}"
        time.sleep(0.1)


def test_probes_are_not_in_the_request_log(server, api):
    httpx.get(f"{server.url}/health/live")
    r = api.http.get("/v1/models", headers=api.headers())
    # The line of the request made after the probe is there, so the probe's would be too.
    _log_line(server, "GET /v1/models 200", r.headers["x-request-id"])
    assert "GET /health" not in server.output()


def test_request_log_line_has_tokens_and_timing(server, client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True})
    line = _log_line(server, "POST /v1/chat/completions 200", raw.headers["x-request-id"])
    for field in ("prompt_tokens=", "completion_tokens=5", "ttft_ms=", "tok_per_s=", "latency_ms=", "request_id="):
        assert field in line, line
    assert API_KEY not in line


def test_stats_line_while_busy(server, client):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to ten"}],
                                   max_tokens=8, temperature=0)
    deadline = time.monotonic() + 10
    while "lmserve.stats: stats model=" not in server.output():
        assert time.monotonic() < deadline, server.output()[-2000:]
        time.sleep(0.2)
    line = [ln for ln in server.output().splitlines() if "lmserve.stats: stats model=" in ln][-1]
    for field in ("running=", "waiting=", "gen_tok_per_s=", "kv_cache_usage_pct=", "prefix_cache_hit_pct="):
        assert field in line, line
