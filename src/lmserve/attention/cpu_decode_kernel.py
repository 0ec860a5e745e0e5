"""CPU decode attention straight over the paged KV cache (AVX512), with no per-step gather.

Why: the reference backend's decode gathers every sequence's pages into [B, S, kv_heads, d] (a copy
of every cached key and value each step, each layer), hands SDPA a transposed, non-contiguous view,
and pads sequences of different lengths to their group's width. At 64 streams that was ~24% of a
step. cpu_decode_kernel.cpp instead walks each sequence's block table and reads each key and value
row where it lies in the engine's own layout [blocks, block_size, kv_heads, d]: the cache is read
once, nothing is written, each sequence attends over its own length. Keeping the layout keeps
everything else that touches the cache (prefill, copy-on-write block copies, the fp8 cache,
tensor parallelism, the Triton backend) as it is. The candidates measured against it, a head-major
cache layout among them, are in docs/benchmarks.md (benchmarks/bench_cpu_attention.py).

Numerics: scores, softmax and the weighted sum in fp32 (keys and values widened exactly), rounded
to the compute dtype once; PyTorch's CPU SDPA rounds the probabilities to bf16 before the value
product, so in bf16 the two differ by bf16 roundings (tests/attention/test_cpu_decode_attention.py).

Building: as layers/q4_kernel.py, compiled once per machine at first use by torch's extension
builder, cached under TORCH_EXTENSIONS_DIR. Where the CPU lacks AVX512, the build fails, or
LMSERVE_CPU_ATTENTION=torch is set, `available()` is False and decode keeps the gather + SDPA path
(the reason is logged once). Layers it does not cover (fp8 cache, heads over 256 values, more than 16
query heads per kv head) take that path too (`covers`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger("lmserve.engine")

_SOURCE = Path(__file__).with_name("cpu_decode_kernel.cpp")
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "f16c", "fma")
# -fopenmp: at::parallel_for is a header template that splits work only where the including file
# is compiled with OpenMP (without it the kernel runs on one thread). The library it links,
# libgomp.so.1, is the one torch has already loaded (same soname): one thread pool, torch's.
_BUILD_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mf16c", "-mfma"]
_LINK_FLAGS = ["-fopenmp"]
MAX_HEAD_DIM = 256
MAX_GROUP = 16  # query heads per kv head (kMaxGroup in the C++)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ENV = "LMSERVE_CPU_ATTENTION"
_lock = threading.Lock()
_enabled = True  # set_enabled: one engine, both paths (benchmarks/bench_engine.py --cpu-attention both)
_UNDECIDED = object()
_reason: str | None | object = _UNDECIDED


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used here (None: it is built and loaded). Decided once per process;
    threads that ask while it builds wait for the answer."""
    global _reason
    with _lock:
        if _reason is _UNDECIDED:
            _reason = _load()
        return _reason


def _load() -> str | None:
    if os.environ.get(ENV) == "torch":
        return f"{ENV}=torch"
    missing = [f for f in _CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    try:
        from torch.utils.cpp_extension import load

        log.info("loading the CPU paged decode attention kernel (built once per machine: tens of seconds at first)")
        load(name="lmserve_cpu_decode_attention", sources=[str(_SOURCE)], extra_cflags=_BUILD_FLAGS,
             extra_ldflags=_LINK_FLAGS, is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a build error: the gather + SDPA path instead
        return f"building {_SOURCE.name} failed: {type(e).__name__}: {str(e).strip()[-300:]}"
    torch.library.register_fake("lmserve_attn::paged_decode")(_fake_paged_decode)
    return None


def _fake_paged_decode(q, k_cache, v_cache, block_tables, seq_lens, window, scale, softcap):  # torch.compile's tracing
    return q.new_empty(q.shape)


def available() -> bool:
    reason = unavailable_reason()
    if reason is not None:
        _log_once(reason)
    return reason is None


@functools.cache
def _log_once(reason: str) -> None:
    log.info("CPU paged decode attention kernel unavailable (%s): decode attention gathers pages for SDPA", reason)


def set_enabled(on: bool) -> None:
    """Turn the kernel off (or back on) in this process without rebuilding anything: decode takes the
    gather path while off. For benchmarks comparing the two on one loaded engine."""
    global _enabled
    _enabled = on


def covers(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel computes this layer's decode attention (else the caller's gather path):
    CPU tensors of one float dtype (an fp8 cache is dequantized by the gather path), heads of
    at most MAX_HEAD_DIM values, at most MAX_GROUP query heads per kv head, and the kernel built."""
    return (_enabled and q.device.type == "cpu" and q.dtype in DTYPES and k_cache.dtype == q.dtype
            and q.shape[-1] <= MAX_HEAD_DIM and q.shape[-2] % k_cache.shape[2] == 0
            and q.shape[-2] // k_cache.shape[2] <= MAX_GROUP and k_cache.is_contiguous() and available())


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, window: int | None, scale: float, softcap: float | None) -> torch.Tensor:
    """q [B, Hq, D] (one token per sequence); caches [blocks, block_size, Hkv, D]; block_tables [B, W]
    (int64; entries past a sequence's length are not read); seq_lens [B] tokens to attend (the
    decode token's position + 1). Sequence b attends over tokens [max(0, len - window), len).
    Returns [B, Hq, D] in q's dtype."""
    return torch.ops.lmserve_attn.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, window or 0, scale,
                                               softcap or 0.0)
