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


def default_cpu_threads() -> int:
    """One intra-op thread per physical core. Measured on a quiet 2-core host (docs/benchmarks.md),
    2 threads beat 1 at every concurrency (64 streams: 886 vs 631 tok/s) even with the server's
    own thread (HTTP, tokenizing, streaming) busy beside them. SMT siblings do not count: OpenMP
    threads wait for each other at the end of every op, so a thread that shares its core with a
    busy one stalls the whole step for a scheduler time slice. The same happens when another
    process keeps a core busy (2 threads then served 64 streams at 107 tok/s and 1 thread at
    564). That collapse came from threads spinning at the end of each op while the one they wait
    for had lost its core; with OMP_WAIT_POLICY=PASSIVE in the environment (README: shared hosts),
    2 threads under load matched 1 thread (docs/benchmarks.md, "Threads")."""
    return physical_cores()


_threads_fixed = False


def set_cpu_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (default: `default_cpu_threads`) before the engines start,
    so every thread that runs the model uses it; returns the number set. An explicit count is
    kept as it is; the default is the most the engines' thread tuner may use
    (engine/thread_tuner.py)."""
    global _threads_fixed
    _threads_fixed = threads is not None
    threads = threads or default_cpu_threads()
    torch.set_num_threads(threads)
    return threads


def cpu_threads_fixed() -> bool:
    """Whether the user set the thread count (`--threads N`): the engines then never change it."""
    return _threads_fixed
