"""Whether a layer runs fused kernels for its small ops (norms, rotary, gated activations) or its
PyTorch ops, and which: Triton's on CUDA (layers/triton_ops.py), our C++ ones on the CPU
(layers/cpu_fused_ops.py). Both have the same functions and keep the PyTorch ops' roundings.

Where they pay: a small decode step waits on per-op overhead (a launch on a GPU, Python and the
dispatcher on a CPU), which the fused ops cut several-fold. On the CPU they run for half types
only (bf16, fp16); a float32 model keeps the PyTorch ops, the reference the families are proven
against token for token. A torch.compile'd forward keeps the PyTorch ops too: Inductor fuses them
itself.

`triton_ops` imports Triton at module level, so it is imported here lazily, on the first CUDA
tensor: a CPU install without Triton never touches it. LMSERVE_FUSED_OPS=0 turns both off (read
once), to compare against the unfused path.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_CPU_DTYPES = (torch.bfloat16, torch.float16)
# The activation codes both kernel modules take for act(gate) * up.
ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with unit stride along the row (what both kernel modules read)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@functools.cache
def _triton_ops() -> ModuleType | None:
    if os.environ.get("LMSERVE_FUSED_OPS", "1") == "0":
        return None
    try:
        return importlib.import_module("lmserve.layers.triton_ops")
    except Exception as exc:  # no Triton, or one that cannot load here: the PyTorch ops
        log.warning("fused Triton kernels unavailable (%s): norms, rotary and MLP activations run as PyTorch ops",
                    type(exc).__name__)
        return None


@functools.cache
def _cpu_ops() -> ModuleType | None:
    if os.environ.get("LMSERVE_FUSED_OPS", "1") == "0":
        return None
    from lmserve.layers import cpu_fused_ops

    return cpu_fused_ops if cpu_fused_ops.available() else None


def use_triton(x: torch.Tensor) -> bool:
    """True when `x`'s op should run as a Triton kernel (CUDA)."""
    return x.is_cuda and not torch.compiler.is_dynamo_compiling() and _triton_ops() is not None


def use_fused(x: torch.Tensor) -> bool:
    """True when `x`'s op should run as a fused kernel: Triton's on CUDA, ours on the CPU for half types."""
    if x.is_cuda:
        return use_triton(x)
    # Cheapest tests first: this runs ~4 times per layer per step. Dynamo's test before _cpu_ops():
    # tracing into the extension's loader (a lock) stopped the compiled decode of bf16 models.
    return (x.dtype in _CPU_DTYPES and x.is_cpu and not torch.compiler.is_dynamo_compiling()
            and _cpu_ops() is not None)


def ops(x: torch.Tensor) -> ModuleType:
    """The kernels module for `x`'s device; call only after use_fused(x) said True."""
    return _triton_ops() if x.is_cuda else _cpu_ops()
