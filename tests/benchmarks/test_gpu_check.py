"""benchmarks/gpu_check.py (the device check a lent GPU runs once) in its CPU smoke mode, so the
script cannot rot between the rare sessions that have a GPU: two families' correctness checks
and the speed part on its tiny model, end to end, as a subprocess (as the device runs it); the
CUDA-only checks of tests/support/cuda_engine_checks.py are found and skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_mode_passes_end_to_end(tmp_path):
    # One intra-op thread: these models are tiny, and on a shared 2-core host two OpenMP threads
    # stall each other behind other processes (docs: device.default_cpu_threads).
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick",
                           "--parts", "engine,correctness,speed,plan", "--families", "llama,qwen2-moe",
                           "--requests", "4",
                           # the device's time limits are not this test's: a slow host must not skip checks
                           "--correctness-budget-s", "600", "--deadline-s", "600"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    for family in ("llama", "qwen2-moe"):
        # On CPU one variant: the reference attention backend (named once the engine has the option).
        ran = sorted(name.split("] ")[-1] for name in statuses if name.startswith(f"{family} ["))
        assert ran == ["bfloat16 greedy", "float32 greedy", "seeded sampling"], statuses
        assert statuses[f"{family}: build + CPU reference"] == "PASS"
    assert statuses.pop("engine checks") == "SKIP"  # tests/support/cuda_engine_checks.py: CUDA only, found and skipped
    assert set(statuses.values()) == {"PASS"}
    assert statuses["plan: tiny Llama shape, 2048 tokens / 256 seqs"] == "PASS"  # the planner vs the engine
    speed = report["numbers"]["speed"]
    assert speed["default_decode_tok_s"] > 0 and speed["default_offline"]["requests_done"] == 4
    assert speed["transformers_b1_tok_s"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| lmserve batch-1 decode" in table and "Correctness: 8 checks passed, 0 failed" in table


def test_gpu_check_tp_part_smoke(tmp_path):
    """The `tp` part on CPU: gloo at two ranks against one rank, through the same code the device
    runs (where it adds NCCL at one rank and gloo over CUDA tensors)."""
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--parts", "tp",
                           "--deadline-s", "600"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses == {"tp: one-rank reference": "PASS", "tp: tp=2 gloo": "PASS"}, report["checks"]
    assert report["numbers"]["tp"]["tp=2 gloo"]["seconds"] > 0
