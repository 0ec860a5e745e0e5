"""The soak benchmark's short version (issue 21): `benchmarks/soak.py` for 60 seconds of mixed
traffic against one server on a PostgreSQL and a Redis of its own, both restarted mid-run. The
30-minute run's figures are in docs/operations.md; this one proves, on every CI run, that every
answered request has exactly one ledger row through both restarts, that nothing answered 500,
and that the server's memory stays within a stated bound after warm-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.private_services import die_with_parent

ROOT = Path(__file__).resolve().parents[2]


def test_short_soak_loses_no_row_and_holds_memory(tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--duration", "60", "--warmup", "20",
           "--clients", "3", "--sample-s", "5", "--max-growth-mb", "40", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, preexec_fn=die_with_parent,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, f"soak failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    summary = json.loads(out.read_text())["summary"]
    # the run did what it says: traffic through both restarts, answered and metered
    # answered before the database restart, between the restarts and after the Redis one (a count,
    # not a rate: a loaded 2-core box answers a few per phase, a quiet one hundreds)
    assert all(n >= 1 for n in summary["answered_by_phase"]), summary
    assert summary["rows_missing"] == 0 and summary["rows_doubled"] == 0, summary
    assert not any(status.startswith("500") for status in summary["statuses"]), summary
    assert summary["rss_growth_mb"] <= 40, summary
