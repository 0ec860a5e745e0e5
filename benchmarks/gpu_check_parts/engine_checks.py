"""Part engine: the check_* functions of tests/support/cuda_engine_checks.py."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from gpu_check_parts.common import free_device_memory
from gpu_check_parts.report import Report


def part_engine_checks(report: Report, device: torch.device) -> None:
    """Every `check_*` function of tests/support/cuda_engine_checks.py (the sampler's one sync per step,
    the KV cache sized by gpu_memory_utilization, and whatever is added there), so the one device
    run covers them; each returns a dict of numbers, a `directory` argument gets a fresh folder."""
    import inspect

    try:
        from tests.support import cuda_engine_checks
    except ImportError as e:
        report.skip("engine checks", f"tests/support/cuda_engine_checks.py cannot be imported here ({e})")
        return
    checks = [(name, fn) for name, fn in vars(cuda_engine_checks).items()
              if name.startswith("check_") and inspect.isfunction(fn) and fn.__module__ == cuda_engine_checks.__name__]
    if device.type != "cuda":
        report.skip("engine checks", f"{len(checks)} checks of tests/support/cuda_engine_checks.py need a CUDA device")
        return
    results = report.numbers.setdefault("engine_checks", {})
    for name, fn in checks:
        def run(name=name, fn=fn):
            with tempfile.TemporaryDirectory(prefix="gpu_check_engine_") as tmp:
                kwargs = {"directory": Path(tmp)} if "directory" in inspect.signature(fn).parameters else {}
                out = fn(**kwargs)
            free_device_memory(device)
            results[name] = out
            return json.dumps(out, default=str)[:300]

        report.check(f"engine: {name}", run, needs_s=10)
