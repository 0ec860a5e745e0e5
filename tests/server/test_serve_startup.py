"""Start and stop through the real CLI: the port is bound before the models load, the server
says `loading` meanwhile, and Ctrl-C during the load is one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loading_state_then_ctrl_c_is_one_line(tmp_path):
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", LMSERVE_DATA_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "lmserve", "serve", "--port", str(port), "--api-key", "sk-t",
                             "--log-format", "json", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # the port answers long before the model is loaded
            assert proc.poll() is None, proc.communicate()
            try:
                health = httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the port was never bound"
                time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "loading", health.text
        assert health.headers["retry-after"]
        assert httpx.head(f"{url}/health", timeout=2).status_code == 503
        live = httpx.get(f"{url}/health/live", timeout=2)
        assert live.status_code == 200 and live.json() == {"status": "alive", "phase": "loading"}
        assert httpx.get(f"{url}/health/ready", timeout=2).status_code == 503
        api = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer sk-t"}, timeout=2,
                         json={"model": "x", "messages": [{"role": "user", "content": "hi"}]})
        assert api.status_code == 503 and api.headers["retry-after"] == "5", api.text
        assert api.json()["error"]["code"] == "model_loading"

        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert lines[-1] == "lmserve serve: stopped while loading", err
        # --log-format json: every log line before it is one JSON object with structured fields
        records = [json.loads(line) for line in lines[:-1] if line.strip()]
        assert any(r["logger"] == "lmserve.server" and "listening" in r["message"] for r in records), err
        assert any(r["message"] == "CPU threads for the model: 1" for r in records), err
        access = [r for r in records if r["logger"] == "lmserve.access"]
        assert access and access[-1]["path"] == "/v1/chat/completions" and access[-1]["status"] == 503
        assert not any(r.get("path") == "/health" for r in access)  # probes are not logged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
