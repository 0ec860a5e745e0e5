"""RMSNorm in the two numerics the catalog uses.

Both follow transformers bit for bit, since the families are proven against it token for token.
On CUDA each is one fused Triton kernel with the same roundings, on the CPU (bf16/fp16) one C++ call
(layers/fused.py).
"""

from __future__ import annotations

import torch
from torch import nn

from lmserve.layers import fused


class RMSNorm(nn.Module):
    """Llama-style: normalize in fp32, cast back to the activation dtype, then scale by `w`."""

    gemma = False  # which numerics the fused kernel reproduces

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.shape = (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.use_fused(x):
            return fused.ops(x).rms_norm(x, self.weight, self.eps, gemma=self.gemma)
        # torch.rms_norm on the fp32 upcast computes transformers' five ops in one.
        return self.weight * torch.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, the norm of it): a decoder layer's residual add and the norm after it, one
        launch on CUDA instead of two (a batch-1 decode step is bound by such launches)."""
        if fused.use_fused(x):
            return fused.ops(x).rms_norm(x, self.weight, self.eps, gemma=self.gemma, delta=delta)
        total = x + delta
        return total, self(total)


class GemmaRMSNorm(RMSNorm):
    """Gemma-style: the stored weight is zero-centred; scale by (1 + w) in fp32, then cast back."""

    gemma = True

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.use_fused(x):
            return fused.ops(x).rms_norm(x, self.weight, self.eps, gemma=self.gemma)
        normed = torch.rms_norm(x.float(), self.shape, None, self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)
