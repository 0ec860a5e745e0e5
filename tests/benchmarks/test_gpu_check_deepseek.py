"""benchmarks/gpu_check.py's deepseek part (the MLA and fused-MoE kernels against the reference
paths, then the DeepSeek-V2-Lite shape served) and attention part (decode in one pass vs split
keys) in their CPU smoke mode, as a subprocess as the device runs them: the kernels under Triton's
interpreter on small sizes, the engine on a tiny model of the same structure, so the parts cannot
rot between the rare sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_deepseek_and_attention_parts_smoke_mode_pass(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--parts", "deepseek,attention",
                           "--deadline-s", "600"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses == {name: "PASS" for name in (
        "deepseek: MLA decode kernel vs reference", "deepseek: fused MoE kernel vs eager experts",
        "deepseek: V2-Lite shape load + warm-up", "deepseek: V2-Lite batch-1 decode",
        "deepseek: V2-Lite offline throughput", "deepseek: V2-Lite profile",
        "attention: decode one pass vs split keys")}, statuses
    numbers = report["numbers"]["deepseek"]
    assert numbers["mla_kernel"]["mixed"]["fp32_max_err"] < 1e-4
    assert numbers["offline"]["requests_done"] == 4 and numbers["decode_tok_s"] > 0
    assert report["numbers"]["decode_single_pass"]["batches"]["1"]["contexts"]["16"]["splits"] == 2
    table = (tmp_path / "gpu_check.md").read_text()
    assert "DeepSeek-V2-Lite shape (MLA + MoE" in table and "Decode attention, 8B layer shape" in table
