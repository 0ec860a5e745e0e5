"""The one int4 kernel every int4 method runs (quantize-after-load, GGUF Q4_1, GPTQ, AWQ).

A grid is codes q in [0, 15] per weight and, per group of `group` consecutive input columns of
a row, a scale and a zero: w = (q - 8) * scale + zero. Every int4 format converts to it at load
(GPTQ/AWQ's (q - z) * s is scale s, zero (8 - z) * s); `pack` lays it out for the kernel once and
`int4_matmul` is the single call the layers make, so the kernel underneath can be swapped here
alone. Two kernels: where the CPU has AVX512-VNNI and the grid has groups of 32 (or multiples of
32, split), layers/q4_kernel.py's (4-bit weights times int8-rounded activations, llama.cpp's
route, fp16 scales: a GGUF block's own) where it is measured faster on this machine
(kernel_timing.py); elsewhere PyTorch's CPU kernel (`_weight_int4pack_mm_for_cpu`), which reads
scale and zero in bf16 and takes bf16 activations (its float32 path is a reference loop ~100x
slower).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.layers import q4_kernel
from lmserve.layers.quantization import kernel_timing

KERNEL_DTYPE = torch.bfloat16
KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes the kernel takes


@dataclass
class Int4Grid:
    """An int4 grid for an [n, k] weight: w[r, c] = (codes[r, c] - 8) * scale[r, c // g] + zero[r, c // g],
    g = k // scale.shape[1]."""

    codes: torch.Tensor  # uint8 [n, k], values 0..15
    scale: torch.Tensor  # float32 [n, k // g]
    zero: torch.Tensor  # float32 [n, k // g]

    @property
    def group(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]

    def permute_rows(self, order: torch.Tensor) -> Int4Grid:
        return Int4Grid(self.codes[order], self.scale[order], self.zero[order])

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        w = (self.codes.float() - 8).reshape(n, -1, self.group) * self.scale[..., None] + self.zero[..., None]
        return w.reshape(n, k)


@dataclass
class PackedInt4:
    """A grid in the kernel's layout."""

    qweight: torch.Tensor
    scales_zeros: torch.Tensor  # [k // group, n, 2] in KERNEL_DTYPE
    group: int


def kernel_refusal(n: int, k: int, group: int, device: torch.device) -> str | None:
    """Why the kernel cannot take an [n, k] weight with this group size here, or None."""
    if device.type != "cpu":
        return f"the int4 kernel runs on the CPU only (device {device.type})"
    if n % 16:
        return f"{n} output rows are not a multiple of 16"
    if group not in KERNEL_GROUPS or k % group:
        groups = ", ".join(map(str, KERNEL_GROUPS))
        return f"{k} input columns do not split into groups of {group} the kernel takes ({groups})"
    return None


def kernel_group(k: int, group: int) -> int | None:
    """The kernel group size to run a grid of `group` columns with: the largest kernel group
    dividing it (a scale repeated over sub-groups is the same grid); None if none divides."""
    return next((g for g in KERNEL_GROUPS if group % g == 0 and k % g == 0), None)


def regroup(grid: Int4Grid, group: int) -> Int4Grid:
    """The same grid with groups split into sub-groups of `group` columns (scales repeated)."""
    factor = grid.group // group
    if factor == 1:
        return grid
    return Int4Grid(grid.codes, grid.scale.repeat_interleave(factor, dim=1), grid.zero.repeat_interleave(factor, dim=1))


def pack(grid: Int4Grid) -> PackedInt4:
    """Lay a grid out for the kernel this machine runs faster (scale and zero rounded to its dtype:
    fp16 for the VNNI kernel, bf16 for torch's)."""
    if grid.group % q4_kernel.BLOCK == 0 and kernel_timing.use_vnni(*grid.codes.shape):
        grid = regroup(grid, q4_kernel.BLOCK)
        qweight, scales_zeros = q4_kernel.pack_int4(grid.codes, grid.scale, grid.zero, vnni=True)
        return PackedInt4(qweight, scales_zeros, q4_kernel.BLOCK)
    qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(grid.codes.to(torch.int32).contiguous(), 1)
    scales_zeros = torch.stack([grid.scale, grid.zero], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
    return PackedInt4(qweight, scales_zeros, grid.group)


def as_computed(grid: Int4Grid, packed: PackedInt4) -> Int4Grid:
    """`grid` with its scales and zeros rounded as `packed`'s kernel reads them: fp16 d = scale and
    m = zero - 8 * scale for the VNNI layout (a GGUF Q4_1 block's own, bit for bit), bf16 scale and
    zero for torch's."""
    if packed.scales_zeros.dtype == torch.float16:
        d = grid.scale.to(torch.float16).float()
        m = (grid.zero - 8 * grid.scale).to(torch.float16).float()
        return Int4Grid(grid.codes, d, m + 8 * d)
    return Int4Grid(grid.codes, grid.scale.to(KERNEL_DTYPE).float(), grid.zero.to(KERNEL_DTYPE).float())


def pack_experts(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> list[PackedInt4]:
    """A MoE layer's stacked grids ([E, n, k] codes, [E, n, k / g] scales and zeros), one packed
    grid per expert. The VNNI layout is tiles of 16 rows, so the whole stack packs in one call and
    each expert keeps its tiles (measured ~10x faster than a call per expert for 32 experts of
    1024 x 512); torch's layout is packed per expert."""
    e, n, k = codes.shape
    grid = Int4Grid(codes.reshape(e * n, k), scale.reshape(e * n, -1), zero.reshape(e * n, -1))
    if grid.group % q4_kernel.BLOCK or not kernel_timing.use_vnni(n, k):  # torch's layout is not row-sliceable
        return [pack(Int4Grid(codes[i], scale[i], zero[i])) for i in range(e)]
    stacked = pack(grid)
    tiles = n // q4_kernel.TILE
    return [PackedInt4(stacked.qweight[i * tiles:(i + 1) * tiles], stacked.scales_zeros[i * tiles:(i + 1) * tiles],
                       stacked.group) for i in range(e)]


def int4_matmul(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """x [..., k] @ W^T -> [..., n] in x's dtype (computed in the kernel dtype)."""
    return q4_kernel.int4_linear(x, packed.qweight, packed.scales_zeros, packed.group)
