"""The quantization seam (as vLLM's QuantizationConfig / LinearMethodBase).

A `QuantizationConfig` is picked once per model load, from the checkpoint's
`quantization_config` or the `quantization` option (`resolve`, in __init__.py). The loader builds
the model with its linear layers' parameters deferred, then `assign_linear_methods` asks the
config for each layer's method by name: the method creates the layer's parameters (each with a
shard-aware weight loader, so tensor parallelism slices them as it slices a dense weight),
post-processes them once loading is done (repacking for this device's kernel) and applies them.

A layer the config leaves dense (the LM head, a family's dense modules, a shape its kernel
refuses) says why once in the log; a layer a checkpoint's format cannot run here fails the load
with one line naming the layer and the reason.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lmserve.layers.linear import DenseLinearMethod, Linear, LinearMethod

logger = logging.getLogger(__name__)


class QuantizationError(ValueError):
    """A checkpoint's quantization this device or layer cannot run (raised at load)."""


class QuantizationConfig:
    """Which method each linear layer of one model gets."""

    name = "none"
    # The checkpoint's tensors are already quantized (GPTQ, AWQ, FP8): every linear layer the
    # checkpoint quantized must take the method, none may silently stay dense.
    from_checkpoint = False

    def linear_method(self, layer: Linear, name: str) -> LinearMethod | str:
        """The layer's method, or a string: why it stays dense."""
        raise NotImplementedError

    def experts_method(self, experts, name: str):
        """A MoE layer's experts' method (layers/moe.py FusedExperts), or a string: why they
        stay dense."""
        return "no quantized experts method for this format"

    def dense_method(self, layer: Linear, name: str) -> LinearMethod | None:
        """For a layer the model family keeps dense but the checkpoint quantized: a method that
        loads the checkpoint's tensors and dequantizes them once (None: not supported)."""
        return None

    def check_device(self, device: torch.device) -> None:
        """Raise QuantizationError if this config cannot run on `device` at all."""

    def skipped_modules(self) -> tuple[str, ...]:
        """Module names (suffixes) the checkpoint left unquantized."""
        return ()


def process_experts(model: nn.Module) -> None:
    """Finish the quantized MoE experts' weights the loader has not finished yet."""
    from lmserve.layers.moe import FusedExperts

    for module in model.modules():
        if isinstance(module, FusedExperts):
            module.process_weights()


def name_matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def assign_linear_methods(model: nn.Module, config: QuantizationConfig | None,
                          dense: tuple[str, ...] = (), quantized_in_checkpoint: set[str] = frozenset()) -> list[Linear]:
    """Give every linear layer built without parameters its method (creating them), and every
    MoE layer's experts theirs; returns the linear layers that got a non-dense method. `dense`:
    module names (suffixes) that stay dense; those among `quantized_in_checkpoint` (module names
    whose checkpoint tensors are quantized) take the config's `dense_method`."""
    from lmserve.layers.moe import FusedExperts

    quantized, kept = [], {}
    for name, layer in model.named_modules():
        if isinstance(layer, FusedExperts) and config is not None:
            try:
                method = config.experts_method(layer, name)
                if isinstance(method, str) and config.from_checkpoint:
                    # The checkpoint's experts are quantized tensors: dense parameters cannot take them.
                    raise QuantizationError(f"quantized experts cannot load: {method}")
            except QuantizationError as e:
                raise QuantizationError(f"{config.name}: layer {name}: {e}") from None
            if isinstance(method, str):
                kept.setdefault(method, []).append(name)
            else:
                layer.create_weights(method)
            continue
        if not isinstance(layer, Linear) or layer.quant_method is not None:
            continue
        if config is None:
            method: LinearMethod | str = DenseLinearMethod()
        elif name_matches(name, dense) and name in quantized_in_checkpoint:
            try:
                method = config.dense_method(layer, name)
                if method is None:
                    raise QuantizationError("the model keeps this layer dense, and the checkpoint's tensors "
                                            "cannot be dequantized into it")
            except QuantizationError as e:
                raise QuantizationError(f"{config.name}: layer {name}: {e}") from None
        elif name_matches(name, dense) or name_matches(name, config.skipped_modules()):
            method = "kept dense by the model family or the checkpoint"
        else:
            try:
                method = config.linear_method(layer, name)
            except QuantizationError as e:
                raise QuantizationError(f"{config.name}: layer {name}: {e}") from None
        if isinstance(method, str):
            kept.setdefault(method, []).append(name)
            method = DenseLinearMethod()
        elif not isinstance(method, DenseLinearMethod):
            quantized.append(layer)
        layer.create_weights(method)
    for reason, names in kept.items():
        logger.info("%s: %d layer(s) stay dense (%s): %s%s", config.name, len(names), reason, ", ".join(names[:4]),
                    " ..." if len(names) > 4 else "")
    return quantized
