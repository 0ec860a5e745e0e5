"""Weight-only int8 / int4 quantized at load from a dense checkpoint (`quantization: int8|int4`).

Decode on a CPU is memory-bound: every step streams every weight once. Storing weights in 8 or 4
bits and multiplying with PyTorch's packed kernels (`_weight_int8pack_mm`, the int4 kernel of
int4_kernel.py) cuts those bytes 2x / ~3.5x against bf16; activations stay in the compute dtype.
The methods create the dense layer's parameters (the checkpoint is dense), and quantize them once
loaded, on the rank's slice (a shard quantizes exactly as that slice of the whole weight would):

- int8: symmetric, one scale per output channel (w ~ q * s, q in [-127, 127]).
- int4: asymmetric, one scale and zero per group of 32 inputs (w ~ (q - 8) * s + zero, q in
  [0, 15]), the layout the int4 kernel reads.

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

import torch

from lmserve.layers.linear import DenseLinearMethod, Linear, LinearMethod
from lmserve.layers.quantization import int4_kernel
from lmserve.layers.quantization.base import QuantizationConfig, QuantizationError
from lmserve.layers.quantization.int4_kernel import KERNEL_DTYPE, Int4Grid

INT4_GROUP = 32


class QuantizedLinearMethod(LinearMethod):
    """Shared by the weight-only methods: optionally keep the dense weight for big products."""

    def __init__(self, dense_above_rows: int | None = None):
        self.dense_above_rows = dense_above_rows
        self.dense = DenseLinearMethod() if dense_above_rows is not None else None

    def create_weights(self, layer: Linear, dtype: torch.dtype | None) -> None:
        DenseLinearMethod().create_weights(layer, dtype)  # the dense checkpoint's parameters

    def finish(self, layer: Linear) -> None:
        if self.dense is None:
            _drop_dense(layer)  # the memory the method saves
        elif getattr(layer, "packed", None) is None:
            self.dense.process_weights_after_loading(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.numel() > self.dense_above_rows * x.shape[-1]:
            return self.dense.apply(layer, x)
        y = self.apply_quantized(layer, x)
        return y if layer.bias is None else y + layer.bias

    def apply_quantized(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8LinearMethod(QuantizedLinearMethod):
    @staticmethod
    def refusal(layer: Linear) -> str | None:
        # The int8 kernel crashes the process (segfault) on inputs whose width is not a
        # multiple of 16; such layers stay dense.
        return None if layer.input_size % 16 == 0 else "input width not a multiple of 16 (int8 kernel)"

    def process_weights_after_loading(self, layer: Linear) -> None:
        w = layer.weight.detach().float()
        # Round the scale to the dtype the kernel reads first, and the grid to that scale.
        scale = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12).to(KERNEL_DTYPE)
        layer.qweight = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        layer.scales = scale
        self.finish(layer)

    def apply_quantized(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(KERNEL_DTYPE), layer.qweight,
                                               layer.scales).to(x.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])


class Int4LinearMethod(QuantizedLinearMethod):
    @staticmethod
    def refusal(layer: Linear) -> str | None:
        # The packed int4 layout needs whole groups of inputs and rows in multiples of 16.
        return int4_kernel.kernel_refusal(layer.output_size, layer.input_size, INT4_GROUP, torch.device("cpu"))

    def process_weights_after_loading(self, layer: Linear) -> None:
        self.set_grid(layer, int4_grid_of(layer.weight.detach().float()))
        self.finish(layer)

    def set_grid(self, layer: Linear, grid: Int4Grid) -> None:
        layer.int4 = int4_kernel.pack(grid)
        # The kernel's layout, under the names the memory accounting and tests read.
        layer.qweight, layer.scales_zeros = layer.int4.qweight, layer.int4.scales_zeros

    def apply_quantized(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return int4_kernel.int4_matmul(x, layer.int4)


def int4_grid_of(w: torch.Tensor, group: int = INT4_GROUP) -> Int4Grid:
    """Min/max grid per group for a dense [n, k] weight. The kernel computes
    (q - 8) * scale + zero, so zero = lo + 8 * scale; both are rounded to the kernel's dtype first
    and the codes are taken against the rounded values."""
    n, k = w.shape
    w = w.reshape(n, k // group, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp_(min=1e-12).to(KERNEL_DTYPE).float()
    zero = (lo + 8 * scale).to(KERNEL_DTYPE).float()
    codes = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    return Int4Grid(codes, scale, zero)


def _drop_dense(layer: Linear) -> None:
    """The dense weight is no longer used: free it (that is the memory the method saves)."""
    layer.weight = None
    layer.packed = None


WEIGHT_ONLY_METHODS = {"int8": Int8LinearMethod, "int4": Int4LinearMethod}


class WeightOnlyExpertsMethod:
    """int8 / int4 for a MoE layer's experts (layers/moe.py FusedExperts): every expert's
    gate_up and down weights quantized once loaded, the same grids and kernels as the linear
    methods; the stacked dense weights are freed. Runs the per-expert dispatch loop (CPU).

    `kinds` may give each projection its own kind ("gate_up_proj" / "down_proj" -> "int8" or
    "int4"; the GGUF method adds "grid"). The loader finishes a MoE layer as soon as its tensors
    are in, so only one layer's dense experts exist at a time."""

    def __init__(self, kind: str, kinds: dict[str, str] | None = None):
        self.kind = kind
        self.kinds = kinds or {"gate_up_proj": kind, "down_proj": kind}

    @staticmethod
    def refusal(kind: str, experts, projections=("gate_up_proj", "down_proj")) -> str | None:
        hidden, inter = experts.hidden, experts.intermediate
        shapes = {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}
        for projection in projections:
            n, k = shapes[projection]
            if kind == "int8" and k % 16:
                return f"expert input width {k} not a multiple of 16 (int8 kernel)"
            if kind == "int4":
                refusal = int4_kernel.kernel_refusal(n, k, INT4_GROUP, torch.device("cpu"))
                if refusal:
                    return f"expert weights: {refusal}"
        return None

    def process_weights_after_loading(self, experts) -> None:
        self.weights = {}
        for projection in ("gate_up_proj", "down_proj"):
            stacked = getattr(experts, projection).detach()
            kind = self.kinds[projection]
            self.weights[projection] = [self._quantize(stacked[e].float(), kind) for e in range(stacked.shape[0])]
            # Freed: the memory the method saves (an empty tensor keeps the parameter's name).
            setattr(experts, projection, torch.nn.Parameter(stacked.new_empty(0), requires_grad=False))

    @staticmethod
    def _quantize(w: torch.Tensor, kind: str):
        if kind == "int4":
            return int4_kernel.pack(int4_grid_of(w))
        scale = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12).to(KERNEL_DTYPE)
        return torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8), scale

    def apply_expert(self, experts, local: int, projection: str, x: torch.Tensor) -> torch.Tensor:
        weight = self.weights[projection][local]
        if isinstance(weight, int4_kernel.PackedInt4):
            return int4_kernel.int4_matmul(x, weight)
        qweight, scale = weight
        return torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE), qweight, scale).to(x.dtype)

    def quantized_bytes(self) -> int:
        """The bytes the quantized experts hold (tests and memory accounting)."""
        total = 0
        for weights in self.weights.values():
            for w in weights:
                parts = (w.qweight, w.scales_zeros) if isinstance(w, int4_kernel.PackedInt4) else w
                total += sum(t.numel() * t.element_size() for t in parts)
        return total


class WeightOnlyConfig(QuantizationConfig):
    """`quantization: int8|int4` on a dense checkpoint: every linear layer the kernel takes."""

    def __init__(self, name: str, dense_above_rows: int | None = None):
        self.name = name
        self.method = WEIGHT_ONLY_METHODS[name]
        self.dense_above_rows = dense_above_rows

    def check_device(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise QuantizationError(f"{self.name} weight-only quantization runs on the CPU only")

    def linear_method(self, layer: Linear, name: str) -> LinearMethod | str:
        refusal = self.method.refusal(layer)
        return refusal or self.method(self.dense_above_rows)

    def experts_method(self, experts, name: str):
        return WeightOnlyExpertsMethod.refusal(self.name, experts) or WeightOnlyExpertsMethod(self.name)
