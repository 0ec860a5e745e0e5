"""What every part uses: the engine options this checkout accepts, the variants worth proving, device syncs."""

from __future__ import annotations

import gc

import torch

from lmserve.engine.options import EngineConfig

ENGINE_FIELDS = set(EngineConfig.model_fields)


def accepted(**options) -> dict:
    """Only the options this engine has (attention_backend, cuda_graphs and
    gpu_memory_utilization land with issue 11), so the script runs before and after them."""
    return {k: v for k, v in options.items() if v is not None and k in ENGINE_FIELDS}


def engine_variants(device: torch.device, backends: list[str] | None = None) -> list[dict]:
    """Every attention backend x CUDA-graph setting worth proving on this device (`backends`
    overrides the backends: on CPU, "triton" runs under TRITON_INTERPRET=1)."""
    if "attention_backend" not in ENGINE_FIELDS:
        backends = [None]
    elif backends is None:
        backends = ["triton", "reference"] if device.type == "cuda" else ["reference"]
    graphs: list[bool | None] = [None]
    if "cuda_graphs" in ENGINE_FIELDS and device.type == "cuda":
        graphs = [True, False]
    return [accepted(attention_backend=b, cuda_graphs=g) for b in backends for g in graphs]


def backend_unavailable(options: dict, device: torch.device, kv_specs: list) -> str | None:
    """Why the asked attention backend cannot serve this model here (the selector's own
    reason, e.g. MLA layers for Triton), or None."""
    if options.get("attention_backend") != "triton":
        return None
    try:
        from lmserve.attention.selector import triton_unavailable_reason
    except ImportError:  # a selector without the function: let the engine say it
        return None
    return triton_unavailable_reason(device, kv_specs)


def variant_label(options: dict) -> str:
    parts = [f"backend={options['attention_backend']}"] if "attention_backend" in options else []
    if "cuda_graphs" in options:
        parts.append("graphs=" + ("on" if options["cuda_graphs"] else "off"))
    return " ".join(parts) or "defaults"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
