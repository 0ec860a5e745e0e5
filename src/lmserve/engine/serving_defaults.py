"""The engine options `lmserve serve` fills in for a deployment that leaves them out.

The fastest configuration on a CPU is the default: a GGUF whose linear weights are mostly 4-bit
blocks (Q4_0 / Q4_1 / Q4_K; a MoE file's stacked experts count with the rest) is served from
those blocks (`quantization: int4`, the file's own codes and scales: no requantizing) instead of
a dequantized bf16 copy. At batch 1 that streams ~3.5x fewer bytes per token (docs/benchmarks.md:
the VNNI int4 kernel against oneDNN bf16).

The int4 kernel wins only for few rows per product; for prefill and large decode batches the
bf16 weights are faster. `quantized_max_rows` keeps a bf16 copy for those products when it is
cheap: when the dense weights take at most `DENSE_COPY_SHARE` of the memory available at start
(the bundled 135M model: ~270 MB). A model too large for that keeps only the 4-bit weights.
Where the crossover lies differs by machine (4 rows on a Zen 4, 2 to 4 on an AMX Xeon), so it is
measured at start (layers/quantization/kernel_timing.py, ~0.3 s), as is which int4 kernel runs.

Applies only when the deployment sets neither `quantization` nor `dtype` (an explicit dtype,
such as the float32 the exact-parity tests use, asks for dense weights in that dtype), runs on
the CPU, and is not tensor-parallel.
"""

from __future__ import annotations

import logging
from typing import Any

from lmserve.device import choose_device
from lmserve.layers.quantization import kernel_timing
from lmserve.models.loader import Checkpoint, resolve_checkpoint

log = logging.getLogger("lmserve.engine")

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # GGUF block types whose grid the int4 kernel takes as is
DENSE_COPY_SHARE = 0.25


def _block_weight(t) -> bool:
    """A transformer block's matrix: 2-D, or a MoE layer's experts stacked in 3-D."""
    return t.name.startswith("blk.") and len(t.shape) in (2, 3)


def int4_share(ckpt: Checkpoint) -> float:
    """The share of the transformer blocks' weights (elements) stored as Q4_0/Q4_1/Q4_K blocks."""
    if ckpt.format != "gguf":
        return 0.0
    total = int4 = 0
    for t in ckpt.gguf.reader.tensors:
        if not _block_weight(t):
            continue
        n = int(t.n_elements)
        total += n
        if t.tensor_type.name in INT4_TYPES:
            int4 += n
    return int4 / total if total else 0.0


def _available_bytes() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def serving_options(source: str, dtype: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` (LLMEngine keyword arguments), with the int4 fast path filled in where it applies."""
    if options.get("quantization") is not None or dtype != "auto" or options.get("load_format") == "dummy":
        return options
    if (options.get("tensor_parallel_size") or 1) > 1 or choose_device(options.get("device", "auto")).type != "cpu":
        return options
    ckpt = resolve_checkpoint(source)
    share = int4_share(ckpt)
    if share < 0.5:  # mostly other block types (Q5_*, Q6_K, Q8_0, float): dense weights
        return options
    out = dict(options, quantization="int4")
    dense_bytes = 2 * sum(int(t.n_elements) for t in ckpt.gguf.reader.tensors if _block_weight(t))
    if options.get("quantized_max_rows") is None and dense_bytes <= DENSE_COPY_SHARE * _available_bytes():
        # Products of up to this many rows run the int4 kernel, larger ones the kept bf16 copy
        # (at least 1: batch-1 decode is what the 4-bit path is for, and reads 3.5x fewer bytes).
        out["quantized_max_rows"] = max(kernel_timing.timings().int4_max_rows(), 1)
    log.info("%s: %.0f%% of its weights are 4-bit blocks: served from them (quantization int4%s; "
             "--quantization none for dense weights)", source, 100 * share,
             f", a bf16 copy for products of more than {out['quantized_max_rows']} rows"
             if out.get("quantized_max_rows") is not None else "")
    return out

