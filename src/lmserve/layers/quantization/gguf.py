"""GGUF tensors kept in their own grid (`quantization: int4` on a GGUF file).

llama.cpp's 4-bit blocks are the int4 kernel's group-32 grid: Q4_1 (w = d * q + m: scale d, zero
m + 8d), Q4_0 (w = d * (q - 8): zero 0) and Q4_K (sub-blocks of 32 with 6-bit scales and mins
under a super-block d and dmin: scale d * sc, zero 8 * scale - dmin * m). Such a tensor is read as
its codes, scales and zeros (models/gguf.py yields them as `<module>.codes`, `.group_scale`,
`.group_zero`) and packed for the kernel as they are, never dequantized nor requantized. A
layer whose GGUF tensors are all 5- to 8-bit blocks (Q5_0 / Q5_1 / Q5_K / Q6_K / Q8_0: the
Q4_K_M / Q5_K_M mixes' other types, and llama.cpp's fallbacks for rows that are not whole
super-blocks) takes int8 instead, the nearest grid our kernels run that keeps their precision
(4 bits would round their 32 to 256 levels per block onto 16 again; int8 per channel keeps them
within half a 255-level step. On SmolLM2's Q4_K_M the 150-token perplexity text does not tell the
two apart: docs/benchmarks.md). Any other layer (float tensors, q/k/v of mixed types) is quantized
to int4 as asked. Both are quantized from the layer's dense copy, one layer at a time (the loader
finishes each layer as soon as it is complete: no dense copy of the model).
"""

from __future__ import annotations

import torch
from torch import nn

from lmserve.layers.linear import Linear, LinearMethod, ShardLayout, create_bias, set_weight_loader
from lmserve.layers.quantization import int4_kernel
from lmserve.layers.quantization.int4_kernel import Int4Grid
from lmserve.layers.quantization.weight_only import INT4_GROUP, Int4LinearMethod, Int8LinearMethod, WeightOnlyConfig

# The checkpoint tensor suffixes of a grid (models/gguf.py writes them).
GRID_TENSORS = ("codes", "group_scale", "group_zero")


class GGUFGridMethod(Int4LinearMethod):
    """A layer loaded from its GGUF file's own Q4_1 grid."""

    def create_weights(self, layer: Linear, dtype: torch.dtype | None) -> None:
        # The compute dtype, for the dense copy of big products: known here (the model is built
        # under it as the default dtype), not when the weights are processed after loading.
        self.dense_dtype = dtype or torch.get_default_dtype()
        n, k = layer.output_size, layer.input_size
        for name, shape, tensor_dtype, layout in (
                ("codes", (n, k), torch.uint8, ShardLayout(0, 1)),
                ("group_scale", (n, k // INT4_GROUP), torch.float32, ShardLayout(0, 1, input_pack=INT4_GROUP)),
                ("group_zero", (n, k // INT4_GROUP), torch.float32, ShardLayout(0, 1, input_pack=INT4_GROUP))):
            param = nn.Parameter(torch.empty(shape, dtype=tensor_dtype), requires_grad=False)
            setattr(layer, name, param)
            set_weight_loader(param, layer.sharded_loader(layout))
        create_bias(layer, dtype)

    def process_weights_after_loading(self, layer: Linear) -> None:
        grid = Int4Grid(layer.codes.data, layer.group_scale.data, layer.group_zero.data)
        if self.dense is not None:
            # The big products' dense weight is the grid's own values (what the file holds).
            layer.weight = nn.Parameter(grid.dequantize().to(self.dense_dtype),
                                        requires_grad=False)
            self.dense.process_weights_after_loading(layer)
        self.set_grid(layer, grid)
        for name in GRID_TENSORS:
            delattr(layer, name)
        if self.dense is None:
            layer.weight = None


class GGUFInt4Config(WeightOnlyConfig):
    """int4 for a GGUF file: its 4-bit-grid layers keep their grid, its 5- to 8-bit layers take
    int8, the others are quantized to int4."""

    def __init__(self, grid_modules: dict[str, set], dense_above_rows: int | None = None,
                 wide_modules: dict[str, set] | None = None):
        super().__init__("int4", dense_above_rows)
        self.grid_modules = grid_modules  # module name -> the shard ids whose tensor is a 4-bit grid
        self.wide_modules = wide_modules or {}  # ... whose tensor is in 5- to 8-bit blocks

    def linear_method(self, layer: Linear, name: str) -> LinearMethod | str:
        refusal = Int4LinearMethod.refusal(layer) or (
            f"a slice starting at input column {layer.input_start}" if layer.input_start % INT4_GROUP else None)
        if refusal:
            return refusal
        if set(layer.shard_ids) <= self.grid_modules.get(name, set()):
            return GGUFGridMethod(self.dense_above_rows)
        if set(layer.shard_ids) <= self.wide_modules.get(name, set()) and Int8LinearMethod.refusal(layer) is None:
            return Int8LinearMethod(self.dense_above_rows)
        return Int4LinearMethod(self.dense_above_rows)

    @staticmethod
    def uses_grid(layer: Linear) -> bool:
        return isinstance(layer.quant_method, GGUFGridMethod)


__all__ = ["GGUFGridMethod", "GGUFInt4Config", "GRID_TENSORS", "int4_kernel"]
