"""The key a keyless `lmserve serve` generates belongs to that server instance (issue 25): two
servers on one data directory each accept their own key and list both as active; a start that
fails leaves no key behind; a server that stops revokes its own key and nobody else's. `keys list`
says exactly what the running servers accept. Real servers, the real CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx

from .conftest import MODEL, _free_port, launch_server, stop_server

CONFIG = f"""\
server:
  stats_interval_s: 0
platform:
  data_dir: {{data_dir}}
models:
  - id: {MODEL}
    path: {MODEL}
    dtype: float32
    engine: {{{{num_kv_blocks: 32, max_num_seqs: 2}}}}
"""


def _generated_key(srv) -> str:
    found = re.search(r"API key:\s+(sk-\S+)\s+\(generated", srv.output())
    assert found, srv.output()
    return found.group(1)


def _keys(data_dir) -> list[dict]:
    run = subprocess.run([sys.executable, "-m", "lmserve", "keys", "list", "--all", "--json",
                          "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return [k for k in json.loads(run.stdout) if k["name"] == "generated (serve)"]


def _accepted(srv, key: str) -> bool:
    r = httpx.get(f"{srv.base_url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    return r.status_code == 200


def test_each_start_owns_only_its_generated_key(tmp_path):
    shared = tmp_path / "data"
    config = CONFIG.format(data_dir=shared)
    a = launch_server(_dir(tmp_path / "a"), config, LMSERVE_API_KEYS="")
    try:
        key_a = _generated_key(a)
        # A start that fails on its model (a directory that is no checkpoint) leaves no key behind.
        (tmp_path / "not-a-model").mkdir()
        failed = subprocess.run([sys.executable, "-m", "lmserve", "serve", "--model", str(tmp_path / "not-a-model"),
                                 "--data-dir", str(shared), "--port", str(_free_port())], capture_output=True,
                                text=True, timeout=300, env={**_env(), "LMSERVE_API_KEYS": ""})
        assert failed.returncode != 0, failed.stderr
        assert [k["status"] for k in _keys(shared)] == ["active"]

        b = launch_server(_dir(tmp_path / "b"), config, LMSERVE_API_KEYS="")
        try:
            key_b = _generated_key(b)
            assert key_a != key_b
            # B's start left A's key alone: both listed active, each accepted by its own server
            listed = _keys(shared)
            assert [k["status"] for k in listed] == ["active", "active"]
            assert _accepted(a, key_a) and _accepted(b, key_b)
            assert not _accepted(a, key_b) and not _accepted(b, key_a)
        finally:
            stop_server(b)
        # B stopped: its key is revoked (no server accepts it); A's is untouched and still works
        by_owner = {k["owner"].rsplit(":", 1)[1]: k["status"] for k in _keys(shared)}
        assert by_owner == {str(a.port): "active", str(b.port): "revoked"}
        assert _accepted(a, key_a)
    finally:
        stop_server(a)
    assert [k["status"] for k in _keys(shared)] == ["revoked", "revoked"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def _dir(path):
    path.mkdir()
    return path
