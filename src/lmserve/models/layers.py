"""Layers shared by every model family: RMSNorm, rotary embedding, gated MLP, and the linear
layer whose weight can be pre-packed for the CPU.

Numerics follow transformers' reference implementations exactly (upcasts, cast points), since
the families are proven against it token for token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.models.config import ModelConfig


class Linear(nn.Linear):
    """nn.Linear that, once `pack()`ed, multiplies with a oneDNN pre-packed copy of its weight.

    On CPU, a bf16 F.linear reorders the whole weight into oneDNN's blocked layout on every call,
    which for decode (a few rows against a big weight) costs more than the product itself:
    packing once makes the bf16 decode matmuls about 2x faster, with bit-identical results (the
    same oneDNN kernel runs either way). The dense weight stays the parameter (state dict,
    loading, tied embeddings); a packed copy that no longer matches it is ignored.
    """

    _packed: torch.Tensor | None = None
    _packed_from: tuple[torch.Tensor, int] | None = None

    def pack(self) -> bool:
        w = self.weight
        if not can_pack(w):
            self._packed = self._packed_from = None
            return False
        with torch.no_grad():
            # The batch-size hint only picks the blocked layout; 1 (decode) was as good as or
            # better than 8 or 32 for every batch size measured, prefill included.
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
        self._packed_from = (w, w._version)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed
        if packed is not None:
            w, version = self._packed_from
            # Reloaded or edited weights (in place or replaced) invalidate the packed copy.
            if w is self.weight and w._version == version:
                return _linear_pointwise(x, packed, self.bias, "none", [], "")
            self._packed = self._packed_from = None
        return F.linear(x, self.weight, self.bias)


try:
    _linear_pointwise = torch.ops.mkldnn._linear_pointwise.default
except (AttributeError, RuntimeError):  # a torch build without oneDNN: nothing is ever packed
    _linear_pointwise = None


def can_pack(weight: torch.Tensor) -> bool:
    """Packing pays only for bf16 on CPU: for fp32, F.linear already runs MKL without a per-call
    reorder, and a different kernel would change rounding against transformers' reference."""
    if not (_linear_pointwise is not None and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.dim() == 2 and torch.backends.mkldnn.is_available()):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private op: absent in some builds
        return False


def pack_linears(model: nn.Module) -> int:
    """Pack every `Linear` of a loaded model (see `Linear`); returns how many were packed."""
    return sum(m.pack() for m in model.modules() if isinstance(m, Linear))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.shape = (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # transformers: h = x.float(); h * rsqrt(mean(h^2) + eps), cast back, then the weight.
        # torch.rms_norm on the fp32 upcast computes the same bits in one op instead of five.
        return self.weight * torch.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype)


def rope_inv_freq(dim: int, theta: float, scaling: dict | None, max_positions: int) -> torch.Tensor:
    """Inverse frequencies, with the Llama-3.1 ("llama3") and linear scaling rules applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if not scaling:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", max_positions)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


class RotaryEmbedding(nn.Module):
    """Half-split (NeoX) rotary embedding with a precomputed cos/sin table indexed by position.

    `lookup` runs once per step (every layer shares the step's positions); `apply` rotates
    queries and keys together when they are adjacent heads of one tensor.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        dim = config.head_dim
        inv_freq = rope_inv_freq(dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings)
        t = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        # Cast once here, as transformers casts cos/sin to the activation dtype before use. Both
        # halves of a row are equal, so keep the first, stacked as [cos | sin]: one index per step
        # fetches both.
        half = dim // 2
        table = torch.cat([emb.cos()[:, :half], emb.sin()[:, :half]], dim=-1)
        self.register_buffer("cos_sin", table.to(dtype), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, D/2], broadcasting over heads."""
        cs = self.cos_sin[positions].unsqueeze(1)
        return cs.chunk(2, dim=-1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] -> rotated copy. Same products and sums, in the same dtype, as
        transformers' x * cos + rotate_half(x) * sin (a + (-b) * s equals a - b * s exactly)."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # q: [T, Hq, D], k: [T, Hkv, D]
        cos, sin = self.lookup(positions)
        return self.apply(q, cos, sin), self.apply(k, cos, sin)


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up packed in one matmul."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        gate, up = gate_up[..., :self.intermediate], gate_up[..., self.intermediate:]
        return self.down_proj(F.silu(gate) * up)
