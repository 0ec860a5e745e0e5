"""Linear layers whose parameters load themselves, with a pluggable `quant_method`.

Two seams live here, so families never deal with either:
- Every parameter carries a `weight_loader(param, tensor, shard_id)`. A packed layer (q/k/v in
  one matmul, gate/up in one) knows which rows each checkpoint shard fills, and under tensor
  parallelism which slice of them its rank keeps: families declare a layer column-parallel
  (`ColumnParallelLinear`, `QKVParallelLinear`: output rows split over the ranks) or
  row-parallel (`RowParallelLinear`: input columns split, outputs summed over the ranks) and
  always hand the loader the whole checkpoint tensor; they never compute a shard.
- How the weight is stored and multiplied is the layer's `quant_method`: it creates the
  parameters, post-processes them once loading is done, and applies them. Dense weights (with
  the oneDNN pre-packing on CPU) are the first method; the quantization methods
  (layers/quantization/) plug in the same way. A method's parameters need not be [out, in]
  (GPTQ's qweight is [in / 8, out] int32, its scales [groups, out]): each parameter is created
  with a `ShardLayout` saying which of its dims run over output rows and input columns and how
  many checkpoint values one element packs, and `Linear.sharded_loader(layout)` gives it the
  same shard- and rank-aware loading the dense weight has.

The model loader builds a model's linear layers without parameters (`deferred_weights`) and
gives each its method by name afterwards (the LM head and a family's dense modules stay
dense), so a quantized layer never holds a dense weight, not even an empty one.

vocab_parallel.py holds the embedding and the LM head split over the vocabulary.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.distributed.group import TPGroup, current_group, shard_range


@dataclass(frozen=True)
class ShardLayout:
    """How a parameter's dims relate to the layer's output rows and input columns.

    `output_dim` runs over output rows, `input_dim` over input columns (None: the parameter does
    not extend over them and is loaded whole, e.g. a per-tensor scale); one element along a dim
    stands for `output_pack` rows / `input_pack` columns (8 for int4 codes packed in int32, the
    group size for per-group scales). `bias`: added once over row-parallel ranks."""

    output_dim: int | None = 0
    input_dim: int | None = 1
    output_pack: int = 1
    input_pack: int = 1
    bias: bool = False


WEIGHT_LAYOUT = ShardLayout(0, 1)
BIAS_LAYOUT = ShardLayout(0, None, bias=True)
WHOLE_LAYOUT = ShardLayout(None, None)


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
        create_bias(layer, dtype)

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


def create_bias(layer: Linear, dtype: torch.dtype | None) -> None:
    """The layer's bias (every method keeps it dense), or None."""
    if layer.has_bias:
        layer.bias = nn.Parameter(torch.empty(layer.output_size, dtype=dtype), requires_grad=False)
        set_weight_loader(layer.bias, layer.weight_loader)
    else:
        layer.register_parameter("bias", None)


_deferred = threading.local()


