"""Forcing the CUDA dispatch on CPU tensors: every layer on the Triton kernels (norms, rotary,
gated activations, MoE experts), which Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py)
runs on the CPU. Without it, half-type CPU tensors would take the C++ fused ops and float32 ones
PyTorch's (layers/fused.py)."""

from __future__ import annotations

from lmserve.layers import fused


def force_triton(monkeypatch) -> None:
    from lmserve.layers import triton_ops

    monkeypatch.setattr(fused, "use_fused", lambda x: True)
    monkeypatch.setattr(fused, "use_triton", lambda x: True)
    monkeypatch.setattr(fused, "ops", lambda x: triton_ops)
