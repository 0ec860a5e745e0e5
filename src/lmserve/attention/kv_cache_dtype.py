"""What the KV cache stores: the compute dtype ("auto") or float8 e4m3 with per-layer scales.

An fp8 cache halves the bytes per token (twice the blocks, twice the tokens in flight for the same
memory) at the cost of e4m3's 3-bit mantissa on every cached key and value. As in vLLM, each
attention layer has a key scale and a value scale (`Attention.k_scale` / `v_scale`): a value is
stored as fp8(clamp(x / scale)) and read back as fp8 * scale in the compute dtype. The scales come
from the checkpoint where it has them (compressed-tensors' `kv_cache_scheme`, see
`kv_scale_target`), else 1.0, vLLM's default: e4m3 covers +-448, far beyond the keys and values of
the models we serve, and its relative precision (2^-4) is the same at every magnitude in its
normal range.

e5m2 (vLLM's `fp8_e5m2`) is refused: it trades a mantissa bit for range a scaled cache does not
need, doubling the rounding error.
"""

from __future__ import annotations

import re

import torch

# "fp8" and "fp8_e4m3" are one choice (vLLM's two names); engine/options.py mirrors these.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
FP8_E5M2_REFUSED = ("kv_cache_dtype fp8_e5m2 is not supported: lmserve stores an fp8 KV cache as e4m3 (one more "
                    "mantissa bit, per-layer scales for range); use fp8 or fp8_e4m3")
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_KV_DTYPE).max  # 448
# The largest relative rounding error of a value in e4m3's normal range: half a unit in the last
# of its 3 mantissa bits.
FP8_RELATIVE_ERROR = 2.0 ** -4


def kv_cache_torch_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The cache tensors' dtype for the option `kv_cache_dtype` and the model's compute dtype."""
    if kv_cache_dtype == "fp8_e5m2":
        raise ValueError(FP8_E5M2_REFUSED)
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {kv_cache_dtype!r}")
    return dtype if kv_cache_dtype == "auto" else FP8_KV_DTYPE


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_KV_DTYPE


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the compute dtype -> fp8(clamp(x / scale)); out-of-range values saturate rather than
    become NaN (a plain cast to e4m3fn would)."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def dequantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (x.float() * scale).to(dtype)


def store_rows(cache_rows: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, scale: float) -> None:
    """cache_rows[slots] = rows, quantized when the cache is fp8 (CPU has no index_copy_ for
    float8: the bytes are copied as uint8)."""
    if is_fp8(cache_rows):
        cache_rows.view(torch.uint8).index_copy_(0, slots, quantize(rows, scale).view(torch.uint8))
    else:
        cache_rows.index_copy_(0, slots, rows)


def read_rows(cache: torch.Tensor, index: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """cache.index_select(0, index), in the compute dtype."""
    rows = cache.index_select(0, index)
    return dequantize(rows, scale, dtype) if is_fp8(rows) else rows


# The names KV scales have in checkpoints (vLLM's maybe_remap_kv_scale_name reads the same):
# compressed-tensors' `self_attn.k_scale` / `v_scale`, its older `k_proj.output_scale` /
# `v_proj.output_scale`, and AutoFP8's `kv_scale` (one for keys and values, on self_attn or on
# k_proj / v_proj).
_KV_SCALE = re.compile(r"layers\.(\d+)\..*?(?:(k|v)_scale|(k|v)_proj\.(?:output|kv)_scale|(kv)_scale)$")


def kv_scale_target(name: str) -> tuple[int, tuple[str, ...]] | None:
    """A checkpoint tensor's (decoder layer index, the scales it sets: "k_scale" and/or
    "v_scale"), or None when it is no KV cache scale."""
    m = _KV_SCALE.search(name)
    if m is None:
        return None
    which = m.group(2) or m.group(3)
    return int(m.group(1)), (f"{which}_scale",) if which else ("k_scale", "v_scale")


def load_kv_scale(attention_layers: list, name: str, tensor: torch.Tensor) -> bool:
    """Set the scale(s) `name` holds on its layer's attention; False when it is no KV scale."""
    target = kv_scale_target(name)
    if target is None:
        return False
    index, scales = target
    if index >= len(attention_layers):
        raise ValueError(f"KV cache scale {name!r} names layer {index}; the model has {len(attention_layers)}")
    if tensor.numel() != 1:
        raise ValueError(f"KV cache scale {name!r} has {tensor.numel()} values; lmserve reads one per layer")
    value = float(tensor.float().item())
    if not value > 0.0 or value == float("inf"):
        raise ValueError(f"KV cache scale {name!r} is {value}; it must be a positive number")
    for scale in scales:
        setattr(attention_layers[index], scale, value)
    return True
