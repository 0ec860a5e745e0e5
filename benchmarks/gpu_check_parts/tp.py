"""Part tp: tensor parallelism on one device against the one-rank engine."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from gpu_check_parts.common import ENGINE_FIELDS, free_device_memory
from gpu_check_parts.report import CheckFailed, Report

TP_STEPS = 8


def part_tp(report: Report, device: torch.device) -> None:
    """Tensor parallelism where one GPU can prove it (docs/tensor_parallel.md): the executor with
    NCCL at one rank (the communicator's setup on this device), and two ranks sharing the GPU over
    gloo with CUDA tensors (the sharded layers and kernels); both serve family_checkpoints' WAVES
    in float32 and must give the one-rank engine's greedy tokens, logits within 1e-4 (2e-3 on
    CUDA, where the sharded matmuls sum in another order). On CPU (the smoke mode) gloo at two ranks."""
    from tests.support.family_checkpoints import assert_same_greedy_run, build_llama, serve_waves_greedy

    if "tensor_parallel_size" not in ENGINE_FIELDS:
        report.skip("tp", "this checkout's engine has no tensor_parallel_size")
        return
    atol = 2e-3 if device.type == "cuda" else 1e-4
    variants = ([("tp=1 nccl", {"tensor_parallel_size": 1, "distributed_backend": "nccl"}),
                 ("tp=2 gloo, CUDA tensors", {"tensor_parallel_size": 2, "distributed_backend": "gloo"})]
                if device.type == "cuda" else [("tp=2 gloo", {"tensor_parallel_size": 2})])
    with tempfile.TemporaryDirectory(prefix="gpu_check_tp_") as tmp:
        build_llama(Path(tmp))
        state = {}

        def reference():
            engine, state["reference"] = serve_waves_greedy(tmp, TP_STEPS, device=device.type)
            del engine
            free_device_memory(device)
            return f"{sum(len(t) for t, _ in state['reference'])} tokens"

        if report.check("tp: one-rank reference", reference, needs_s=20) is None:
            return
        results = report.numbers.setdefault("tp", {})
        for label, options in variants:
            def run(options=options, label=label):
                started = time.perf_counter()
                engine, got = serve_waves_greedy(tmp, TP_STEPS, device=device.type, **options)
                took = time.perf_counter() - started
                try:
                    assert_same_greedy_run(state["reference"], got, TP_STEPS, atol=atol)
                except AssertionError as e:
                    raise CheckFailed(f"{label}: differs from one rank: {str(e)[:300]}") from None
                finally:
                    engine.shutdown()
                    del engine
                    free_device_memory(device)
                results[label] = {"seconds": round(took, 2)}
                return f"greedy equal to one rank, logits within {atol:g} ({took:.1f}s with start)"

            report.check(f"tp: {label}", run, needs_s=25)
