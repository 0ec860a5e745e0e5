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

Building: lmserve/cpu_extensions.py, as layers/q4_kernel.py: compiled once per machine at first use
by torch's extension builder, cached under TORCH_EXTENSIONS_DIR. Where the CPU lacks AVX512, the build fails, or
LMSERVE_CPU_ATTENTION=torch is set, `available()` is False and decode keeps the gather + SDPA path
(the reason is logged once). Layers it does not cover (fp8 cache, heads over 256 values, more than 16
query heads per kv head) take that path too (`covers`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmserve.cpu_extensions import CpuExtension

MAX_HEAD_DIM = 256
MAX_GROUP = 16  # query heads per kv head (kMaxGroup in the C++)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ENV = "LMSERVE_CPU_ATTENTION"
_enabled = True  # set_enabled: one engine, both paths (benchmarks/bench_engine.py --cpu-attention both)


def _register_fakes() -> None:
    torch.library.register_fake("lmserve_attn::paged_decode")(_fake_paged_decode)
    torch.library.register_fake("lmserve_attn::paged_decode_write")(
        lambda q, k, v, kc, vc, slots, tables, lens, window, scale, softcap: q.new_empty(q.shape))


def _fake_paged_decode(q, k_cache, v_cache, block_tables, seq_lens, window, scale, softcap):  # torch.compile's tracing
    return q.new_empty(q.shape)


_KERNEL = CpuExtension(
    "lmserve_cpu_decode_attention", Path(__file__).with_name("cpu_decode_kernel.cpp"),
    "CPU paged decode attention kernel", needs=("avx512f", "avx512bw", "avx512vl", "avx512dq", "f16c", "fma"),
    isa_flags=("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"), env=ENV,
    fallback="decode attention gathers pages for SDPA", on_load=_register_fakes)
unavailable_reason = _KERNEL.unavailable_reason
available = _KERNEL.available


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


def paged_decode_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slots: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, window: int | None,
                       scale: float, softcap: float | None) -> torch.Tensor:
    """`paged_decode` after writing the step's keys and values k, v [B, Hkv, D] (unit stride along D)
    to their `slots` [B] in the caches: one call for a decode-only step's whole attention (the
    write's two index_copy_ and their views were ~9 us of a ~31 us layer's attention)."""
    return torch.ops.lmserve_attn.paged_decode_write.default(q, k, v, k_cache, v_cache, slots, block_tables, seq_lens,
                                                             window or 0, scale, softcap or 0.0)
