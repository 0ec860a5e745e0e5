"""Rotary position embeddings: two pair layouts, partial rotation, and the scaling rules of the
catalog (linear, Llama-3.1, dynamic NTK, YaRN).

- neox (half-split): pair i is (x[i], x[i + d/2]). Llama, Qwen2, Gemma2, InternLM2, TeleChat2.
- interleaved (GPT-J): pair i is (x[2i], x[2i+1]). ChatGLM/GLM, DeepSeek-V2's rope part.
- partial: only the first `rotary_dim` channels of a head rotate; the rest pass through (GLM).

Every layer shares one table per model: `lookup` runs once per step, `apply` once per layer.
Numerics follow transformers: frequencies in fp32, cos/sin (times YaRN's attention factor) cast
to the activation dtype before use. On CUDA `apply` is one fused Triton kernel with the same
roundings, on the CPU (bf16/fp16) one C++ call (layers/fused.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lmserve.layers import fused

ROPE_STYLES = ("neox", "interleaved")
SCALING_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")


def normalize_rope_scaling(rope_scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Accept both spellings of the scaling type ("type" in older configs, "rope_type" in newer);
    None for no scaling. An unknown type fails here, at config time."""
    if not rope_scaling:
        return None
    out = dict(rope_scaling)
    rope_type = out.pop("type", None) or out.get("rope_type") or "default"
    if rope_type == "mrope":  # Qwen2-VL's name for plain rope in text-only use
        rope_type = "default"
    if rope_type not in SCALING_TYPES:
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: {', '.join(SCALING_TYPES)})")
    out["rope_type"] = rope_type
    return None if rope_type == "default" else out


def rope_context_length(max_position: int, scaling: dict | None) -> int:
    """The context a scaled rope serves: YaRN stretches the original window by `factor`; linear
    and dynamic NTK stretch the configured one (the rule vLLM applies). Llama-3.1 configs already
    state their extended length."""
    if not scaling or scaling["rope_type"] == "llama3":
        return max_position
    factor = float(scaling.get("factor", 1.0))
    if scaling["rope_type"] == "yarn":
        original = scaling.get("original_max_position_embeddings", max_position)
        return max(max_position, int(original * factor))
    return int(max_position * factor)


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict, max_position: int) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", max_position)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, base: float, scaling: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN frequencies and attention factor, as transformers' `_compute_yarn_parameters`."""
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings", max_position)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent a division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_frequencies(positions: torch.Tensor, dim: int, base: float, scaling: dict | None,
                     max_position: int) -> tuple[torch.Tensor, float]:
    """(angles [len(positions), dim/2] in fp32, attention factor) for the given scaling."""
    kind = scaling["rope_type"] if scaling else "default"
    attention_factor = 1.0
    if kind == "default":
        inv_freq = _base_inv_freq(dim, base)
    elif kind == "linear":
        inv_freq = _base_inv_freq(dim, base) / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(_base_inv_freq(dim, base), scaling, max_position)
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn(dim, base, scaling, max_position)
    elif kind == "dynamic":
        # transformers recomputes the base from the current sequence length once it passes the
        # trained window. A paged cache needs one fixed rotation per position, so: positions
        # inside the trained window use the original frequencies (exactly transformers' result
        # for every sequence that stays inside it), positions beyond use the base stretched for
        # the full scaled context (vLLM's choice).
        factor = scaling["factor"]
        inside = torch.outer(positions.float(), _base_inv_freq(dim, base))
        longest = max_position * factor
        stretched = base * ((factor * longest / max_position) - (factor - 1)) ** (dim / (dim - 2))
        beyond = torch.outer(positions.float(), _base_inv_freq(dim, stretched))
        return torch.where((positions < max_position).unsqueeze(1), inside, beyond), attention_factor
    else:
        raise ValueError(f"unsupported rope scaling type {kind!r}")
    return torch.outer(positions.float(), inv_freq), attention_factor


class RotaryEmbedding(nn.Module):
    """A cos/sin table over every position of the context, in the compute dtype.

    Stored as [cos | sin] of the rotary_dim/2 pair angles: one index per step fetches both.
    """

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, base: float,
                 scaling: dict | None = None, style: str = "neox", dtype: torch.dtype = torch.float32,
                 keep_dtype: bool = False):
        super().__init__()
        self.keep_dtype = keep_dtype  # the table stays in `dtype` when the model is cast
        if style not in ROPE_STYLES:
            raise ValueError(f"unknown rope style {style!r}")
        if rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and at most head_dim {head_dim}")
        self.head_dim, self.rotary_dim, self.style = head_dim, rotary_dim, style
        self.context_length = rope_context_length(max_position, scaling)
        positions = torch.arange(self.context_length)
        angles, attention_factor = rope_frequencies(positions, rotary_dim, base, scaling, max_position)
        table = torch.cat([angles.cos() * attention_factor, angles.sin() * attention_factor], dim=-1)
        self.register_buffer("cos_sin", table.to(dtype), persistent=False)

    def _apply(self, fn, recurse=True):
        if not self.keep_dtype:
            return super()._apply(fn, recurse)
        table = self.cos_sin
        super()._apply(fn, recurse)
        self.cos_sin = table.to(device=self.cos_sin.device)  # moved, never recast
        return self

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, rotary_dim/2], broadcasting over heads."""
        return self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, head_dim] -> rotated copy. The same products and sums, in the same dtype, as
        transformers' x * cos + rotate(x) * sin (a + (-b) * s equals a - b * s exactly)."""
        if fused.use_fused(x):
            return fused.ops(x).rotary(x, cos, sin, self.rotary_dim, self.style)
        if self.rotary_dim < self.head_dim:
            rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
            return torch.cat((self._rotate(rot, cos, sin), rest), dim=-1)
        return self._rotate(x, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.style == "neox":
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def get_rope(head_dim: int, max_position: int, base: float, scaling: dict | None = None,
             rotary_dim: int | None = None, style: str = "neox",
             dtype: torch.dtype = torch.float32, keep_dtype: bool = False) -> RotaryEmbedding:
    """The rotary embedding a family asks for (rotary_dim defaults to the whole head)."""
    return RotaryEmbedding(head_dim, rotary_dim or head_dim, max_position, base, scaling, style, dtype, keep_dtype)
