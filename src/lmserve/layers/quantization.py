"""Weight-only quantization methods for `Linear` (its `quant_method` seam).

Decode on a CPU is memory-bound: every step streams every weight once. Storing weights in 8 or 4
bits and multiplying with PyTorch's packed kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`) cuts those bytes 2x / ~3.5x against bf16; activations stay in the
compute dtype. Weights are quantized at load from the dense checkpoint tensors:

- int8: symmetric, one scale per output channel (w ~ q * s, q in [-127, 127]).
- int4: asymmetric, one scale and zero per group of 32 inputs (w ~ (q - 8) * s + zero, q in
  [0, 15]), the layout the int4 kernel reads. llama.cpp's Q4_1 blocks are the same grid
  (w = d * q + m, so s = d and zero = m + 8d): a GGUF Q4_1 tensor arrives with its grid
  (`Int4Grid`, attached by the GGUF reader) and its codes are used as they are, not requantized
  from a dequantized copy.

The quantized kernels pay only for few rows: they stream 4 or 8 bits per weight, but work row by
row, so from ~4 rows on the oneDNN bf16 kernel wins (int4 is ~3x slower at 32+ rows: measured in
docs/benchmarks.md). `dense_above_rows=N` keeps the bf16 (packed) weight beside the quantized one
and sends products of more than N rows (prefill, large decode batches) to it: fastest at every
batch size, at the price of the dense weight's memory. Without it only the quantized weight is
kept (the memory mode).

The kernels take bf16 activations: their float32 paths are reference loops about 100x slower
(measured: 576 ms vs 4 ms for a 180 x 576 x 1536 product), so a float32 model's quantized layers
compute in bf16 and return float32.

The LM head and the embeddings stay dense (int4 on the head alone changed about half of greedy
tokens in the study behind this; see docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmserve.layers import q4_kernel
from lmserve.layers.linear import DenseLinearMethod, Linear, LinearMethod

QUANTIZATION_CHOICES = ("none", "int8", "int4")
INT4_GROUP = 32
KERNEL_DTYPE = torch.bfloat16


@dataclass
class Int4Grid:
    """An int4 group-32 grid a checkpoint already holds for one tensor:
    w[r, c] = (codes[r, c] - 8) * scale[r, c // 32] + zero[r, c // 32]."""

    codes: torch.Tensor  # uint8 [rows, k], values 0..15
    scale: torch.Tensor  # float32 [rows, k // 32]
    zero: torch.Tensor  # float32 [rows, k // 32]

    def permute_rows(self, order: torch.Tensor) -> Int4Grid:
        return Int4Grid(self.codes[order], self.scale[order], self.zero[order])


class QuantizedLinearMethod(LinearMethod):
    """Shared by the weight-only methods: optionally keep the dense weight for big products."""

    def __init__(self, dense_above_rows: int | None = None):
        self.dense_above_rows = dense_above_rows
        self.dense = DenseLinearMethod() if dense_above_rows is not None else None

    def finish(self, layer: Linear) -> None:
        if self.dense is None:
            _drop_dense(layer)  # the memory the method saves
        elif getattr(layer, "packed", None) is None:
            self.dense.process_weights_after_loading(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.numel() > self.dense_above_rows * x.shape[-1]:
            return self.dense.apply(layer, x)
        return self.apply_quantized(layer, x)

    def apply_quantized(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8LinearMethod(QuantizedLinearMethod):
    @staticmethod
    def supports(layer: Linear) -> bool:
        # The int8 kernel crashes the process (segfault) on inputs whose width is not a
        # multiple of 16; such layers stay dense.
        return layer.input_size % 16 == 0
    def process_weights_after_loading(self, layer: Linear) -> None:
        w = layer.weight.detach().float()
        # Round the scale to the dtype the kernel reads first, and the grid to that scale.
        scale = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12).to(KERNEL_DTYPE)
        layer.qweight = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        layer.scales = scale
        self.finish(layer)

    def apply_quantized(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return _run(torch.ops.aten._weight_int8pack_mm, x, layer.bias, layer.qweight, layer.scales)


class Int4LinearMethod(QuantizedLinearMethod):
    @staticmethod
    def supports(layer: Linear) -> bool:
        # The packed int4 layout needs whole groups of inputs and rows in multiples of 16.
        return layer.input_size % INT4_GROUP == 0 and layer.output_size % 16 == 0
    def process_weights_after_loading(self, layer: Linear) -> None:
        k = layer.input_size
        if k % INT4_GROUP:
            raise ValueError(f"int4 needs input sizes divisible by {INT4_GROUP}, got {k}")
        grid = checkpoint_grid(layer)
        if grid is None:
            grid = _int4_grid_of(layer.weight.detach().float())
        # The kernel's layout (layers/q4_kernel.py: the VNNI kernel, or torch's where it cannot run).
        layer.qweight, layer.scales_zeros = q4_kernel.pack_int4(grid.codes, grid.scale, grid.zero)
        self.finish(layer)

    def apply_quantized(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        y = q4_kernel.int4_linear(x, layer.qweight, layer.scales_zeros)
        return y if layer.bias is None else y + layer.bias


def _int4_grid_of(w: torch.Tensor) -> Int4Grid:
    """Min/max grid per group of 32 for a dense [n, k] weight. The kernel computes
    (q - 8) * scale + zero, so zero = lo + 8 * scale; both are rounded to the kernel's dtype first
    and the codes are taken against the rounded values."""
    n, k = w.shape
    w = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp_(min=1e-12).to(KERNEL_DTYPE).float()
    zero = (lo + 8 * scale).to(KERNEL_DTYPE).float()
    codes = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    return Int4Grid(codes, scale, zero)


def checkpoint_grid(layer: Linear) -> Int4Grid | None:
    """The layer's whole int4 grid from the checkpoint, when every shard of its weight came with
    one (shards stacked in output order); else None."""
    grids = getattr(layer, "checkpoint_grids", None) or {}
    if None in grids:
        return grids[None]
    if layer.shard_sizes is None or not all(i in grids for i in range(len(layer.shard_sizes))):
        return None
    parts = [grids[i] for i in range(len(layer.shard_sizes))]
    return Int4Grid(*(torch.cat([getattr(g, f) for g in parts]) for f in ("codes", "scale", "zero")))


def _run(kernel, x: torch.Tensor, bias: torch.Tensor | None, *weights) -> torch.Tensor:
    """kernel(x2d, *weights) in the kernel dtype, reshaped and cast back to x's dtype."""
    shape = x.shape
    y = kernel(x.reshape(-1, shape[-1]).to(KERNEL_DTYPE), *weights).to(x.dtype)
    y = y.reshape(*shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def _drop_dense(layer: Linear) -> None:
    """The dense weight is no longer used: free it (that is the memory the method saves)."""
    layer.weight = None
    layer.packed = None


_METHODS = {"int8": Int8LinearMethod, "int4": Int4LinearMethod}


def quantize_model(model: nn.Module, quantization: str, skip: tuple[str, ...] = ("lm_head",),
                   dense_above_rows: int | None = None) -> int:
    """Quantize a loaded model's linear layers now (see `choose_quant_methods`); returns how many
    were converted."""
    layers = choose_quant_methods(model, quantization, skip, dense_above_rows)
    for layer in layers:
        layer.process_weights()
    return len(layers)


def choose_quant_methods(model: nn.Module, quantization: str, skip: tuple[str, ...] = ("lm_head",),
                         dense_above_rows: int | None = None) -> list[Linear]:
    """Give every dense `Linear` (but the LM head, and layers whose shape the kernel cannot take)
    the chosen method, to be applied by `process_weights_after_loading`; returns those layers.
    Weights shared with another module (a tied head) stay dense. Choosing before the weights are
    processed means a quantized layer's dense weight is never packed, only freed."""
    if quantization in (None, "none"):
        return []
    if quantization not in _METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}; got {quantization!r}")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError(f"{quantization} weight-only quantization runs on the CPU only")
    method = _METHODS[quantization]
    chosen = []
    for name, module in model.named_modules():
        if (isinstance(module, Linear) and not any(name == s or name.endswith("." + s) for s in skip)
                and method.supports(module)):
            module.quant_method = method(dense_above_rows)
            chosen.append(module)
    return chosen
