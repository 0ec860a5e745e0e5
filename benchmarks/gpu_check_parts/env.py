"""Part env: the device, library versions and the measured copy bandwidth."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import time

import torch

from gpu_check_parts.common import free_device_memory, sync
from gpu_check_parts.report import Report


def part_env(report: Report, device: torch.device) -> None:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "numpy", "safetensors", "tokenizers", "gguf", "pytest"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        versions["cuda"] = torch.version.cuda
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    report.numbers["device"] = name
    report.numbers["versions"] = versions
    print(f"device: {name}\nversions: {versions}", flush=True)
    if versions.get("transformers") and not str(versions["transformers"]).startswith(("5", "6")):
        print("note: the family checkpoints are written with transformers 5's config API (rope_parameters); "
              "an older transformers may build references with a different rope", flush=True)

    def bandwidth():
        gbs = measure_copy_bandwidth(device)
        report.numbers["copy_bandwidth_GBps"] = round(gbs, 1)
        return f"{gbs:.0f} GB/s (device-to-device copy, bytes read + written / time)"

    report.check("env: copy bandwidth", bandwidth)


def measure_copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy: the memory speed
    decode can reach at best (the roofline divides weight bytes by it)."""
    size = (2 << 30) if device.type == "cuda" else (128 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):  # warm-up: allocation, clocks
        dst.copy_(src)
    iters = 50 if device.type == "cuda" else 5
    sync(device)
    started = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    took = time.perf_counter() - started
    del src, dst
    free_device_memory(device)
    return 2 * size * iters / took / 1e9
