"""Operator-facing surface of the running server: probes, port conflicts, model retrieval."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from .conftest import API_KEY, MODEL, PRO_MODEL


def test_port_in_use_fails_fast_with_a_clear_message(server, tmp_path):
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "lmserve", "serve", "--port", str(server.port)], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, HF_HUB_OFFLINE="1", LMSERVE_DATA_DIR=str(tmp_path)))
    assert r.returncode == 1, r.stderr
    assert f"port {server.port} on 127.0.0.1 is already in use" in r.stderr
    assert "Traceback" not in r.stderr and "loading" not in r.stderr
    assert time.monotonic() - started < 15  # no model was loaded first


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


def test_probes_are_not_in_the_request_log(server, api):
    httpx.get(f"{server.url}/health/live")
    api.http.get("/v1/models", headers=api.headers())
    time.sleep(0.2)
    log = server.output()
    assert "GET /v1/models 200" in log
    assert "GET /health" not in log


def test_request_log_line_has_tokens_and_timing(server, client):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=5,
                                   temperature=0, extra_body={"ignore_eos": True})
    time.sleep(0.2)
    lines = [line for line in server.output().splitlines() if "POST /v1/chat/completions 200" in line]
    assert lines, server.output()[-2000:]
    line = lines[-1]
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
