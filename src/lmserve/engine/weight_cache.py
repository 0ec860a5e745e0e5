"""The process-wide cache of loaded weights and tokenizers.

Engines of one process that serve the same checkpoint (a model and its Pro/ replica, several
test engines) share its weights and tokenizer: both are read-only once loaded. Each engine keeps
its own KV cache and scheduler. Weights go away with the last engine using them (a weak
reference); a checkpoint rewritten on disk (another mtime) is loaded afresh.
"""

from __future__ import annotations

import logging
import time
import weakref

import torch

from lmserve.engine.tokenizer import load_tokenizer
from lmserve.models.loader import load_model

log = logging.getLogger("lmserve.engine")

_SHARED_WEIGHTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_SHARED_TOKENIZERS: dict[tuple, object] = {}


def shared_weights(ckpt, config, dtype: torch.dtype, device: torch.device, quantization: str,
                   quantized_max_rows: int | None, load_format: str = "auto"):
    """The checkpoint's model on `device` as these options build it, loaded once per process."""
    key = (str(ckpt.path.resolve()), ckpt.path.stat().st_mtime_ns, str(dtype), str(device), quantization,
           quantized_max_rows, load_format)
    model = _SHARED_WEIGHTS.get(key)
    if model is None:
        started = time.perf_counter()
        model = load_model(ckpt, config, dtype, device, quantization, quantized_max_rows, load_format)
        _SHARED_WEIGHTS[key] = model
        log.info("weights of %s loaded in %.1fs", ckpt.path.name, time.perf_counter() - started)
    return model


def shared_tokenizer(ckpt):
    """The checkpoint's tokenizer (None for a checkpoint without one), loaded once per process."""
    key = (str(ckpt.path.resolve()), ckpt.path.stat().st_mtime_ns)
    if key not in _SHARED_TOKENIZERS:
        started = time.perf_counter()
        _SHARED_TOKENIZERS[key] = load_tokenizer(ckpt)
        log.info("tokenizer of %s loaded in %.1fs", ckpt.path.name, time.perf_counter() - started)
    return _SHARED_TOKENIZERS[key]
