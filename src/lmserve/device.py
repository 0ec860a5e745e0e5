"""Device and compute-dtype choice."""

from __future__ import annotations

import functools
import os

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls beat fp32 only where the CPU has native bf16 (AVX512-BF16 or AMX)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings count once): the
    matmul kernels saturate a core's vector units with one thread, and a second thread on its
    sibling only contends for them."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        try:
            topo = f"/sys/devices/system/cpu/cpu{cpu}/topology"
            cores.add((open(f"{topo}/physical_package_id").read().strip(), open(f"{topo}/core_id").read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def set_cpu_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (default: the physical cores) before the engines start, so
    every thread that runs the model uses it; returns the number set. More threads than cores is
    the costly mistake: OpenMP threads that share a core with another busy thread wait for each
    other at every op (measured 4-8x slower steps on a 2-core host), which is why SMT siblings
    do not count."""
    threads = threads or physical_cores()
    torch.set_num_threads(threads)
    return threads
