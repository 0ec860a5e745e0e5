"""A PostgreSQL and a Redis of a test's own, for fault injection: stopped, restarted or frozen
(SIGSTOP) by the test. Never the shared instances of platform_services.py, which other
checkouts' tests use at the same time. Started as .ci/services.sh starts the shared ones
(initdb into a temporary directory, run as the `postgres` user when the tests run as root)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def die_with_parent() -> None:
    """`preexec_fn` for a test's server: the kernel sends it SIGTERM when the process that started it
    dies, so a pytest killed mid-run (or a timed-out soak) leaves no `lmserve serve` behind. Fires
    when the starting *thread* exits: start servers from the main thread (pytest's fixtures do)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not found:
        pytest.fail("PostgreSQL binaries not found (bash .ci/services.sh installs them)", pytrace=False)
    return found[-1]


class PrivatePostgres:
    def __init__(self):
        self.bin = _pg_bin()
        # Under /tmp itself: pytest's tmp_path is private to root, where the postgres user cannot go.
        self.work = Path(tempfile.mkdtemp(prefix="lmserve-private-pg-"))
        self.data = self.work / "pg"
        self.port = free_port()
        self.data.mkdir()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            subprocess.run(["chown", "-R", "postgres:postgres", str(self.work)], check=True)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            pytest.fail(f"{tool} failed: {run.stdout[-2000:]}{run.stderr[-2000:]}", pytrace=False)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.data / "log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.work, ignore_errors=True)


class PrivateRedis:
    """A redis-server on its own port; `stop()` then `start()` restarts it on the same port."""

    def __init__(self, work: Path):
        self.port, self.work = free_port(), work
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.work)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    pytest.fail("the private redis-server did not start", pytrace=False)
                time.sleep(0.05)
        client.close()

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.thaw()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    close = stop
