"""Attention backend by device. CUDA backends (FlexAttention, Triton) register here later; the
CPU SDPA backend serves every device until then, since it is correct everywhere."""

from __future__ import annotations

import torch

from lmserve.attention.cpu_sdpa import CpuSdpaBackend


def get_attention_backend(device: torch.device) -> CpuSdpaBackend:
    return CpuSdpaBackend()
