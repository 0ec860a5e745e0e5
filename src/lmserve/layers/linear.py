"""Linear layers whose parameters load themselves, with a pluggable `quant_method`.

Two seams live here, so families never deal with either:
- Every parameter carries a `weight_loader(param, tensor, shard_id)`. A packed layer (q/k/v in
  one matmul, gate/up in one) knows which rows each checkpoint shard fills; tensor-parallel
  column/row splits will narrow the same way, in these loaders, without touching families.
- How the weight is stored and multiplied is the layer's `quant_method`: it creates the
  parameters, post-processes them once loading is done, and applies them. Dense weights (with
  the oneDNN pre-packing on CPU) are the first method; int8/int4 weight-only methods plug in the
  same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LinearMethod:
    """How a linear layer stores and applies its weight."""

    def create_weights(self, layer: Linear, dtype: torch.dtype | None) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Called once all checkpoint tensors are in: repack, quantize, etc."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DenseLinearMethod(LinearMethod):
    """A plain [out, in] weight; on CPU in bf16, multiplied through a oneDNN pre-packed copy.

    A bf16 F.linear on CPU reorders the whole weight into oneDNN's blocked layout on every call,
    which for decode (a few rows against a big weight) costs more than the product itself:
    packing once makes the bf16 decode matmuls about 2x faster, with bit-identical results (the
    same oneDNN kernel runs either way). The dense weight stays the parameter (state dict, tied
    embeddings); a packed copy that no longer matches it (reloaded or edited) is dropped.
    """

    def create_weights(self, layer: Linear, dtype: torch.dtype | None) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.output_size, layer.input_size, dtype=dtype),
                                    requires_grad=False)
        set_weight_loader(layer.weight, layer.weight_loader)
        if layer.has_bias:
            layer.bias = nn.Parameter(torch.empty(layer.output_size, dtype=dtype), requires_grad=False)
            set_weight_loader(layer.bias, layer.weight_loader)
        else:
            layer.register_parameter("bias", None)

    def process_weights_after_loading(self, layer: Linear) -> None:
        layer.packed = None
        w = layer.weight
        if can_pack(w):
            with torch.no_grad():
                # The batch-size hint only picks the blocked layout; 1 (decode) was as good as or
                # better than 8 or 32 for every batch size measured, prefill included.
                layer.packed = (torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1), w, w._version)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        packed = layer.packed
        # Not traced: the version check is data-dependent, and a compiled graph (frozen weights)
        # lays the weight out for oneDNN itself. (is_dynamo_compiling, not is_compiling: the
        # latter is a process-wide flag, true for the eager engine thread too while a background
        # compile runs.)
        if packed is not None and not torch.compiler.is_dynamo_compiling():
            weight, source, version = packed
            if source is layer.weight and source._version == version:
                return _linear_pointwise(x, weight, layer.bias, "none", [], "")
            layer.packed = None
        return F.linear(x, layer.weight, layer.bias)


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


def set_weight_loader(param: nn.Parameter, loader) -> None:
    param.weight_loader = loader


def default_weight_loader(param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
    """Copy a whole checkpoint tensor into a parameter of the same shape."""
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not packed (shard {shard_id!r})")
    check_shape(param.data, tensor)
    param.data.copy_(tensor)


def check_shape(dest: torch.Tensor, tensor: torch.Tensor) -> None:
    if dest.shape != tensor.shape:
        raise ValueError(f"has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")


class Linear(nn.Module):
    """y = x W^T + b, with W's output rows optionally packed from several checkpoint tensors.

    `shard_sizes` lists the output rows of each packed shard in order (q, k, v or gate, up); the
    checkpoint tensor of shard i fills rows [sum(sizes[:i]), sum(sizes[:i+1])).
    """

    def __init__(self, input_size: int, output_size: int | Sequence[int], bias: bool = False,
                 quant_method: LinearMethod | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.shard_sizes = list(output_size) if isinstance(output_size, Sequence) else None
        self.input_size = input_size
        self.output_size = sum(self.shard_sizes) if self.shard_sizes else int(output_size)
        self.has_bias = bias
        self.packed = None
        self.checkpoint_grids: dict | None = None  # shard id -> checkpoint int4 grid, until quantized
        self.quant_method = quant_method or DenseLinearMethod()
        self.quant_method.create_weights(self, dtype)
        for param in self.parameters(recurse=False):
            param.shard_ids = self.shard_ids  # what the loader checks a checkpoint filled

    @property
    def shard_ids(self) -> list:
        """The shard ids a checkpoint must provide for each parameter ([None] when unpacked)."""
        return list(range(len(self.shard_sizes))) if self.shard_sizes else [None]

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None = None) -> None:
        grid = getattr(tensor, "int4_grid", None)
        if grid is not None and param is self.weight:
            # A checkpoint's own quantization grid of this shard (GGUF Q4_1): an int4 method uses
            # its codes instead of requantizing the dense copy (layers/quantization.py).
            if self.checkpoint_grids is None:
                self.checkpoint_grids = {}
            self.checkpoint_grids[shard_id] = grid
        if self.shard_sizes is None:
            return default_weight_loader(param, tensor, shard_id)
        if shard_id is None:  # a checkpoint that already packs the shards (e.g. one qkv tensor)
            check_shape(param.data, tensor)
            param.data.copy_(tensor)
            return
        offset = sum(self.shard_sizes[:shard_id])
        dest = param.data.narrow(0, offset, self.shard_sizes[shard_id])
        check_shape(dest, tensor)
        dest.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.shard_sizes or self.output_size}, bias={self.has_bias}"

    def process_weights(self) -> None:
        """Let the quant method finish the loaded weight (pack, quantize)."""
        self.quant_method.process_weights_after_loading(self)
        self.checkpoint_grids = None  # consumed (or unused) once the weight is final


def process_weights_after_loading(model: nn.Module) -> None:
    """Finish every linear layer's weights."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.process_weights()
