"""FP8 (e4m3) checkpoints: compressed-tensors (`quant_method: compressed-tensors`, the format
vLLM's and llm-compressor's quantizers write) and fbgemm (`quant_method: fbgemm_fp8`, Meta's
Llama-3.1 FP8 releases).

The weight is float8_e4m3fn [n, k] with a float32 scale per tensor (one per checkpoint shard:
q, k and v each have theirs) or per output row (`weight_scale` [n, 1]); w = fp8 * scale. The
activations are quantized per tensor with a checkpoint scale (`input_scale`, static), or per
token at run time (dynamic; fbgemm's, bounded by `activation_scale_ub`).

- CUDA with compute capability >= 8.9 (Ada, Hopper): torch._scaled_mm on fp8 activations and
  weights, with a per-row weight scale (per-tensor scales are expanded to rows at load: exact)
  and a per-token (dynamic) or per-tensor (static) activation scale: the weight streams at one
  byte per value, which is what makes decode ~2x bf16's speed.
- Elsewhere (CPU, older GPUs): weight-only. The fp8 weight is kept and dequantized to the
  compute dtype on every call, activations are not quantized: the slow correct path (the memory
  of fp8, the speed of less than bf16), so the same checkpoint loads and answers anywhere.

MoE experts (Qwen2-MoE, DeepSeek-V2: `...experts.{e}.gate_proj.weight` fp8 with its own
`weight_scale` per expert and projection) are held stacked in fp8 as the checkpoint has them
(`Fp8ExpertsMethod`) and run weight-only on every device: each expert that got tokens has its
fp8 weight dequantized for the call (no torch._scaled_mm grouped path yet).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.layers.linear import (
    WEIGHT_LAYOUT,
    WHOLE_LAYOUT,
    DenseLinearMethod,
    Linear,
    LinearMethod,
    ShardLayout,
    create_bias,
    set_weight_loader,
)
from lmserve.layers.quantization.base import QuantizationConfig, QuantizationError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def scaled_mm_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Config(QuantizationConfig):
    """An FP8 checkpoint's settings, read from compressed-tensors' or fbgemm's config."""

    from_checkpoint = True

    def __init__(self, cfg: dict, fmt: str):
        self.name = fmt
        self.ignore: tuple[str, ...] = ()
        self.activation_ub: float | None = None
        if fmt == "fbgemm_fp8":
            self.per_channel, self.static_input = True, False
            self.ignore = tuple(cfg.get("modules_to_not_convert") or ())
            self.activation_ub = cfg.get("activation_scale_ub")
            return
        groups = list((cfg.get("config_groups") or {}).values())
        if len(groups) != 1:
            raise QuantizationError(f"compressed-tensors: {len(groups)} config groups; one FP8 group is supported")
        weights, inputs = groups[0].get("weights") or {}, groups[0].get("input_activations")
        if weights.get("type") != "float" or int(weights.get("num_bits", 0)) != 8:
            raise QuantizationError(f"compressed-tensors: weights {weights.get('type')}/{weights.get('num_bits')} "
                                    "bits are not supported (float 8-bit only)")
        if weights.get("strategy") not in ("tensor", "channel"):
            raise QuantizationError(f"compressed-tensors: weight strategy {weights.get('strategy')!r} is not "
                                    "supported (tensor, channel)")
        self.per_channel = weights["strategy"] == "channel"
        self.static_input = bool(inputs) and not inputs.get("dynamic", True)
        self.ignore = tuple(i for i in cfg.get("ignore") or () if not i.startswith("re:"))

    def skipped_modules(self) -> tuple[str, ...]:
        return self.ignore

    def linear_method(self, layer: Linear, name: str) -> LinearMethod | str:
        return Fp8LinearMethod(self)

    def experts_method(self, experts, name: str):
        return Fp8ExpertsMethod(self)

    def dense_method(self, layer: Linear, name: str) -> LinearMethod:
        return Fp8DequantizedMethod(self)


