"""An engine thread that dies, end to end: a real `lmserve serve` whose engine loop for one
deployment is killed mid-generation (a BaseException out of a step, as a fatal error in the model
code would raise). The streams in flight end with an error event, new requests get 503
engine_unavailable, /health and /health/live say which model died, and the other deployment
keeps serving.

The fault is injected from outside the product: a sitecustomize module on the server's
PYTHONPATH wraps LLMEngine.step to raise once a request carrying a marker stop string has
generated a few tokens."""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest

from .conftest import API_KEY, MODEL, SSE

DOOMED = "test/doomed-SmolLM2"
MARKER = "<<kill-the-engine-now>>"

CONFIG = f"""\
server:
  api_keys: ["{API_KEY}"]
models:
  - id: {MODEL}
    path: HuggingFaceTB/SmolLM2-135M-Instruct
    dtype: float32
    engine: {{num_kv_blocks: 64}}
  - id: {DOOMED}
    path: HuggingFaceTB/SmolLM2-135M-Instruct
    dtype: float32
    engine: {{num_kv_blocks: 64}}
"""

SITECUSTOMIZE = f"""\
import lmserve.engine.llm_engine as _m


class InjectedEngineFault(BaseException):
    pass


_step = _m.LLMEngine.step


def _step_or_die(self):
    for r in list(self.requests.values()):
        if {MARKER!r} in r.params.stop and any(s.num_output_tokens >= 2 for s in r.seqs):
            raise InjectedEngineFault("injected by tests/server/test_engine_death.py")
    return _step(self)


_m.LLMEngine.step = _step_or_die
"""

DEADLINE_S = 180.0  # generous: a busy 2-core machine


@pytest.fixture(scope="module")
def doomed_server(tmp_path_factory, servers):
    work = tmp_path_factory.mktemp("engine-death")
    inject = work / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH", "")) if p)
    srv = servers.launch(work, CONFIG, PYTHONPATH=path)
    yield srv
    servers.stop(srv)


def _stream_lines(http: httpx.Client, body: dict, lines: list[str], started: threading.Event) -> None:
    try:
        with http.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as r:
            for line in r.iter_lines():
                lines.append(line)
                if r.status_code == 200 and '"content":"' in line and '"content":""' not in line:
                    started.set()
            lines.append(f"status {r.status_code}")
    finally:
        started.set()


def _error_events(raw: str) -> list[dict]:
    sse = SSE(None, raw)  # strict SSE, ends with [DONE]
    return [c for c in sse.chunks if "error" in c]


def test_engine_death_ends_streams_and_reports_unhealthy(doomed_server, checks):
    http = httpx.Client(base_url=doomed_server.url, timeout=DEADLINE_S,
                        headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        assert http.get("/health").status_code == 200
        # A long stream in flight on the doomed deployment.
        victim: list[str] = []
        started = threading.Event()
        long_body = {"model": DOOMED, "messages": [{"role": "user", "content": "Tell me a long story."}],
                     "max_tokens": 900, "temperature": 0, "ignore_eos": True}  # within the 1,024-token cache
        reader = threading.Thread(target=_stream_lines, args=(http, long_body, victim, started), daemon=True)
        reader.start()
        assert started.wait(DEADLINE_S), "the victim stream never produced a token"
        assert not any("[DONE]" in line or line.startswith("status") for line in victim), victim[-3:]

        # The request that kills the engine (after its second token).
        with http.stream("POST", "/v1/chat/completions", json={
                "model": DOOMED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50,
                "ignore_eos": True, "stop": [MARKER], "stream": True}) as r:
            killer = r.read().decode()
        assert r.status_code == 200
        reader.join(DEADLINE_S)
        assert not reader.is_alive(), "the in-flight stream was left hanging"
        assert victim[-1] == "status 200", victim[-3:]
        for raw in (killer, "\n".join(victim[:-1]) + "\n"):
            raw = raw if raw.endswith("\n\n") else raw.rstrip("\n") + "\n\n"
            errors = _error_events(raw)
            assert len(errors) == 1, raw[-500:]
            assert errors[0]["error"]["code"] == "engine_unavailable", errors[0]

        # Health reports the dead model (liveness too: a restart is what fixes it).
        h = http.get("/health")
        assert h.status_code == 503 and h.json() == {"status": "unhealthy", "dead_models": [DOOMED]}, h.text
        live = http.get("/health/live")
        assert live.status_code == 503 and live.json()["dead_models"] == [DOOMED], live.text
        assert http.get("/health/ready").status_code == 503

        # New requests to it: a clear 503 with Retry-After, streamed or not.
        r = http.post("/v1/chat/completions", json={"model": DOOMED, "messages": [{"role": "user", "content": "x"}],
                                                   "max_tokens": 2})
        body = checks.error_body(r, 503)
        assert body["error"]["code"] == "engine_unavailable" and r.headers["Retry-After"] == "5"
        with http.stream("POST", "/v1/chat/completions", json={
                "model": DOOMED, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                "stream": True}) as r:
            raw = r.read().decode()
        if r.status_code == 200:  # the failure came after the stream opened: an error event
            assert _error_events(raw)[0]["error"]["code"] == "engine_unavailable"
        else:
            assert r.status_code == 503 and json.loads(raw)["error"]["code"] == "engine_unavailable"

        # The other deployment is untouched, and the process still answers.
        ok = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 4, "temperature": 0})
        assert ok.status_code == 200, ok.text
        assert doomed_server.proc.poll() is None
        log_deadline = time.monotonic() + DEADLINE_S
        while "engine loop crashed" not in doomed_server.output():
            assert time.monotonic() < log_deadline, doomed_server.output()[-2000:]
            time.sleep(0.2)
        assert "InjectedEngineFault" in doomed_server.output()
    finally:
        http.close()
