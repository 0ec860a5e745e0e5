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

MoE experts (qwen2moe / deepseek2 files: one stacked tensor per projection and layer) follow the
same rule per projection (gate_up: the gate and up tensors; down): a 4-bit grid is kept as the
file's codes, stacked ([E, rows, cols] uint8 codes, fp32 group scales and zeros) until the layer
is complete, then packed expert by expert for the int4 kernel; 5- to 8-bit experts take int8 and
float ones int4, quantized from the layer's dense stack. No copy of all experts in bf16 is ever
held: the loader finishes each MoE layer when its last tensor is in.
"""

from __future__ import annotations

import torch
from torch import nn

from lmserve.layers.linear import Linear, LinearMethod, ShardLayout, create_bias, set_weight_loader
from lmserve.layers.quantization import int4_kernel
from lmserve.layers.quantization.int4_kernel import Int4Grid
from lmserve.layers.quantization.weight_only import (
    INT4_GROUP,
    Int4LinearMethod,
    Int8LinearMethod,
    WeightOnlyConfig,
    WeightOnlyExpertsMethod,
)

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
        self.set_grid(layer, grid)
        if self.dense is not None:
            # The big products' dense weight is the grid's values as the decode kernel computes
            # them: prefill and decode agree on what the weight is (the file's own values under the
            # VNNI kernel; torch's reads its scales and zeros rounded to bf16).
            layer.weight = nn.Parameter(int4_kernel.as_computed(grid, layer.int4).dequantize().to(self.dense_dtype),
                                        requires_grad=False)
            self.dense.process_weights_after_loading(layer)
        for name in GRID_TENSORS:
            delattr(layer, name)
        if self.dense is None:
            layer.weight = None


class GGUFExpertsMethod(WeightOnlyExpertsMethod):
    """A MoE layer's experts from a GGUF file, each projection by its own kind: "grid" (the
    file's 4-bit codes kept), "int8" or "int4" (quantized from the dense stack)."""

    def create_weights(self, experts) -> None:
        for projection, kind in self.kinds.items():
            if kind != "grid":
                continue
            e, n, k = getattr(experts, projection).shape
            delattr(experts, projection)  # never filled, so never resident
            for suffix, shape, dtype, pack in (("codes", (e, n, k), torch.uint8, 1),
                                               ("group_scale", (e, n, k // INT4_GROUP), torch.float32, INT4_GROUP),
                                               ("group_zero", (e, n, k // INT4_GROUP), torch.float32, INT4_GROUP)):
                experts.register_parameter(f"{projection}_{suffix}",
                                           experts.stacked_parameter(projection, shape, dtype, input_pack=pack))

    def process_weights_after_loading(self, experts) -> None:
        self.weights = {}
        for projection, kind in self.kinds.items():
            if kind != "grid":
                stacked = getattr(experts, projection).detach()
                self.weights[projection] = [self._quantize(stacked[e].float(), kind) for e in range(stacked.shape[0])]
                setattr(experts, projection, nn.Parameter(stacked.new_empty(0), requires_grad=False))
                continue
            codes, scale, zero = (getattr(experts, f"{projection}_{suffix}").detach() for suffix in GRID_TENSORS)
            self.weights[projection] = int4_kernel.pack_experts(codes, scale, zero)
            for suffix in GRID_TENSORS:
                delattr(experts, f"{projection}_{suffix}")
            # The projection's name stays, empty (as the other methods leave it).
            setattr(experts, projection, nn.Parameter(codes.new_empty(0, dtype=torch.get_default_dtype()),
                                                      requires_grad=False))


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

    def experts_method(self, experts, name: str):
        """Per projection: the file's grid where both (gate_up: gate and up) tensors are 4-bit
        grids, int8 where they are 5- to 8-bit blocks, int4 otherwise; dense if the kernels refuse
        a projection's shape (or this rank's slice does not split the file's groups)."""
        kinds = {}
        for projection, shards in (("gate_up_proj", {(None, 0), (None, 1)}), ("down_proj", {(None, None)})):
            if shards <= self.grid_modules.get(name, set()):
                kinds[projection] = "grid"
            elif shards <= self.wide_modules.get(name, set()):
                kinds[projection] = "int8"
            else:
                kinds[projection] = "int4"
            kernel = "int4" if kinds[projection] == "grid" else kinds[projection]
            refusal = WeightOnlyExpertsMethod.refusal(kernel, experts, (projection,))
            if refusal is None and kinds[projection] == "grid" and projection == "down_proj" and (
                    experts.intermediate_start % INT4_GROUP):
                refusal = f"a slice starting at intermediate column {experts.intermediate_start}"
            if refusal:
                return f"{projection}: {refusal}"
        return GGUFExpertsMethod("int4", kinds)

    @staticmethod
    def uses_grid(layer: nn.Module, param_name: str = "") -> bool:
        """Whether the tensor of `layer`'s parameter `param_name` is read as the file's grid (never
        for modules without a method: embeddings, norms, the router)."""
        method = getattr(layer, "quant_method", None)
        if isinstance(method, GGUFExpertsMethod):
            return method.kinds.get(param_name.rpartition(".")[2]) == "grid"
        return isinstance(method, GGUFGridMethod)


__all__ = ["GGUFExpertsMethod", "GGUFGridMethod", "GGUFInt4Config", "GRID_TENSORS", "int4_kernel"]
