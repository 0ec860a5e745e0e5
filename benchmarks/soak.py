"""Soak: one `lmserve serve` on a PostgreSQL and a Redis of its own, under mixed traffic for a
while (30 minutes by default), with a database restart and a Redis restart in the middle.

Traffic (client threads, round robin): streamed and non-streamed chat, n=2, a JSON schema, a
forced tool call, a client that leaves mid-stream, 4xx inputs, and a key held to 5 requests per
minute. Sampled every `--sample-s`: the server's RSS, open file descriptors, KV cache usage,
PostgreSQL connections, spool depth. At the end it checks that every answered request (200) has
exactly one ledger row and no request has two, and fits the RSS growth after warm-up:

    python benchmarks/soak.py --duration 1800            # the full run
    python benchmarks/soak.py --duration 60 --warmup 20 --max-growth-mb 40    # CI's short version

It fails (exit 1) on a missing or doubled ledger row, any 500, or RSS growth above
`--max-growth-mb-per-hour` after warm-up. On this shared 2-core machine the figures are noisy:
treat them as a leak detector, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

# The private PostgreSQL and Redis the fault-injection tests start (tests/support/private_services.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support
from tests.support.private_services import PrivatePostgres, PrivateRedis, die_with_parent, free_port  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BOOT, ADMIN = "sk-soak-boot", "sk-soak-admin"


class Traffic:
    """Client threads sending the mix; every response's status and trace id is kept."""

    def __init__(self, url: str, keys: dict[str, str]):
        self.url, self.keys = url, keys
        self.results: list[tuple[str, int, str | None, str | None]] = []  # kind, status, trace, error code
        self.stop = threading.Event()
        self.lock = threading.Lock()
        # 0 before the database restart, 1 between the restarts, 2 after the Redis restart: the
        # run proves something only if requests were answered in each
        self.phase = 0
        self.answered_by_phase = [0, 0, 0]

    def _chat(self, **body) -> dict:
        return {"model": MODEL, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 8,
                "temperature": 0.7, **body}

    def kinds(self):
        schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
        tool = {"type": "function", "function": {"name": "paint", "parameters": schema}}
        return [
            ("chat", "metered", "/v1/chat/completions", self._chat(), False),
            ("stream", "metered", "/v1/chat/completions", self._chat(stream=True), False),
            ("n2", "metered", "/v1/chat/completions", self._chat(n=2), False),
            ("schema", "metered", "/v1/chat/completions",
             self._chat(response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}),
             False),
            ("tools", "boot", "/v1/chat/completions",
             self._chat(tools=[tool], tool_choice={"type": "function", "function": {"name": "paint"}}), False),
            ("disconnect", "metered", "/v1/chat/completions", self._chat(stream=True, max_tokens=64), True),
            ("bad", "metered", "/v1/chat/completions", self._chat(temperature=-3), False),
            ("limited", "limited", "/v1/chat/completions", self._chat(), False),
            ("boot-stream", "boot", "/v1/completions",
             {"model": MODEL, "prompt": "Once upon", "max_tokens": 8, "stream": True}, False),
        ]

    def client(self, offset: int) -> None:
        kinds = self.kinds()
        i = offset
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self.stop.is_set():
                kind, who, path, body, leave = kinds[i % len(kinds)]
                i += 1
                headers = {"Authorization": f"Bearer {self.keys[who]}"}
                try:
                    with http.stream("POST", path, json=body, headers=headers) as r:
                        code = None
                        if leave and r.status_code == 200:
                            next(r.iter_lines())  # leave after the first line
                            status = 499
                        else:
                            raw = r.read()
                            status = r.status_code
                            if status >= 400:
                                try:
                                    code = json.loads(raw)["error"]["code"]
                                except (ValueError, KeyError, TypeError):
                                    code = "?"
                        trace = r.headers.get("x-request-id")
                except httpx.HTTPError as e:
                    status, trace, code = -1, None, type(e).__name__
                with self.lock:
                    self.results.append((kind, status, trace, code))
                    if status == 200:
                        self.answered_by_phase[self.phase] += 1


