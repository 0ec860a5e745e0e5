"""SIGTERM with streams in flight, on a server of its own: no new requests while draining,
short requests finish, long ones are ended after the grace period with the API's error event and
[DONE], and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
API_KEY = "sk-shutdown-test"
GRACE_S = 10.0  # the short stream needs one more engine step: seconds on a loaded 2-core box
CONFIG = f"""\
server:
  api_keys: ["{API_KEY}"]
  shutdown_grace_s: {GRACE_S}
models:
  - id: {MODEL}
    path: HuggingFaceTB/SmolLM2-135M-Instruct
    dtype: float32
    engine: {{num_kv_blocks: 128}}
"""
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
COUNT = [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]


class Stream(threading.Thread):
    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url = url
        # ignore_eos: a long stream must outlast the grace period even on a fast machine, where
        # the model could otherwise finish counting (and end with eos) inside it.
        self.body = {"model": MODEL, "messages": COUNT, "max_tokens": max_tokens, "temperature": 0,
                     "frequency_penalty": 0, "stream": True, "ignore_eos": True}
        self.generating = threading.Event()
        self.events: list[str] = []
        self.status = None

    def run(self):
        with httpx.Client(base_url=self.url, timeout=60.0) as http:
            with http.stream("POST", "/v1/chat/completions", json=self.body, headers=HEADERS) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: "):])
                        if '"content":"' in line and '"content":""' not in line:
                            self.generating.set()
        self.generating.set()


def test_sigterm_drains_then_ends_long_streams(tmp_path, servers):
    srv = servers.launch(tmp_path, CONFIG)
    try:
        long_streams = [Stream(srv.url, 1500) for _ in range(3)]
        short = Stream(srv.url, 2)
        for s in long_streams:
            s.start()
        for s in long_streams:
            assert s.generating.wait(60), "a long stream never started generating"
        short.start()
        assert short.generating.wait(60)
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)

        # Draining: new requests and /health are refused, in-flight streams go on for the grace period.
        with httpx.Client(base_url=srv.url, timeout=10.0) as http:
            while True:
                health = http.get("/health")
                if health.status_code == 503:
                    break
                # Draining shows while the grace period runs (the streams below are still going).
                assert time.monotonic() - signalled < GRACE_S, "/health never reported draining"
            assert health.json()["status"] == "draining"
            r = http.post("/v1/chat/completions", headers=HEADERS,
                          json={"model": MODEL, "messages": COUNT, "max_tokens": 2})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "server_shutting_down"

        for s in [*long_streams, short]:
            s.join(30)
            assert not s.is_alive(), "a stream was never ended"
            assert s.status == 200
        ended = time.monotonic() - signalled
        assert ended >= GRACE_S - 0.1, f"streams were cut after {ended:.2f} s, before the grace period"

        # The short one finished on its own; each long one got the error event, then [DONE].
        assert short.events[-1] == "[DONE]"
        assert json.loads(short.events[-2])["choices"][0]["finish_reason"] == "length", short.events[-2:]
        for s in long_streams:
            assert s.events[-1] == "[DONE]", s.events[-3:]
            error = json.loads(s.events[-2])
            assert error["error"]["code"] == "server_shutting_down", error
            assert error["error"]["type"] == "overloaded_error"

        # Every stream ended, each with its ledger row written or spooled before its [DONE], well
        # before a kubelet's SIGKILL at grace + 5 s (the default 25 s of 30 s). (Stopping the engine
        # thread after that waits for its current step: seconds on a loaded 2-core machine.)
        assert ended <= GRACE_S + 5, f"the streams took {ended:.1f} s to end after SIGTERM"
        assert srv.proc.wait(timeout=30) == 0, srv.output()[-3000:]
        assert "Traceback" not in srv.output(), srv.output()[-3000:]
    finally:
        servers.stop(srv)


def test_the_default_grace_fits_kubernetes_default_termination_period():
    from lmserve.config import ServerSettings

    # terminationGracePeriodSeconds defaults to 30 s; what follows the grace takes about 5 s
    assert ServerSettings().shutdown_grace_s == 25.0