class Fp8LinearMethod(LinearMethod):
    def __init__(self, config: Fp8Config | None):
        self.config = config  # None: quantized at load from a dense weight (`quantization: fp8`)

    def create_weights(self, layer: Linear, dtype: torch.dtype | None) -> None:
        if self.config is None:
            DenseLinearMethod().create_weights(layer, dtype)
            return
        shards = len(layer.shard_sizes or [None])

        def param(name, shape, tensor_dtype, layout):
            p = nn.Parameter(torch.empty(shape, dtype=tensor_dtype), requires_grad=False)
            setattr(layer, name, p)
            set_weight_loader(p, layer.sharded_loader(layout))

        param("weight", (layer.output_size, layer.input_size), FP8, WEIGHT_LAYOUT)
        if self.config.per_channel:
            param("weight_scale", (layer.output_size, 1), torch.float32, ShardLayout(0, None))
        else:
            param("weight_scale", (shards,), torch.float32, WHOLE_LAYOUT)
        if self.config.static_input:
            param("input_scale", (shards,), torch.float32, WHOLE_LAYOUT)
        create_bias(layer, dtype)

    def process_weights_after_loading(self, layer: Linear) -> None:
        if self.config is None:  # per-channel quantization of the dense weight
            w = layer.weight.detach().float()
            scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_(min=1e-12)
            layer.weight = nn.Parameter((w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8), requires_grad=False)
            layer.row_scale = scale
            self.input_scale = None
        else:
            scale = layer.weight_scale.data.float()
            if not self.config.per_channel:  # one per shard: every row of a shard takes its shard's
                sizes = layer.shard_sizes or [layer.output_size]
                scale = torch.repeat_interleave(scale, torch.tensor(sizes, device=scale.device))
            layer.row_scale = scale.reshape(-1).contiguous()
            del layer.weight_scale
            # Static activations: one scale for the product; shards may differ, take the largest (as vLLM).
            self.input_scale = layer.input_scale.data.max().reshape(1, 1) if self.config.static_input else None
            if self.config.static_input:
                del layer.input_scale
        self.use_scaled_mm = scaled_mm_available(layer.weight.device)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.use_scaled_mm:
            y = self._scaled_mm(layer, x)
        else:
            # The slow correct path: dequantize the weight for this call.
            w = (layer.weight.to(torch.float32) * layer.row_scale[:, None]).to(x.dtype)
            y = F.linear(x, w)
        return y if layer.bias is None else y + layer.bias

    def _scaled_mm(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.input_scale is not None:
            x_scale = self.input_scale.expand(x2.shape[0], 1).contiguous()
        else:  # dynamic per token
            bound = x2.abs().amax(dim=1, keepdim=True).float()
            if self.config is not None and self.config.activation_ub is not None:
                bound = bound.clamp(max=self.config.activation_ub)
            x_scale = (bound / FP8_MAX).clamp(min=1e-12)
        x8 = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        y = torch._scaled_mm(x8, layer.weight.t(), scale_a=x_scale, scale_b=layer.row_scale[None, :],
                             out_dtype=torch.bfloat16)
        return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])



