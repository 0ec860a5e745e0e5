"""Tensor parallelism through the real CLI and HTTP API (CPU, gloo).

- Two "nodes" on one machine (`--nnodes 2`, one rank each, a localhost rendezvous): node 0 serves,
  node 1 only runs its rank; the official openai SDK's answer equals a one-rank engine's, and
  node 1 exits when node 0 shuts down.
- A worker killed mid-request: the stream ends with a server error, /health/live turns 503, new
  requests get a 5xx, and shutting the server down leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from lmserve import LLM, SamplingParams
from tests.support.family_checkpoints import _widen

KEY = "sk-tp"
PROMPT = [504, 2372, 314, 253, 1345, 28, 2]  # token ids: the tokenizer is SmolLM2's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer (49,152 tokens), so the API has text."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmserve.models.loader import bundled_model_path

    bundled_gguf = bundled_model_path()
    directory = tmp_path_factory.mktemp("tp-serving")
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_gguf.parent), gguf_file=bundled_gguf.name)
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    _widen(LlamaForCausalLM(config)).save_pretrained(directory)
    return directory


def _serve(checkpoint: Path, port: int, tmp_path: Path, *flags: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", LMSERVE_DATA_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-m", "lmserve", "serve", "--model", f"tiny={checkpoint}",
                             "--port", str(port), "--api-key", KEY, "--threads", "1", "--dtype", "float32",
                             "--kv-cache-memory", "64MiB", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True)
                if "resource_tracker" not in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


def test_two_nodes_serve_what_one_rank_answers(checkpoint, tmp_path):
    import openai

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = LLM(str(checkpoint), dtype="float32").generate(PROMPT, params)[0].outputs[0]

    port, rendezvous = _free_port(), f"127.0.0.1:{_free_port()}"
    node0 = _serve(checkpoint, port, tmp_path, "-tp", "2", "--nnodes", "2", "--node-rank", "0",
                   "--dist-init-addr", rendezvous)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    node1 = subprocess.Popen([sys.executable, "-m", "lmserve", "serve", "--nnodes", "2", "--node-rank", "1",
                              "--dist-init-addr", rendezvous], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(node0, url)
        assert len(_descendants(node1.pid)) == 1 and not _descendants(node0.pid)  # rank 1 lives on node 1
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
        # The platform's default frequency penalty off: the one-rank reference samples plainly.
        answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0.0,
                                           frequency_penalty=0.0, extra_body={"ignore_eos": True})
        assert answer.choices[0].text == expected.text and answer.usage.completion_tokens == 12
    finally:
        err = _stop(node0)
    assert node0.returncode == 0, err
    assert node1.wait(timeout=30) == 0, node1.communicate()[1]


def test_a_killed_worker_fails_requests_and_liveness(checkpoint, tmp_path):
    port = _free_port()
    server = _serve(checkpoint, port, tmp_path, "--tensor-parallel-size", "2")
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 900, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    try:
        _wait_ready(server, url)
        (worker,) = _descendants(server.pid)
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line)
                if len(events) == 2:
                    worker.kill()  # mid-request
        # The stream's last event before [DONE] is the error (the status line was already sent).
        assert events[-1] == "data: [DONE]" and '"engine_unavailable"' in events[-2], events[-3:]
        live = httpx.get(f"{url}/health/live", timeout=5)
        assert live.status_code == 503 and live.json()["dead_models"] == ["tiny"], live.text
        again = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, headers=headers, timeout=30)
        assert again.status_code == 503 and again.json()["error"]["code"] == "engine_unavailable", again.text
        survivors = _descendants(server.pid)
    finally:
        _stop(server)
    assert not [p for p in survivors if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not _descendants(server.pid)