@contextlib.contextmanager
def deferred_weights():
    """Linear layers built inside create no parameters until `Linear.create_weights(method)`:
    the loader picks each layer's method by its name once the model is built."""
    saved = getattr(_deferred, "on", False)
    _deferred.on = True
    try:
        yield
    finally:
        _deferred.on = saved


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
    checkpoint tensor of shard i fills rows [sum(sizes[:i]), sum(sizes[:i+1])). This class is
    replicated (every rank holds the whole weight); the parallel subclasses below keep a slice,
    and then `input_size`, `output_size` and `shard_sizes` are this rank's.
    """

    def __init__(self, input_size: int, output_size: int | Sequence[int], bias: bool = False,
                 quant_method: LinearMethod | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        global_shards = list(output_size) if isinstance(output_size, Sequence) else [int(output_size)]
        self.tp: TPGroup = self.parallel_group()
        # Per output shard: (checkpoint rows, rows this rank keeps, first row it keeps).
        self.output_partitions = self.partition_outputs(global_shards)
        self.global_input_size = input_size
        self.input_start, self.input_size = self.partition_input(input_size)
        self.shard_sizes = [local for _, local, _ in self.output_partitions] \
            if isinstance(output_size, Sequence) else None
        self.output_size = sum(local for _, local, _ in self.output_partitions)
        self.has_bias = bias
        self.packed = None
        self.dtype = dtype
        self.quant_method: LinearMethod | None = None
        self.loader_wrap = None  # see customize_loading
        self.processed = False  # process_weights ran (the loader runs it as soon as a layer is complete)
        self.custom_shard_ids: list | None = None
        if quant_method is not None or not self.deferrable or not getattr(_deferred, "on", False):
            self.create_weights(quant_method or DenseLinearMethod())

    # A layer whose weight is not its own to choose (the LM head, tied to the embedding) is
    # always created at once, dense.
    deferrable = True

    def create_weights(self, method: LinearMethod) -> None:
        """Give the layer its method, which creates its parameters (replacing any it had)."""
        for name, _ in list(self.named_parameters(recurse=False)):
            delattr(self, name)
        self.quant_method = method
        method.create_weights(self, self.dtype)
        for param in self.parameters(recurse=False):
            param.shard_ids = self.custom_shard_ids or self.shard_ids  # what the loader checks a checkpoint filled
            if self.loader_wrap is not None:
                set_weight_loader(param, self.loader_wrap(param.weight_loader))

    def customize_loading(self, wrap, shard_ids: list | None = None) -> None:
        """For a family whose checkpoint cuts this layer's shards its own way (a fused KV tensor,
        grouped q/k/v): `wrap(loader)` returns the loader to use for a parameter whose own loader
        is `loader`, applied to the parameters now and to those any method creates later;
        `shard_ids` replaces the shard ids the checkpoint must provide."""
        self.loader_wrap, self.custom_shard_ids = wrap, shard_ids
        for param in self.parameters(recurse=False):
            set_weight_loader(param, wrap(param.weight_loader))
            if shard_ids is not None:
                param.shard_ids = shard_ids

    # ---- how this rank's slice is cut (the parallel subclasses override) -------------------

    def parallel_group(self) -> TPGroup:
        from lmserve.distributed.group import SINGLE

        return SINGLE

    def partition_outputs(self, global_shards: list[int]) -> list[tuple[int, int, int]]:
        return [(n, n, 0) for n in global_shards]

    def partition_input(self, input_size: int) -> tuple[int, int]:
        return 0, input_size

    @property
    def shard_ids(self) -> list:
        """The shard ids a checkpoint must provide for each parameter ([None] when unpacked)."""
        return list(range(len(self.shard_sizes))) if self.shard_sizes else [None]

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None = None) -> None:
        """The dense weight's and the bias's loader."""
        self.load_sharded(param, tensor, shard_id, WEIGHT_LAYOUT if param.dim() == 2 else BIAS_LAYOUT)

    def sharded_loader(self, layout: ShardLayout):
        """A weight loader for a parameter laid out as `layout` (a quantization method's)."""
        def loader(param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
            self.load_sharded(param, tensor, shard_id, layout)
        return loader

    def load_sharded(self, param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None,
                     layout: ShardLayout) -> None:
        """Copy a whole checkpoint tensor's part for this rank (and shard) into `param`."""
        if layout.output_dim is None and layout.input_dim is None:
            # Per-tensor values (an fp8 scale): one per checkpoint shard, kept per shard.
            self._load_whole(param, tensor, shard_id)
            return
        if shard_id is None and len(self.output_partitions) > 1:
            # A checkpoint that already packs the shards (one qkv or gate_up tensor).
            total = sum(rows for rows, _, _ in self.output_partitions)
            if layout.output_dim is None or tensor.shape[layout.output_dim] * layout.output_pack != total:
                raise ValueError(f"has shape {tuple(tensor.shape)}, expected "
                                 f"{self._checkpoint_shape(param, total, layout)}")
            sizes = [rows // layout.output_pack for rows, _, _ in self.output_partitions]
            for i, part in enumerate(tensor.split(sizes, dim=layout.output_dim)):
                self._load_shard(param, part, i, layout)
            return
        if shard_id is not None and self.shard_sizes is None:
            raise ValueError(f"parameter of shape {tuple(param.shape)} is not packed (shard {shard_id!r})")
        self._load_shard(param, tensor, shard_id or 0, layout)

    def _checkpoint_shape(self, param: nn.Parameter, rows: int, layout: ShardLayout) -> tuple[int, ...]:
        shape = list(param.shape)
        if layout.output_dim is not None:
            shape[layout.output_dim] = rows // layout.output_pack
        if layout.input_dim is not None:
            shape[layout.input_dim] = self.global_input_size // layout.input_pack
        return tuple(shape)

    def _load_whole(self, param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
        """A parameter with one value per checkpoint shard (param rows = shards)."""
        index = shard_id or 0
        if param.shape[0] <= index or tensor.numel() != 1:
            raise ValueError(f"has shape {tuple(tensor.shape)}, expected one value per shard")
        param.data[index].copy_(tensor.reshape(()))
        if shard_id is None:  # one value for all shards
            param.data.copy_(tensor.reshape(()))

    def _load_shard(self, param: nn.Parameter, tensor: torch.Tensor, index: int, layout: ShardLayout) -> None:
        rows, local, start = self.output_partitions[index]
        expected = self._checkpoint_shape(param, rows, layout)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"has shape {tuple(tensor.shape)}, expected {expected}")
        dest = param.data
        if layout.input_dim is not None:
            tensor = tensor.narrow(layout.input_dim, *_packed_range(self.input_start, self.input_size,
                                                                   layout.input_pack, "input columns"))
        elif layout.bias and self.zero_bias_here():
            tensor = torch.zeros_like(tensor)
        if layout.output_dim is not None:
            offset = sum(n for _, n, _ in self.output_partitions[:index])
            dest = dest.narrow(layout.output_dim, *_packed_range(offset, local, layout.output_pack, "output rows"))
            tensor = tensor.narrow(layout.output_dim, *_packed_range(start, local, layout.output_pack, "output rows"))
        dest.copy_(tensor)

    def zero_bias_here(self) -> bool:
        """A row-parallel bias is added on one rank only: the outputs are summed over ranks."""
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def extra_repr(self) -> str:
        sizes = self.shard_sizes or self.output_size
        tp = f", tp={self.tp.rank}/{self.tp.size}" if self.tp.is_parallel else ""
        return f"in={self.input_size}, out={sizes}, bias={self.has_bias}{tp}"

    def process_weights(self) -> None:
        """Let the quant method finish the loaded weight (pack, quantize)."""
        self.quant_method.process_weights_after_loading(self)
        self.processed = True


def _packed_range(start: int, size: int, pack: int, what: str) -> tuple[int, int]:
    """(start, length) in packed elements of [start, start + size) unpacked ones."""
    if start % pack or size % pack:
        raise ValueError(f"cannot slice {what} {start}..{start + size} out of elements packing {pack}")
    return start // pack, size // pack


class ColumnParallelLinear(Linear):
    """Output rows split over the ranks (each packed shard split on its own, so a rank's q/k/v or
    gate/up stay packed): the output is this rank's slice, no communication. The layers after it
    (attention over local heads, the act(gate) * up) work on the slice."""

    def parallel_group(self) -> TPGroup:
        return current_group()

    def partition_outputs(self, global_shards: list[int]) -> list[tuple[int, int, int]]:
        parts = []
        for rows in global_shards:
            start, local = shard_range(rows, self.tp.rank, self.tp.size)
            parts.append((rows, local, start))
        return parts


class QKVParallelLinear(ColumnParallelLinear):
    """q/k/v packed, split by heads: each rank keeps num_heads / tp query heads, and its KV heads:
    num_kv_heads / tp of them, or, with fewer KV heads than ranks, the one KV head its query
    heads attend to (replicated over tp / num_kv_heads ranks, as in vLLM)."""

    def __init__(self, input_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 quant_method: LinearMethod | None = None, dtype: torch.dtype | None = None):
        self.head_dim, self.total_heads, self.total_kv_heads = head_dim, num_heads, num_kv_heads
        super().__init__(input_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias, quant_method, dtype)
        self.num_heads, self.num_kv_heads = local_heads(num_heads, num_kv_heads, self.tp)

    def partition_outputs(self, global_shards: list[int]) -> list[tuple[int, int, int]]:
        heads, kv_heads = local_heads(self.total_heads, self.total_kv_heads, self.tp)
        first_kv = self.tp.rank * self.total_kv_heads // self.tp.size
        d = self.head_dim
        return [(global_shards[0], heads * d, self.tp.rank * heads * d),
                (global_shards[1], kv_heads * d, first_kv * d),
                (global_shards[2], kv_heads * d, first_kv * d)]


def local_heads(num_heads: int, num_kv_heads: int, tp: TPGroup) -> tuple[int, int]:
    """(query heads, KV heads) one rank holds."""
    if num_heads % tp.size:
        raise ValueError(f"{num_heads} attention heads do not divide over {tp.size} tensor-parallel ranks")
    if num_kv_heads % tp.size and tp.size % num_kv_heads:
        raise ValueError(f"{num_kv_heads} KV heads neither divide over nor replicate onto {tp.size} "
                         "tensor-parallel ranks")
    return num_heads // tp.size, max(num_kv_heads // tp.size, 1)


class RowParallelLinear(Linear):
    """Input columns split over the ranks (its input is a column-parallel layer's slice); each
    rank's partial product is summed over the ranks (one all-reduce), the bias added once."""

    def parallel_group(self) -> TPGroup:
        return current_group()

    def partition_input(self, input_size: int) -> tuple[int, int]:
        return shard_range(input_size, self.tp.rank, self.tp.size)

    def zero_bias_here(self) -> bool:
        return self.tp.rank > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.quant_method.apply(self, x))


def process_weights_after_loading(model: nn.Module) -> None:
    """Finish every linear layer's weights not finished yet."""
    for module in model.modules():
        if isinstance(module, Linear) and not module.processed:
            module.process_weights()