class Fp8DequantizedMethod(Fp8LinearMethod):
    """A layer the model family keeps dense (DeepSeek's kv_b_proj: the absorbed MLA decode reads
    its weight) that the checkpoint stored in fp8: the checkpoint's fp8 tensors are loaded, then
    dequantized once to a dense weight in the compute dtype (the layer is small: one per layer)."""

    def create_weights(self, layer: Linear, dtype: torch.dtype | None) -> None:
        super().create_weights(layer, dtype)
        self.dtype = dtype or torch.get_default_dtype()

    def process_weights_after_loading(self, layer: Linear) -> None:
        super().process_weights_after_loading(layer)
        weight = (layer.weight.float() * layer.row_scale[:, None]).to(self.dtype)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        del layer.row_scale
        self.dense = DenseLinearMethod()
        self.dense.process_weights_after_loading(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return self.dense.apply(layer, x)

class Fp8OnlineConfig(QuantizationConfig):
    """`quantization: fp8` on a dense checkpoint: per-channel fp8 weights quantized at load."""

    name = "fp8"

    def linear_method(self, layer: Linear, name: str) -> LinearMethod | str:
        return Fp8LinearMethod(None)


class Fp8ExpertsMethod:
    """A MoE layer's experts from an FP8 checkpoint: stacked fp8 weights ([E, 2I, H] gate/up,
    [E, H, I] down) with their scales per row (per channel) or per tensor (one per expert and
    checkpoint tensor: gate's, up's and down's), loaded expert by expert through FusedExperts'
    stacked loader, so tensor and expert parallelism slice them as they slice dense experts.

    Applied weight-only, per call: an expert's fp8 weight is converted to the compute dtype when
    tokens are routed to it, through a 256-entry table of every e4m3 value (exact: e4m3 values
    are bf16 and float32 values; measured ~3x faster than PyTorch's fp8 cast on a CPU, which
    converts element by element), and its per-row scale multiplies the product's rows. Not
    dequantized once at load: that would hold the experts at bf16's size (twice fp8's; the
    experts are most of a MoE model's bytes, which is why it ships in fp8). The cost is paid per
    step on the weights of the experts the step runs: on a CPU batch-1 decode runs at a fraction
    of bf16's (docs/benchmarks.md, bench_quantized_experts.py), the price of the memory; a GPU
    converts at its memory bandwidth. Static activation scales
    (`input_scale`) are read and dropped: this path does not quantize activations."""

    def __init__(self, config: Fp8Config):
        self.config = config
        self._tables: dict = {}

    def create_weights(self, experts) -> None:
        e, h, i = experts.local_experts, experts.hidden, experts.intermediate
        for projection, rows, cols in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
            delattr(experts, projection)  # the dense stack, replaced before anything is loaded
            experts.register_parameter(projection, experts.stacked_parameter(projection, (e, rows, cols), FP8))
            # Per tensor: one scale per checkpoint tensor, gate's and up's side by side.
            per_tensor = (e, 2, 1) if projection == "gate_up_proj" else (e, 1)
            if self.config.per_channel:
                scale = experts.stacked_parameter(projection, (e, rows, 1), torch.float32, input_dim=None)
            else:
                scale = experts.stacked_parameter(projection, per_tensor, torch.float32, output_dim=None,
                                                  input_dim=None)
            experts.register_parameter(f"{projection}_weight_scale", scale)
            if self.config.static_input:
                experts.register_parameter(f"{projection}_input_scale", experts.stacked_parameter(
                    projection, per_tensor, torch.float32, output_dim=None, input_dim=None))

    def process_weights_after_loading(self, experts) -> None:
        self.row_scales = {}
        for projection in ("gate_up_proj", "down_proj"):
            scale = getattr(experts, f"{projection}_weight_scale").detach().float()
            e, rows = getattr(experts, projection).shape[:2]
            if not self.config.per_channel:  # every row of a checkpoint tensor takes its tensor's scale
                scale = scale.reshape(e, -1, 1).expand(e, scale[0].numel(), rows // scale[0].numel())
            self.row_scales[projection] = scale.reshape(e, rows).contiguous()
            delattr(experts, f"{projection}_weight_scale")
            if self.config.static_input:
                delattr(experts, f"{projection}_input_scale")

    def apply_expert(self, experts, local: int, projection: str, x: torch.Tensor) -> torch.Tensor:
        codes = getattr(experts, projection)[local]
        table = self._tables.get((x.dtype, x.device))
        if table is None:  # every e4m3 bit pattern's value, in the compute dtype
            table = torch.arange(256, dtype=torch.uint8, device=x.device).view(FP8).to(x.dtype)
            self._tables[(x.dtype, x.device)] = table
        w = table.index_select(0, codes.view(torch.uint8).reshape(-1).int()).view(codes.shape)
        # The scale is per output row: applied to the product's rows (exact up to rounding order).
        y = F.linear(x, w)
        return (y.float() * self.row_scales[projection][local]).to(x.dtype)