def metric(url: str, name: str) -> float:
    body = httpx.get(f"{url}/metrics", timeout=10).text
    values = [float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", body, re.M)]
    return sum(values)


def sample(pid: int, url: str, pg: PrivatePostgres) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    out = {"t": time.time(), "rss_mb": rss_kb / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    try:
        out["kv_usage"] = metric(url, "lmserve_kv_cache_usage_ratio")
        out["spool_rows"] = metric(url, "lmserve_usage_spool_rows")
    except httpx.HTTPError:
        pass
    try:
        engine = create_engine(pg.url, connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = 'postgres' AND pid <> pg_backend_pid()"
            out["db_connections"] = conn.execute(text(query)).scalar()
        engine.dispose()
    except Exception:
        out["db_connections"] = None  # the database is restarting
    return out


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (time s, value) in value per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return 0.0 if den == 0 else sum((t - mt) * (v - mv) for t, v in points) / den * 3600


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds of traffic")
    ap.add_argument("--warmup", type=float, default=120.0, help="seconds before RSS growth is measured")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--max-growth-mb-per-hour", type=float, default=100.0,
                    help="bound on the RSS slope after warm-up (checked when at least 3 samples follow it)")
    ap.add_argument("--max-growth-mb", type=float, default=None,
                    help="bound on the RSS growth after warm-up in MB (median of the last three samples minus "
                         "the median of the first three): the short run's bound, where a slope over two minutes "
                         "says little")
    ap.add_argument("--json", help="write the samples and the summary here")
    args = ap.parse_args()

    pg = PrivatePostgres()
    pg.start()
    work = Path(tempfile.mkdtemp(prefix="lmserve-soak-"))
    redis = PrivateRedis(work)
    port = free_port()
    (work / "config.yaml").write_text(f"""\
server:
  api_keys: ["{BOOT}"]
  stats_interval_s: 0
platform:
  database_url: "{pg.url}"
  redis_url: "{redis.url}"
  admin_keys: ["{ADMIN}"]
models:
  - id: {MODEL}
    path: {MODEL}
    engine: {{num_kv_blocks: 256, max_num_seqs: 16}}
    price: {{input: 1.0, output: 2.0}}
""")
    log = open(work / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "lmserve", "serve", "--config", str(work / "config.yaml"),
                               "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, LMSERVE_DATA_DIR=str(work), HF_HUB_OFFLINE="1"),
                              preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}"
    failures: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{(work / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        keys = {"boot": BOOT}
        for name, extra in (("metered", {}), ("limited", {"rpm": 5})):
            r = httpx.post(f"{url}/admin/keys", json={"account": f"soak-{name}", "balance": "1000", **extra},
                           headers=admin, timeout=30)
            r.raise_for_status()
            keys[name] = r.json()["key"]

        traffic = Traffic(url, keys)
        threads = [threading.Thread(target=traffic.client, args=(i * 2,), daemon=True) for i in range(args.clients)]
        started = time.monotonic()
        for t in threads:
            t.start()
        samples: list[dict] = []
        events = {"pg_restart": args.duration / 3, "redis_restart": 2 * args.duration / 3}
        next_sample = 0.0
        # the restarts happen even if sampling on a loaded machine made the loop overrun
        while (elapsed := time.monotonic() - started) < args.duration or events:
            if elapsed >= next_sample:
                samples.append({**sample(server.pid, url, pg), "elapsed": round(elapsed, 1)})
                next_sample += args.sample_s
            for name, at in list(events.items()):
                if elapsed >= at:
                    del events[name]
                    print(f"[{elapsed:6.0f} s] {name}", flush=True)
                    if name == "pg_restart":
                        pg.stop()
                        time.sleep(5)
                        pg.start()
                    else:
                        redis.stop()
                        time.sleep(3)
                        redis.start()
                    traffic.phase += 1
            time.sleep(0.5)
        traffic.stop.set()
        for t in threads:
            t.join(timeout=120)

        # every answered request has its row once the spool has drained
        spool_deadline = time.monotonic() + 60
        while metric(url, "lmserve_usage_spool_rows") > 0 and time.monotonic() < spool_deadline:
            time.sleep(0.5)
        results = traffic.results
        traces = [t for _, s, t, _ in results if t and s in (200, 499)]
        engine = create_engine(pg.url)
        with engine.connect() as conn:
            counts = dict(conn.execute(text("SELECT trace_id, COUNT(*) FROM usage GROUP BY trace_id")).all())
        engine.dispose()
        answered = [t for _, s, t, _ in results if s == 200]
        missing = [t for t in answered if counts.get(t, 0) == 0]
        doubled = [t for t, n in counts.items() if n > 1]
        status_counts: dict[str, int] = {}
        for _, s, _, code in results:
            key = f"{s}" + (f" {code}" if code else "")
            status_counts[key] = status_counts.get(key, 0) + 1
        after = [s for s in samples if s["elapsed"] >= args.warmup]
        growth = slope_per_hour([(s["t"], s["rss_mb"]) for s in after])
        rss = [s["rss_mb"] for s in after]
        grown_mb = (sorted(rss[-3:])[len(rss[-3:]) // 2] - sorted(rss[:3])[len(rss[:3]) // 2]) if rss else 0.0
        fd_growth = slope_per_hour([(s["t"], s["fds"]) for s in after])
        summary = {
            "duration_s": round(time.monotonic() - started, 1), "requests": len(results),
            "answered_200": len(answered), "answered_by_phase": traffic.answered_by_phase,
            "statuses": status_counts,
            "rows_missing": len(missing), "rows_doubled": len(doubled),
            "disconnects_with_row": sum(1 for t in traces if counts.get(t)),
            "rss_mb_first": round(after[0]["rss_mb"], 1) if after else None,
            "rss_mb_last": round(after[-1]["rss_mb"], 1) if after else None,
            "rss_growth_mb_per_hour": round(growth, 1), "rss_growth_mb": round(grown_mb, 1),
            "fds_growth_per_hour": round(fd_growth, 1),
            "fds_last": samples[-1]["fds"] if samples else None,
            "db_connections_max": max((s.get("db_connections") or 0) for s in samples) if samples else None,
            "samples": len(samples),
        }
        print(json.dumps(summary, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps({"summary": summary, "samples": samples}, indent=1))
        if missing:
            failures.append(f"{len(missing)} answered requests have no ledger row")
        if doubled:
            failures.append(f"{len(doubled)} requests have more than one ledger row")
        if any(s == 500 for _, s, _, _ in results):
            failures.append("500s were answered")
        if args.max_growth_mb is not None:
            if len(after) >= 6 and grown_mb > args.max_growth_mb:
                failures.append(f"RSS grew {grown_mb:.0f} MB after warm-up (bound {args.max_growth_mb})")
        elif len(after) >= 3 and growth > args.max_growth_mb_per_hour:
            failures.append(f"RSS grew {growth:.0f} MB/hour after warm-up (bound {args.max_growth_mb_per_hour})")
        if len(after) < 3 or (args.max_growth_mb is not None and len(after) < 6):
            failures.append(f"only {len(after)} samples after warm-up: too few to judge memory")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        redis.stop()
        pg.close()
        shutil.rmtree(work, ignore_errors=True)
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
