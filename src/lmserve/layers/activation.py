"""Activations by the names checkpoints' configs use (`hidden_act`, `hidden_activation`)."""

from __future__ import annotations

import functools

import torch.nn.functional as F

# Config name -> the function it means: "silu", "gelu" (erf) or "gelu_tanh" (tanh approximation).
# The fused gated kernel (layers/triton_ops.py) takes these kinds.
_KINDS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
}
_FUNCTIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def activation_kind(name: str) -> str:
    """The canonical kind of a config's activation name ("gelu_new" -> "gelu_tanh")."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r} (supported: {', '.join(sorted(_KINDS))})") from None


def get_activation(name: str):
    return _FUNCTIONS[activation_kind(name)]
