"""Fused Triton kernels for a decoder layer's small ops on CUDA: RMSNorm, rotary, act(gate) * up.

Batch-1 decode of a large model launches a few dozen tiny kernels per layer besides the matmuls
(an RMSNorm in PyTorch is four: upcast, norm, downcast, scale; a rotary apply seven: four
products, a difference, a sum, a concatenation; the gated activation two), and on a GPU each
launch costs about as much as it computes. Each op here is one launch.

They reproduce the PyTorch modules' numerics (layers/norm.py, rotary.py, mlp.py) rounding for
rounding: every intermediate that PyTorch materializes in the activation dtype is rounded to that
dtype here too (`.to(dt).to(tl.float32)`), and products/sums are done in float32 as PyTorch's
kernels do for half types. The product of two bf16/fp16 values is exact in float32, so one
rounding of it equals PyTorch's. What may differ: the order of the RMSNorm's fp32 sum of squares,
and the last bits of exp/erf (another math library than PyTorch's kernels).

Called only for CUDA tensors (layers/fused.py decides) and, in tests, on CPU tensors under
Triton's interpreter (TRITON_INTERPRET=1). Every wrapper allocates its output and launches with a
grid from shapes alone: no host synchronisation, so decode steps stay CUDA-graph capturable.
Only long-standing `tl` ops are used (tanh is written with exp), for the GPU image's Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmserve.layers.fused import ACT_CODES, as_rows  # ACT_CODES: ACTIVATION constexpr, one variant each


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, delta_ptr, sum_ptr, stride_x, stride_out, stride_delta, stride_sum,
                     n_cols, eps, GEMMA: tl.constexpr, ADD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        # The residual add before the norm: PyTorch adds in float32 and rounds the sum to the
        # dtype (a tensor of its own, the next residual), which is what gets normalized.
        delta = tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + delta).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
        x = x.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    normed = x * (1.0 / tl.sqrt(mean_sq + eps))
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:
        # (normed * (1 + w.float())).to(dtype)
        y = normed * (1.0 + w)
    else:
        # weight * normed.to(dtype): the normalized row is rounded before the scale.
        y = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool,
             delta: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, as layers/norm.py's RMSNorm (gemma=False: `weight *
    rms_norm(x.float()).to(x.dtype)`) or GemmaRMSNorm (gemma=True: scale by 1 + w in fp32).

    With `delta`: the residual add first, in the same launch: returns (x + delta, the norm of it)."""
    shape = x.shape
    n = shape[-1]
    x2 = as_rows(x)
    out_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if delta is not None:
        d2 = as_rows(delta)
        total = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, delta.dtype), device=x.device)
    else:
        d2 = total = x2  # unused
    if x2.shape[0] != 0:
        block = triton.next_power_of_2(n)
        num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, d2, total, x2.stride(0), out.stride(0), d2.stride(0),
                                         total.stride(0), n, eps, GEMMA=gemma, ADD=delta is not None,
                                         BLOCK=block, num_warps=num_warps)
    if delta is None:
        return out.view(shape)
    return total.view(shape), out.view(shape)


