"""Attention backend by device and by the layers' KV specs.

- "reference": attention/reference.py (PyTorch SDPA over gathered pages), correct on every
  device and for every layer kind; the one faster backends are checked against.
- "triton": Triton kernels straight over the paged cache (attention/triton_backend.py), for
  CUDA; plain, sliding-window, softcapped and MLA layers (attention/triton_mla.py). On CPU it
  runs only under Triton's interpreter (TRITON_INTERPRET=1), which is how CI tests it.
- "auto": triton on CUDA when Triton is installed, else the reference.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from lmserve.attention.backend import AttentionBackend
from lmserve.attention.reference import ReferenceBackend
from lmserve.attention.spec import KVCacheSpec, KVSpec, MLAKVCacheSpec

log = logging.getLogger("lmserve.engine")

ATTENTION_BACKENDS = ("auto", "reference", "triton")
# The layer kinds Triton's kernels cover (attention/triton_paged.py, attention/triton_mla.py).
TRITON_KV_SPECS = (KVCacheSpec, MLAKVCacheSpec)


def triton_unavailable_reason(device: torch.device, kv_specs: list[KVSpec]) -> str | None:
    """Why the Triton backend cannot serve these layers on this device (None: it can)."""
    if any(not isinstance(s, TRITON_KV_SPECS) for s in kv_specs):
        return "the model has layers whose KV cache the Triton kernels do not cover"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1), not {device.type}"
    return None


def get_attention_backend(device: torch.device, kv_specs: list[KVSpec], choice: str = "auto") -> AttentionBackend:
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {choice!r}")
    if choice == "reference" or (choice == "auto" and device.type != "cuda"):
        return ReferenceBackend()
    reason = triton_unavailable_reason(device, kv_specs)
    if reason is not None:
        if choice == "triton":
            raise ValueError(f"attention_backend 'triton': {reason}")
        log.info("attention: the reference backend (%s)", reason)
        return ReferenceBackend()
    from lmserve.attention.triton_backend import TritonPagedBackend  # imports Triton: only when chosen

    return TritonPagedBackend(kv_specs, device)
