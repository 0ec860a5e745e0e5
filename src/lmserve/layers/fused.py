"""Whether a layer runs Triton's fused kernels (layers/triton_ops.py) or its PyTorch ops.

Fused on CUDA tensors only, where the launches they save are what a small decode step waits on.
The CPU path stays the PyTorch ops, the reference the families are proven against. A
torch.compile'd forward keeps the PyTorch ops too: Inductor fuses them itself.

`triton_ops` imports Triton at module level, so it is imported here lazily, on the first CUDA
tensor: a CPU install without Triton never touches it. LMSERVE_FUSED_OPS=0 turns the kernels off
(read once), to compare against the unfused path on a GPU.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

import torch

log = logging.getLogger(__name__)


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


def use_fused(x: torch.Tensor) -> bool:
    """True when `x`'s op should run as a fused Triton kernel."""
    return x.is_cuda and not torch.compiler.is_dynamo_compiling() and _triton_ops() is not None


def ops() -> ModuleType:
    """The kernels module; call only after use_fused() said True."""
    return _triton_ops()
