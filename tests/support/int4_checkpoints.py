"""GPTQ and AWQ int4 checkpoints written from the formats' published layouts, independently of
lmserve's loader (plain torch; benchmarks could use them too).

From a dense checkpoint directory, `write_int4_pair` quantizes every decoder projection
(q/k/v/o, gate/up/down) to 4-bit codes per group of input columns, and writes two directories:
- the quantized checkpoint, packed as AutoGPTQ or AutoAWQ pack (below), with the
  `quantization_config` they write into config.json;
- the same model with dense weights w = (q - z) * s (fp16 scales, exactly what the packed
  tensors mean): the reference a correct loader must reproduce.

Layouts (AutoGPTQ `QuantLinear.pack`, AutoAWQ `WQLinear_GEMM.from_linear`), for a weight [n, k]
with intweight = codes^T [k, n]:
- GPTQ: qweight int32 [k / 8, n], qweight[i, c] = sum_j intweight[8i + j, c] << 4j;
  qzeros int32 [groups, n / 8], nibble j of [g, c] = zero[g, 8c + j] - 1 (the original format
  stores z - 1); scales fp16 [groups, n]; g_idx int32 [k] = the group of each input column
  (c // group_size; with desc_act, columns are quantized in an activation order `perm` and
  g_idx[perm[i]] = i // group_size). Symmetric: z = 8.
- AWQ: qweight int32 [k, n / 8], nibble i of [r, c] = intweight[r, 8c + order[i]],
  order = (0, 2, 4, 6, 1, 3, 5, 7); qzeros int32 [groups, n / 8] in the same order, z as is;
  scales fp16 [groups, n].
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _to_int32(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values (held in int64) as int32 bit patterns."""
    return torch.where(values >= 2 ** 31, values - 2 ** 32, values).to(torch.int32)


def pack_rows(intweight: torch.Tensor) -> torch.Tensor:
    """[k, n] codes -> int32 [k / 8, n]: row 8i + j in bits 4j."""
    k, n = intweight.shape
    grouped = intweight.to(torch.int64).reshape(k // 8, 8, n)
    return _to_int32(sum(grouped[:, j] << (4 * j) for j in range(8)))


def pack_columns(values: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """[r, n] codes -> int32 [r, n / 8]: nibble i holds column 8c + order[i]."""
    r, n = values.shape
    grouped = values.to(torch.int64).reshape(r, n // 8, 8)
    return _to_int32(sum(grouped[..., order[i]] << (4 * i) for i in range(8)))


def quantize(w: torch.Tensor, group: int, sym: bool, g_idx: torch.Tensor):
    """Codes [n, k], scales fp16 [groups, n], zeros [groups, n] for w [n, k] with column c in
    group g_idx[c] (min/max per group; zeros kept in 1..15 so GPTQ's z - 1 stays a nibble)."""
    n, k = w.shape
    groups = k // group
    scales = torch.empty(groups, n)
    zeros = torch.empty(groups, n)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if sym:
            scales[g] = (cols.abs().amax(dim=1) / 7.5).clamp(min=1e-6)
            zeros[g] = 8
        else:
            lo, hi = cols.amin(dim=1).clamp(max=0), cols.amax(dim=1).clamp(min=0)
            scales[g] = ((hi - lo) / 15).clamp(min=1e-6)
            zeros[g] = torch.round(-lo / scales[g]).clamp(1, 15)
    scales = scales.half()
    s, z = scales.float()[g_idx].T, zeros[g_idx].T  # per weight [n, k]
    codes = torch.round(w / s + z).clamp(0, 15).to(torch.int64)
    dequantized = (codes - z) * s
    return codes, scales, zeros.to(torch.int64), dequantized


def write_int4_pair(dense: Path, quantized: Path, reference: Path, fmt: str, group: int = 32, sym: bool = False,
                    desc_act: bool = False, seed: int = 0, projections: tuple[str, ...] = PROJECTIONS) -> None:
    """`dense` (a safetensors checkpoint) -> a `fmt` ("gptq" or "awq") checkpoint and its dense
    reference; `projections`: the module names quantized."""
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(dense / "model.safetensors"))
    packed, ref = {}, {}
    orders: dict[tuple, torch.Tensor] = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if len(parts) < 3 or parts[-2] not in projections or parts[-1] != "weight":
            packed[name] = ref[name] = tensor
            continue
        w = tensor.float()
        n, k = w.shape
        size = k if group == -1 else group
        g_idx = torch.arange(k) // size
        if desc_act:
            # One activation order per input (q/k/v share one, gate/up share one), as GPTQ's
            # Hessian of the shared input gives them.
            shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
            key = (".".join(parts[:-2]), shared.get(parts[-2], parts[-2]))
            perm = orders.setdefault(key, torch.randperm(k, generator=generator))
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[perm] = torch.arange(k) // size
        codes, scales, zeros, dequantized = quantize(w, size, sym, g_idx)
        base = name[:-len(".weight")]
        ref[name] = dequantized.to(tensor.dtype)
        if fmt == "gptq":
            packed[f"{base}.qweight"] = pack_rows(codes.T)
            packed[f"{base}.qzeros"] = pack_columns(zeros - 1)
            packed[f"{base}.g_idx"] = g_idx.to(torch.int32)
        else:
            packed[f"{base}.qweight"] = pack_columns(codes.T, AWQ_ORDER)
            packed[f"{base}.qzeros"] = pack_columns(zeros, AWQ_ORDER)
        packed[f"{base}.scales"] = scales
    for directory, content in ((quantized, packed), (reference, ref)):
        directory.mkdir(parents=True, exist_ok=True)
        for f in dense.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy(f, directory / f.name)
        save_file({k: v.contiguous() for k, v in content.items()}, str(directory / "model.safetensors"))
    cfg = json.loads((quantized / "config.json").read_text())
    if fmt == "gptq":
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": desc_act,
                                      "sym": sym, "checkpoint_format": "gptq", "true_sequential": True}
    else:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                      "version": "gemm"}
    (quantized / "config.json").write_text(json.dumps(cfg))
