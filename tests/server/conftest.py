"""The HTTP API suite: one real `lmserve serve` process (two deployments of the bundled SmolLM2),
driven by the official `openai` SDK (sync and async) and by raw httpx.

Everything here is session-scoped: the server starts once (20-40 s) and every test talks to it
over TCP, so these tests check the API exactly as a client sees it."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.private_services import die_with_parent

API_KEY = "sk-test-key"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PRO_MODEL = "Pro/HuggingFaceTB/SmolLM2-135M-Instruct"
LIMITED_MODEL = "test/SmolLM2-one-at-a-time"  # max_pending_requests: 1, for the 503 test
ALL_MODELS = [MODEL, PRO_MODEL, LIMITED_MODEL]
PRO_MAX_MODEL_LEN = 256
MAX_BODY_BYTES = 4 * 1024 * 1024
HEADER_TIMEOUT_S = 2  # connections without a whole request head after this are closed
STARTUP_TIMEOUT_S = 600.0  # generous: returns as soon as /health is 200; a loaded 2-core box is slow
CORS_ORIGIN = "http://ui.example"

CONFIG_YAML = f"""\
server:
  api_keys: ["{API_KEY}"]
  max_body_bytes: {MAX_BODY_BYTES}
  cors_origins: ["{CORS_ORIGIN}"]
  stats_interval_s: 1
  header_timeout_s: {HEADER_TIMEOUT_S}
defaults:
  max_tokens: 512
  temperature: 0.7
  top_p: 0.7
  top_k: 50
  frequency_penalty: 0.5
models:
  - id: {MODEL}
    path: HuggingFaceTB/SmolLM2-135M-Instruct
    dtype: float32
    engine: {{num_kv_blocks: 256, max_num_seqs: 64}}
  - id: {PRO_MODEL}
    path: HuggingFaceTB/SmolLM2-135M-Instruct
    dtype: float32
    report_eos_as_stop: true
    engine: {{num_kv_blocks: 256, max_model_len: {PRO_MAX_MODEL_LEN}}}
  - id: {LIMITED_MODEL}
    path: HuggingFaceTB/SmolLM2-135M-Instruct
    dtype: float32
    max_pending_requests: 1
    structured_output_timeout_s: 0.001  # any real compile overruns it: the time-bound test
    engine: {{num_kv_blocks: 64}}
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.url}/v1"

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "<no output captured>"


def launch_server(work: Path, config_text: str, **env_extra: str) -> Server:
    """Start `lmserve serve` on a free port with this config (its data dir in `work`) and wait
    until /health answers 200; fails the test with the server's output if it does not."""
    cfg = work / "config.yaml"
    cfg.write_text(config_text)
    log_path = work / "server.log"
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", LMSERVE_DATA_DIR=str(work), **env_extra)
    cmd = [sys.executable, "-m", "lmserve", "serve", "--config", str(cfg), "--host", "127.0.0.1",
           "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
    srv = Server(proc, port, log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"lmserve serve exited with {proc.returncode} before it was healthy:\n{srv.output()}")
            try:
                if httpx.get(f"{srv.url}/health", timeout=2.0).status_code == 200:
                    return srv
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"lmserve serve not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{srv.output()}")
            time.sleep(0.25)
    except BaseException:
        stop_server(srv)
        raise


def stop_server(srv: Server) -> None:
    if srv.proc.poll() is None:
        srv.proc.terminate()
        try:
            srv.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    srv = launch_server(tmp_path_factory.mktemp("lmserve-api"), CONFIG_YAML)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def client(server):
    import openai

    c = openai.OpenAI(api_key=API_KEY, base_url=server.base_url, max_retries=0, timeout=120.0)
    yield c
    c.close()


@pytest.fixture(scope="session")
def make_async_client(server):
    """AsyncOpenAI clients must live in the event loop that uses them: build one per asyncio.run."""
    import openai

    def factory(**kwargs):
        kwargs.setdefault("api_key", API_KEY)
        kwargs.setdefault("base_url", server.base_url)
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 120.0)
        return openai.AsyncOpenAI(**kwargs)

    return factory


# ---------------------------------------------------------------------------------------------
# raw HTTP helpers


class SSE:
    """One streamed response, parsed strictly: `data: ...` events separated by blank lines."""

    def __init__(self, response: httpx.Response, raw: str):
        self.response = response
        self.raw = raw
        self.events: list[str] = []
        assert raw.endswith("\n\n"), f"stream does not end with a blank line: {raw[-200:]!r}"
        for block in raw.replace("\r\n", "\n").split("\n\n"):
            if not block.strip():
                continue
            data_lines = [line[len("data:"):].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
            other = [line for line in block.split("\n") if line and not line.startswith(("data:", ":"))]
            assert not other, f"unexpected SSE fields {other!r} in event {block!r}"
            assert data_lines, f"SSE event without data: {block!r}"
            self.events.append("\n".join(data_lines))
        assert self.events and self.events[-1] == "[DONE]", f"stream not terminated by data: [DONE]: {raw[-300:]!r}"
        assert self.events.count("[DONE]") == 1
        self.chunks: list[dict] = [json.loads(e) for e in self.events[:-1]]

    def content(self, index: int = 0) -> str:
        return "".join((ch.get("delta") or {}).get("content") or ""
                       for c in self.chunks for ch in c.get("choices", []) if ch["index"] == index)

    def finish_reason(self, index: int = 0):
        reasons = [ch.get("finish_reason") for c in self.chunks for ch in c.get("choices", [])
                   if ch["index"] == index and ch.get("finish_reason")]
        assert len(reasons) == 1, f"choice {index}: finish_reason in {len(reasons)} chunks"
        return reasons[0]


class Api:
    """Raw httpx access to the running server."""

    def __init__(self, server: Server):
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=120.0)

    def headers(self, key: str | None = API_KEY, **extra) -> dict:
        h = {"Authorization": f"Bearer {key}"} if key is not None else {}
        h.update(extra)
        return h

    def chat(self, body: dict, key: str | None = API_KEY, **kwargs) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json=body, headers=self.headers(key), **kwargs)

    def chat_ok(self, body: dict) -> dict:
        r = self.chat(body)
        assert r.status_code == 200, f"{r.status_code}: {r.text}"
        return r.json()

    def stream(self, body: dict) -> SSE:
        body = dict(body, stream=True)
        with self.http.stream("POST", "/v1/chat/completions", json=body, headers=self.headers()) as r:
            raw = r.read().decode("utf-8")
        assert r.status_code == 200, f"{r.status_code}: {raw}"
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers["content-type"]
        return SSE(r, raw)

    def metrics(self) -> Metrics:
        r = self.http.get("/metrics")
        assert r.status_code == 200, f"{r.status_code}: {r.text}"
        return Metrics(r.text)

    def close(self):
        self.http.close()


