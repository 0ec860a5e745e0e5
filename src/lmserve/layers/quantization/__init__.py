"""Quantization methods for `Linear` (its `quant_method` seam): see base.py for the seam.

- dense: layers/linear.py's DenseLinearMethod (no config);
- int8 / int4 quantized at load from a dense checkpoint (weight_only.py);
- GGUF Q4_1 grids kept as they are under int4 (gguf.py);
- GPTQ and AWQ int4 checkpoints (gptq.py);
- FP8 checkpoints (compressed-tensors, fbgemm_fp8) and fp8 quantized at load (fp8.py).
All int4 methods run one kernel (int4_kernel.py).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmserve.layers.linear import Linear
from lmserve.layers.quantization.base import QuantizationConfig, QuantizationError, assign_linear_methods, name_matches
from lmserve.layers.quantization.fp8 import Fp8Config, Fp8OnlineConfig
from lmserve.layers.quantization.gptq import GPTQConfig
from lmserve.layers.quantization.int4_kernel import KERNEL_DTYPE, Int4Grid
from lmserve.layers.quantization.weight_only import INT4_GROUP, WEIGHT_ONLY_METHODS, WeightOnlyConfig

QUANTIZATION_CHOICES = ("none", "int8", "int4", "fp8")
# config.json `quantization_config.quant_method` -> config class
CHECKPOINT_FORMATS = {
    "gptq": lambda cfg: GPTQConfig(cfg),
    "awq": lambda cfg: GPTQConfig(cfg, awq=True),
    "compressed-tensors": lambda cfg: Fp8Config(cfg, "compressed-tensors"),
    "fbgemm_fp8": lambda cfg: Fp8Config(cfg, "fbgemm_fp8"),
}

__all__ = ["INT4_GROUP", "KERNEL_DTYPE", "QUANTIZATION_CHOICES", "Int4Grid", "QuantizationConfig",
           "QuantizationError", "assign_linear_methods", "choose_quant_methods", "quantize_model", "resolve"]


def resolve(checkpoint_config: dict[str, Any] | None, quantization: str | None,
            dense_above_rows: int | None = None) -> QuantizationConfig | None:
    """The config a model load uses: the checkpoint's own quantization (its config.json's
    `quantization_config`), else the `quantization` option's; None for a dense model."""
    option = quantization or "none"
    if option not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}; got {quantization!r}")
    if checkpoint_config:
        method = str(checkpoint_config.get("quant_method", "")).lower()
        if method not in CHECKPOINT_FORMATS:
            raise QuantizationError(f"checkpoint quantization {method or '(no quant_method)'!r} is not supported "
                                    f"(supported: {', '.join(CHECKPOINT_FORMATS)})")
        if option != "none":
            raise QuantizationError(f"the checkpoint is already {method}-quantized: quantization {option!r} "
                                    "cannot apply (leave it unset)")
        return CHECKPOINT_FORMATS[method](checkpoint_config)
    if option == "none":
        return None
    if option == "fp8":
        return Fp8OnlineConfig()
    return WeightOnlyConfig(option, dense_above_rows)


def quantize_model(model: nn.Module, quantization: str, skip: tuple[str, ...] = ("lm_head",),
                   dense_above_rows: int | None = None) -> int:
    """Quantize an already loaded dense model's linear layers now (see `choose_quant_methods`);
    returns how many were converted."""
    layers = choose_quant_methods(model, quantization, skip, dense_above_rows)
    for layer in layers:
        layer.process_weights()
    return len(layers)


def choose_quant_methods(model: nn.Module, quantization: str, skip: tuple[str, ...] = ("lm_head",),
                         dense_above_rows: int | None = None) -> list[Linear]:
    """Give every dense `Linear` of a built model (but those named in `skip`, and layers whose
    shape the kernel cannot take) a weight-only method, to be applied by
    `process_weights_after_loading`; returns those layers. The weight-only methods have the dense
    method's parameters, so loaded weights stay where they are. Weights shared with another
    module (a tied head) stay dense."""
    if quantization in (None, "none"):
        return []
    if quantization not in WEIGHT_ONLY_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}; got {quantization!r}")
    config = WeightOnlyConfig(quantization, dense_above_rows)
    config.check_device(next(model.parameters()).device)
    chosen = []
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.deferrable and not name_matches(name, skip):
            method = config.linear_method(module, name)
            if not isinstance(method, str):
                module.quant_method = method
                chosen.append(module)
    return chosen
