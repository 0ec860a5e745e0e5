"""Hostile input and overload through the real server: admission under a burst, bodies that are
not JSON objects, grammar and prompt work that must never stall the event loop, user text that
must never become control tokens, streams abandoned by their client."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
LIMITED = "test/SmolLM2-one-at-a-time"  # max_pending_requests: 1
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


class HealthWatchdog:
    """Polls /health every 50 ms on its own connection while the hostile request runs; any
    poll slower than `limit_s` means the event loop was blocked."""

    def __init__(self, url: str, limit_s: float = 1.0):
        self.url = url
        self.limit_s = limit_s
        self.slowest = 0.0
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(base_url=self.url, timeout=30.0) as http:
            while not self._stop.is_set():
                start = time.perf_counter()
                r = http.get("/health")
                took = time.perf_counter() - start
                assert r.status_code == 200, r.text
                self.slowest = max(self.slowest, took)
                self.polls += 1
                self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=35)
        assert self.polls >= 2, "the watchdog never got an answer"
        assert self.slowest <= self.limit_s, f"/health took {self.slowest:.2f} s: the event loop was blocked"


def _wait_until_free(api, model: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        r = api.chat({"model": model, "messages": FRANCE, "max_tokens": 1})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text


# --- admission ----------------------------------------------------------------------------------


def test_burst_admission_holds_the_cap(server, api):
    """Eight streams at once against a deployment that admits one: exactly one is served while it
    is held open, the others are 503 with Retry-After, whatever the interleaving."""
    body = {"model": LIMITED, "messages": STORY, "max_tokens": 200, "temperature": 0, "stream": True}

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as http:
            headers = api.headers()
            held = []

            async def one():
                req = http.build_request("POST", "/v1/chat/completions", json=body, headers=headers)
                r = await http.send(req, stream=True)
                held.append(r)
                return r.status_code, r.headers.get("retry-after")

            results = await asyncio.gather(*[one() for _ in range(8)])
            for r in held:
                await r.aclose()
            return results

    results = asyncio.run(main())
    statuses = sorted(s for s, _ in results)
    assert statuses.count(200) == 1, statuses
    assert statuses.count(503) == 7, statuses
    assert all(int(ra) >= 1 for s, ra in results if s == 503)
    _wait_until_free(api, LIMITED)


# --- bodies that are not JSON objects -----------------------------------------------------------


@pytest.mark.parametrize("raw", [b"[" * 100_000, b"{\"a\":" * 50_000, b"null", b"[]", b"1", b"\"text\"", b"true"])
def test_body_not_a_json_object_is_400(api, checks, raw):
    r = api.http.post("/v1/chat/completions", content=raw,
                      headers=api.headers(**{"content-type": "application/json"}))
    checks.error_body(r, 400, "invalid_request_error")


def test_lone_surrogate_anywhere_is_400(api, checks):
    tool = {"type": "function", "function": {"name": "f", "description": "bad \ud800 text",
                                             "parameters": {"type": "object"}}}
    raw = json.dumps({"model": MODEL, "messages": FRANCE, "max_tokens": 2, "tools": [tool]})
    r = api.http.post("/v1/chat/completions", content=raw.encode(),
                      headers=api.headers(**{"content-type": "application/json"}))
    body = checks.error_body(r, 400, "invalid_request_error")
    assert "surrogate" in body["error"]["message"]


# --- abandoned streams ------------------------------------------------------------------------


def test_abandoned_stream_counts_as_499(server, api):
    def count_499() -> float:
        return api.metrics().value("lmserve_requests_total", model=MODEL, status="499")

    before = count_499()
    body = {"model": MODEL, "messages": STORY, "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60.0) as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers=api.headers()) as r:
            assert r.status_code == 200
            trace = r.headers["x-request-id"]
            for line in r.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break  # generating: now walk away
    deadline = time.monotonic() + 5
    while count_499() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count_499() == before + 1
    while time.monotonic() < deadline and f"{trace} POST" not in server.output():
        time.sleep(0.05)
    line = next(x for x in server.output().splitlines() if f"{trace} POST" in x)
    assert " status=499 " in line, line
