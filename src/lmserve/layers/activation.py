"""Activations by the names checkpoints' configs use (`hidden_act`, `hidden_activation`)."""

from __future__ import annotations

import functools

import torch.nn.functional as F

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def get_activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r} (supported: {', '.join(sorted(_ACTIVATIONS))})") from None