@pytest.fixture(scope="session")
def api(server) -> Api:
    a = Api(server)
    yield a
    a.close()


# ---------------------------------------------------------------------------------------------
# Prometheus text format

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    def __init__(self, text: str):
        self.text = text
        self.samples: list[tuple[str, dict, float]] = []
        self.types: dict[str, str] = {}
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 4 and parts[1] == "TYPE":
                    self.types[parts[2]] = parts[3]
                continue
            m = _SAMPLE.match(line)
            assert m, f"not a Prometheus sample line: {line!r}"
            labels = dict(_LABEL.findall(m.group(2) or ""))
            self.samples.append((m.group(1), labels, float(m.group(3))))

    def names(self) -> set[str]:
        return {n for n, _, _ in self.samples} | set(self.types)

    def series(self, name: str, **labels) -> list[tuple[dict, float]]:
        return [(lb, v) for n, lb, v in self.samples
                if n == name and all(lb.get(k) == v2 for k, v2 in labels.items())]

    def value(self, name: str, **labels) -> float:
        """Sum over every series of `name` that matches `labels`."""
        return sum(v for _, v in self.series(name, **labels))


# ---------------------------------------------------------------------------------------------
# the reference tokenizer (transformers on the bundled GGUF)


@pytest.fixture(scope="session")
def hf_tokenizer():
    from transformers import AutoTokenizer

    from lmserve.models.loader import bundled_model_path

    p = bundled_model_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.fixture(scope="session")
def hf_model():
    """transformers' own SmolLM2 on the bundled file, float32 as the server runs it: the reference
    for logprobs and sampling rules."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmserve.models.loader import bundled_model_path

    p = bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def prompt_ids(hf_tokenizer):
    """A conversation's prompt ids as transformers renders and tokenizes it."""
    def ids(messages: list[dict]) -> list[int]:
        text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return hf_tokenizer.encode(text, add_special_tokens=False)

    return ids


@pytest.fixture(scope="session")
def count_prompt_tokens(hf_tokenizer):
    def count(messages: list[dict]) -> int:
        text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(hf_tokenizer.encode(text, add_special_tokens=False))

    return count


# ---------------------------------------------------------------------------------------------
# assertions shared by the error tests


_INTERNALS = re.compile(r'Traceback \(most recent call last\)|File "[^"]+", line \d+|\.py", line \d+|'
                        r'site-packages/|lmserve/server/')


def check_error_body(r: httpx.Response, status: int, type_: str | None = None, param="<any>") -> dict:
    """The double (OpenAI + platform) error body, the status, and the trace headers."""
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text}"
    assert "application/json" in r.headers.get("content-type", ""), r.headers.get("content-type")
    body = r.json()
    assert set(body) >= {"error", "code", "message", "data"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) >= {"message", "type", "param", "code"}, body
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    assert err["param"] is None or isinstance(err["param"], str), body
    assert err["code"] is None or isinstance(err["code"], str), body
    assert isinstance(body["code"], int) and not isinstance(body["code"], bool), body
    assert isinstance(body["message"], str) and body["message"], body
    assert body["data"] is None, body
    if type_ is not None:
        assert err["type"] == type_, body
    if param != "<any>":
        assert err["param"] == param, body
    assert not _INTERNALS.search(r.text), f"error body leaks internals: {r.text}"
    check_trace_headers(r)
    return body


def check_trace_headers(r: httpx.Response) -> str:
    trace = r.headers.get("x-siliconcloud-trace-id")
    rid = r.headers.get("x-request-id")
    assert trace, f"no x-siliconcloud-trace-id on {r.request.method} {r.request.url.path} ({r.status_code})"
    assert rid, f"no x-request-id on {r.request.method} {r.request.url.path} ({r.status_code})"
    assert trace == rid, (trace, rid)
    return trace


def metric_total(http: httpx.Client, name: str, **labels: str) -> float:
    """The sum of a Prometheus counter's samples on /metrics whose labels include `labels`."""
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="session")
def checks():
    """The assertion helpers, as a fixture (test modules do not import conftest)."""

    class C:
        error_body = staticmethod(check_error_body)
        trace_headers = staticmethod(check_trace_headers)
        metric_total = staticmethod(metric_total)

    return C




@pytest.fixture(scope="session")
def servers():
    """launch_server/stop_server for suites that need a server of their own config (as a fixture:
    test modules do not import conftest)."""

    class S:
        launch = staticmethod(launch_server)
        stop = staticmethod(stop_server)

    return S
