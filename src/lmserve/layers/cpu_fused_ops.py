"""A decoder layer's small ops as one C++ call each on the CPU (cpu_fused_ops.cpp): RMSNorm with
the residual add before it, rotary, act(gate) * up. The CPU twin of triton_ops.py, with the same
functions; layers/fused.py decides which runs.

Why: on a CPU a batch-1 decode step is bound by dispatch, not arithmetic. Each PyTorch op costs
~3-5 us of Python and dispatcher on the 2-core boxes (a 576-wide norm computes in well under
one), and a Llama layer in PyTorch ops is ~67 of them: an RMSNorm is four (upcast, norm, downcast,
scale), the residual add and norm five, a rotary apply twelve (chunk, four products, a
difference, a sum, a concatenation and their views), the gated activation four. Measured on
SmolLM2 at batch 1: ~7.5 ms of a ~23 ms step was the ops between the matmuls
(docs/benchmarks.md, "Fused CPU ops").

Numerics: the PyTorch modules' roundings, as the Triton kernels keep them; only half types run here
(bf16, fp16: the serving dtypes). A float32 model keeps PyTorch's ops, the reference the families
are proven against token for token (the norm's fp32 sum of squares is reduced in another order
here, which a float32 comparison would see).

Built by lmserve/cpu_extensions.py at first use (plain C++, no ISA flags); where it cannot build,
or LMSERVE_FUSED_OPS=0, the layers keep PyTorch's ops.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmserve.cpu_extensions import CpuExtension, cpu_flags
from lmserve.layers.fused import ACT_CODES, as_rows


def _register_fakes() -> None:  # shapes for torch.compile's tracing
    lib = "lmserve_fused::"
    torch.library.register_fake(lib + "rms_norm")(lambda x, w, eps, gemma: x.new_empty(
        x.shape, dtype=x.dtype if gemma else torch.promote_types(w.dtype, x.dtype)))
    torch.library.register_fake(lib + "add_rms_norm")(lambda x, d, w, eps, gemma: (x.new_empty(x.shape), x.new_empty(
        x.shape, dtype=x.dtype if gemma else torch.promote_types(w.dtype, x.dtype))))
    torch.library.register_fake(lib + "gated_act")(lambda g, n, act: g.new_empty(g.shape[0], n))
    torch.library.register_fake(lib + "rotary")(lambda x, c, s, r, i: x.new_empty(
        x.shape, dtype=torch.promote_types(x.dtype, c.dtype)))


# Built with AVX512 where the CPU has it (the bf16 silu runs 16 lanes at a time), under a name of its
# own, so that a build cached on an AVX512 machine is never loaded on one without.
_AVX512 = {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags()
_KERNELS = CpuExtension(
    "lmserve_cpu_fused_ops" + ("_avx512" if _AVX512 else ""), Path(__file__).with_name("cpu_fused_ops.cpp"),
    "CPU fused norm/rotary/activation ops", needs=(),
    # No fused multiply-add contraction: PyTorch rounds each product before the sum (float32 outputs
    # of a float32 rope table would differ in the last bit otherwise).
    isa_flags=("-ffp-contract=off", *(("-mavx512f", "-mavx512bw", "-mavx512vl") if _AVX512 else ())),
    env="LMSERVE_FUSED_OPS_CPU", fallback="norms, rotary and activations run as PyTorch ops",
    on_load=_register_fakes)


def available() -> bool:
    return _KERNELS.available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool,
             delta: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """As triton_ops.rms_norm: the norm of x, or with `delta` (x + delta, the norm of it)."""
    x2 = as_rows(x)
    if delta is None:
        out = torch.ops.lmserve_fused.rms_norm(x2, weight, eps, gemma)
        return out if x.dim() == 2 else out.view(x.shape)
    total, out = torch.ops.lmserve_fused.add_rms_norm(x2, as_rows(delta), weight, eps, gemma)
    return (total, out) if x.dim() == 2 else (total.view(x.shape), out.view(x.shape))


def gated_act(gate_up: torch.Tensor, intermediate: int, activation: str) -> torch.Tensor:
    """As triton_ops.gated_act: act(gate) * up for gate_up [..., 2 * intermediate], gate first."""
    out = torch.ops.lmserve_fused.gated_act(as_rows(gate_up), intermediate, ACT_CODES[activation])
    return out if gate_up.dim() == 2 else out.view(*gate_up.shape[:-1], intermediate)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, style: str) -> torch.Tensor:
    """As triton_ops.rotary: x [T, H, D] (unit stride along D), cos/sin [T, 1, rotary_dim/2] -> a new
    contiguous tensor with the first rotary_dim channels of each head rotated, the rest copied."""
    return torch.ops.lmserve_fused.rotary(x, cos, sin, rotary_dim, style == "interleaved")