@triton.jit
def _gated_act_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, n_cols,
                      ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    # The formulas of PyTorch's silu / gelu kernels, in their order of operations, except:
    if ACTIVATION == 0:
        act = gate / (1.0 + tl.exp(-gate))
    elif ACTIVATION == 1:
        inner = 0.7978845608028654 * (gate + 0.044715 * (gate * gate * gate))
        # 0.5 * x * (1 + tanh(u)) written as x / (1 + e^-2u): the same function without
        # 1 + tanh's cancellation for negative x (and tl.math's tanh spelling differs across
        # Triton versions). Not bit-equal to any libm's tanh anyway; at least as close to exact.
        act = gate / (1.0 + tl.exp(-2.0 * inner))
    else:
        act = gate * 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    # act(gate) is its own tensor in PyTorch: rounded to the dtype before the product.
    act = act.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def gated_act(gate_up: torch.Tensor, intermediate: int, activation: str) -> torch.Tensor:
    """act(gate) * up for gate_up [..., 2 * intermediate] (gate first) -> [..., intermediate].
    activation: "silu", "gelu_tanh" (F.gelu(approximate="tanh")) or "gelu" (erf)."""
    code = ACT_CODES[activation]
    lead = gate_up.shape[:-1]
    if gate_up.shape[-1] != 2 * intermediate:
        raise ValueError(f"gate_up's last dim {gate_up.shape[-1]} is not 2 x {intermediate}")
    x2 = as_rows(gate_up)
    out = torch.empty((x2.shape[0], intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if x2.shape[0] == 0:
        return out.view(*lead, intermediate)
    block = min(1024, triton.next_power_of_2(intermediate))
    grid = (x2.shape[0], triton.cdiv(intermediate, block))
    _gated_act_kernel[grid](x2, out, x2.stride(0), out.stride(0), intermediate,
                            ACTIVATION=code, BLOCK=block, num_warps=4)
    return out.view(*lead, intermediate)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xt, stride_xh, stride_cos, stride_sin, num_heads,
                   HEAD_DIM: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_HALF)
    head_ok = heads < num_heads
    pair_ok = pairs < HALF
    dt = out_ptr.dtype.element_ty
    # cos/sin are rounded to the output dtype by PyTorch's type promotion only when they are
    # narrower; loading and upcasting is exact either way.
    cos = tl.load(cos_ptr + t * stride_cos + pairs, mask=pair_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_sin + pairs, mask=pair_ok, other=0.0).to(tl.float32)[None, :]
    if INTERLEAVED:
        first, second = 2 * pairs, 2 * pairs + 1
    else:
        first, second = pairs, pairs + HALF
    x_row = x_ptr + t * stride_xt + heads[:, None] * stride_xh
    out_row = out_ptr + t * (num_heads * HEAD_DIM) + heads[:, None] * HEAD_DIM
    mask = head_ok[:, None] & pair_ok[None, :]
    x1 = tl.load(x_row + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + second[None, :], mask=mask, other=0.0).to(tl.float32)
    # x1 * cos - x2 * sin and x2 * cos + x1 * sin, each product and each sum rounded to the
    # dtype as PyTorch's separate ops do.
    out1 = (x1 * cos).to(dt).to(tl.float32) - (x2 * sin).to(dt).to(tl.float32)
    out2 = (x2 * cos).to(dt).to(tl.float32) + (x1 * sin).to(dt).to(tl.float32)
    tl.store(out_row + first[None, :], out1.to(dt), mask=mask)
    tl.store(out_row + second[None, :], out2.to(dt), mask=mask)
    if HEAD_DIM > 2 * HALF:  # partial rotary: the channels past rotary_dim pass through
        rest = 2 * HALF + tl.arange(0, BLOCK_REST)
        rest_mask = head_ok[:, None] & (rest < HEAD_DIM)[None, :]
        kept = tl.load(x_row + rest[None, :], mask=rest_mask, other=0.0)
        tl.store(out_row + rest[None, :], kept.to(dt), mask=rest_mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, style: str) -> torch.Tensor:
    """RotaryEmbedding.apply as one launch: x [T, H, head_dim] (any token/head strides, contiguous
    last dim), cos/sin [T, 1, rotary_dim/2] (any token stride) -> a new contiguous tensor, the
    first rotary_dim channels of each head rotated ("neox": halves, "interleaved": even/odd
    pairs), the rest copied."""
    t, num_heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    half = rotary_dim // 2
    cos2, sin2 = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
    if cos2.stride(-1) != 1:
        cos2 = cos2.contiguous()
    if sin2.stride(-1) != 1:
        sin2 = sin2.contiguous()
    out_dtype = torch.promote_types(x.dtype, torch.promote_types(cos.dtype, sin.dtype))
    out = torch.empty((t, num_heads, head_dim), dtype=out_dtype, device=x.device)
    if t == 0 or num_heads == 0:
        return out
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(num_heads), max(1, 2048 // block_half))
    block_rest = triton.next_power_of_2(max(head_dim - rotary_dim, 1))
    grid = (t, triton.cdiv(num_heads, block_h))
    _rotary_kernel[grid](x, cos2, sin2, out, x.stride(0), x.stride(1), cos2.stride(0), sin2.stride(0), num_heads,
                         HEAD_DIM=head_dim, HALF=half, INTERLEAVED=style == "interleaved",
                         BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_REST=block_rest, num_warps=4,
                         # No fma contraction: PyTorch rounds each product before the sum (this
                         # matters for float32 inputs; half types are rounded explicitly).
                         enable_fp_fusion=False)
    return out
