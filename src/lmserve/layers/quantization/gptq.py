"""GPTQ and AWQ int4 checkpoints (`quant_method: gptq` / `awq` in config.json).

Both store 4-bit codes q, per (group of input columns, output column) a scale s and a zero z, and
mean w = (q - z) * s. Their layouts (AutoGPTQ's and AutoAWQ's packers):
- GPTQ: qweight int32 [k / 8, n] (8 input rows per int32, row 8i + j in bits 4j..4j+3);
  qzeros int32 [groups, n / 8] (8 output columns per int32, same nibble order); scales fp16
  [groups, n]; g_idx int32 [k] (the group of each input column: c // group_size, or an
  activation-order permutation with desc_act). The original format ("gptq", v1) stores z - 1;
  "gptq_v2" stores z. Symmetric checkpoints store z = 8 (v1: 7).
- AWQ (GEMM): qweight int32 [k, n / 8] and qzeros int32 [groups, n / 8], 8 output columns per
  int32 in the order 0, 2, 4, 6, 1, 3, 5, 7 (nibble i holds column 8c + order[i]); scales fp16
  [groups, n]; z stored as is.
group_size -1 is one group per output column (per-channel).

The method creates exactly these parameters (with shard-aware loaders: column-parallel layers
slice the n side, row-parallel ones the k side by whole groups), then at load converts them to the
int4 kernel's grid (scale s, zero (8 - z) * s), with desc_act's columns sorted by group (the
activations are permuted the same way before the product). A layer the kernel cannot take (rows
not a multiple of 16, groups it cannot split, a GPU) keeps the unpacked codes and dequantizes per
call: slow and correct (codes kept one per byte: half of bf16's weight bytes).

MoE experts (`...experts.{e}.gate_proj.qweight` etc., one set per expert and projection, as
AutoGPTQ / AutoAWQ write Qwen2-MoE and DeepSeek-V2) take `GPTQExpertsMethod`: the same tensors
stacked per projection through FusedExperts' loader, converted the same way at load and packed
for the same kernel (`int4_kernel.pack_experts`). A projection the kernel cannot take (its group
size, a GPU, a tensor-parallel slice of desc_act columns that does not form whole kernel groups)
keeps the codes and dequantizes each routed expert per call, as the dense layers do; tensors that
do not pack (widths not whole groups or not multiples of 8) fail the load naming the layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.layers.linear import DenseLinearMethod, Linear, LinearMethod, ShardLayout, create_bias, set_weight_loader
from lmserve.layers.quantization import int4_kernel
from lmserve.layers.quantization.base import QuantizationConfig, QuantizationError
from lmserve.layers.quantization.int4_kernel import Int4Grid
from lmserve.layers.quantization.weight_only import WeightOnlyExpertsMethod

logger = logging.getLogger(__name__)

PACK = 8  # int4 values per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_int32(packed: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(PACK))) -> torch.Tensor:
    """int32 tensor -> uint8 codes, each int32 expanding to 8 values along `dim`; value
    `order[i]` of each 8 is nibble i."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # [..., 8]: nibble i
    inverse = torch.empty(PACK, dtype=torch.long)
    inverse[list(order)] = torch.arange(PACK)
    values = nibbles[..., inverse.to(packed.device)]  # value j = nibble inverse[j]
    values = values.movedim(-1, dim + 1) if dim != packed.dim() - 1 else values
    shape = list(packed.shape)
    shape[dim] *= PACK
    return values.reshape(shape).to(torch.uint8)


def decode(cfg: GPTQConfig, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
           g_idx: torch.Tensor | None, group: int, input_start: int = 0):
    """One weight's packed tensors (as the checkpoint lays them out; `input_start`: the first input
    column this rank holds) -> codes uint8 [k, n], zeros float [groups, n] (z itself), scales
    float [groups, n] and each input column's group (long [k], numbering this rank's groups)."""
    if cfg.awq:
        codes = unpack_int32(qweight, 1, AWQ_ORDER)  # [k, n]
        zeros = unpack_int32(qzeros, 1, AWQ_ORDER)
        g_idx = torch.arange(codes.shape[0]) // group  # AWQ has no activation order
    else:
        codes = unpack_int32(qweight, 0)  # [k, n]
        zeros = unpack_int32(qzeros, 1)
        g_idx = g_idx.long()
        if not cfg.desc_act:  # groups were sliced with the columns: local group numbers
            g_idx = g_idx - input_start // group
    scales = scales.float()
    if g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= scales.shape[0]):
        raise QuantizationError(f"g_idx names groups outside 0..{scales.shape[0] - 1}")
    return codes, zeros.float() + cfg.zero_offset, scales, g_idx


@dataclass
class KernelGrid:
    """A decoded weight in the int4 kernel's terms: columns sorted by group (`perm`: the
    activations' permutation, None for the identity), and the grid, or why the kernel refuses it."""

    perm: torch.Tensor | None
    codes: torch.Tensor  # uint8 [n, k], sorted columns
    sorted_groups: torch.Tensor  # the group of each sorted column
    grid: Int4Grid | None
    refusal: str | None


def to_kernel_grid(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                   group: int) -> KernelGrid:
    """GPTQ / AWQ's w = (q - z) * s as the int4 kernel's grid (scale s, zero (8 - z) * s), with
    desc_act's columns sorted by group."""
    order = torch.argsort(g_idx, stable=True)
    perm = None if torch.equal(order, torch.arange(order.numel())) else order
    sorted_groups = g_idx[order]
    codes = codes[order].T.contiguous()  # [n, k] in sorted column order
    n, k = codes.shape
    kernel_group = int4_kernel.kernel_group(k, group)
    refusal = "no kernel group size divides the group" if kernel_group is None else \
        int4_kernel.kernel_refusal(n, k, kernel_group, codes.device)
    chunks = sorted_groups.view(-1, kernel_group) if refusal is None else None
    if chunks is not None and not (chunks == chunks[:, :1]).all():
        refusal = "activation-order groups do not form whole kernel groups"
    grid = None
    if refusal is None:
        starts = slice(0, k, kernel_group)
        col_scale = scales[sorted_groups[starts]].T  # [n, k / kernel_group]
        col_zero = ((8 - zeros) * scales)[sorted_groups[starts]].T
        grid = Int4Grid(codes, col_scale.contiguous(), col_zero.contiguous())
    return KernelGrid(perm, codes, sorted_groups, grid, refusal)


class GPTQConfig(QuantizationConfig):
    from_checkpoint = True

    def __init__(self, cfg: dict, awq: bool = False):
        self.awq = awq
        self.name = "awq" if awq else "gptq"
        self.bits = int(cfg.get("bits", cfg.get("w_bit", 4)))
        self.group_size = int(cfg.get("group_size", cfg.get("q_group_size", 128)))
        self.desc_act = bool(cfg.get("desc_act", False)) and not awq
        fmt = cfg.get("checkpoint_format", "gptq")
        if self.bits != 4:
            raise QuantizationError(f"{self.name}: {self.bits}-bit checkpoints are not supported (4-bit only)")
        if awq and cfg.get("version", "gemm").lower() != "gemm":
            raise QuantizationError(f"awq: version {cfg.get('version')!r} is not supported (GEMM layout only)")
        if awq and not cfg.get("zero_point", True):
            raise QuantizationError("awq: checkpoints without zero points are not supported")
        if not awq and fmt not in ("gptq", "gptq_v2"):
            raise QuantizationError(f"gptq: checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        self.zero_offset = 1 if not awq and fmt == "gptq" else 0  # v1 stores z - 1
        self.not_converted = tuple(cfg.get("modules_to_not_convert") or ())

    def skipped_modules(self) -> tuple[str, ...]:
        return self.not_converted

    def linear_method(self, layer: Linear, name: str) -> LinearMethod | str:
        k, n = layer.global_input_size, sum(rows for rows, _, _ in layer.output_partitions)
        group = k if self.group_size == -1 else self.group_size
        if k % group:
            raise QuantizationError(f"{k} input columns are not whole groups of {group}")
        if k % PACK or layer.input_size % PACK or layer.output_size % PACK:
            raise QuantizationError(f"an [{n}, {k}] weight (this rank: [{layer.output_size}, {layer.input_size}]) "
                                    f"does not pack 8 int4 values per int32")
        return GPTQLinearMethod(self, group)

    def dense_method(self, layer: Linear, name: str) -> LinearMethod:
        return GPTQDequantizedMethod(self, self.linear_method(layer, name).group)

    def experts_method(self, experts, name: str):
        group = self.group_size
        h, gi, i = experts.hidden, experts.global_intermediate, experts.intermediate
        for projection, n, k in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
            kg = k if group == -1 else group
            if (h if projection == "gate_up_proj" else gi) % kg:
                raise QuantizationError(f"{projection}: {h if projection == 'gate_up_proj' else gi} input columns "
                                        f"are not whole groups of {kg}")
            if k % PACK or n % PACK or i % PACK:
                raise QuantizationError(f"{projection}: an expert's [{n}, {k}] weight does not pack 8 int4 values "
                                        "per int32")
        return GPTQExpertsMethod(self)


class GPTQLinearMethod(LinearMethod):
    def __init__(self, config: GPTQConfig, group: int):
        self.config, self.group = config, group

    def create_weights(self, layer: Linear, dtype: torch.dtype | None) -> None:
        k, n, g = layer.input_size, layer.output_size, self.group
        groups = layer.global_input_size // g
        # desc_act: a row-parallel rank's columns use any group, so it keeps every group's scales.
        local_groups, group_pack = (groups, None) if self.config.desc_act else (k // g, g)
        if not self.config.desc_act and layer.input_start % g:
            raise QuantizationError(f"this rank's input columns start at {layer.input_start}, inside a group of {g}")

        def param(name, shape, tensor_dtype, layout):
            p = nn.Parameter(torch.empty(shape, dtype=tensor_dtype), requires_grad=False)
            setattr(layer, name, p)
            set_weight_loader(p, layer.sharded_loader(layout))

        groups_dim = ShardLayout(1, 0 if group_pack else None, output_pack=PACK, input_pack=group_pack or 1)
        scales_dim = ShardLayout(1, 0 if group_pack else None, input_pack=group_pack or 1)
        if self.config.awq:
            param("qweight", (k, n // PACK), torch.int32, ShardLayout(1, 0, output_pack=PACK))
        else:
            param("qweight", (k // PACK, n), torch.int32, ShardLayout(1, 0, input_pack=PACK))
            # q/k/v (gate/up) share their input, so GPTQ gives them one activation order: one g_idx.
            param("g_idx", (k,), torch.int32, ShardLayout(None, 0))
        param("qzeros", (local_groups, n // PACK), torch.int32, groups_dim)
        param("scales", (local_groups, n), torch.float16, scales_dim)
        create_bias(layer, dtype)

    def process_weights_after_loading(self, layer: Linear) -> None:
        cfg, g = self.config, self.group
        codes, zeros, scales, g_idx = decode(cfg, layer.qweight.data, layer.qzeros.data, layer.scales.data,
                                             None if cfg.awq else layer.g_idx.data, g, layer.input_start)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            if hasattr(layer, name):
                delattr(layer, name)
        grid = to_kernel_grid(codes, zeros, scales, g_idx, g)
        self.perm = grid.perm
        n, k = grid.codes.shape
        if grid.refusal is None:
            layer.int4 = int4_kernel.pack(grid.grid)
            self.fallback = False
        else:
            logger.info("%s layer [%d, %d]: %s; dequantizing per call", cfg.name, n, k, grid.refusal)
            layer.codes, layer.col_groups = grid.codes, grid.sorted_groups
            layer.group_scales, layer.group_zeros = scales.T.contiguous(), ((8 - zeros) * scales).T.contiguous()
            self.fallback = True

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm.to(x.device))
        if self.fallback:
            w = ((layer.codes.float() - 8) * layer.group_scales[:, layer.col_groups]
                 + layer.group_zeros[:, layer.col_groups])
            y = F.linear(x, w.to(x.dtype))
        else:
            y = int4_kernel.int4_matmul(x, layer.int4)
        return y if layer.bias is None else y + layer.bias



class GPTQDequantizedMethod(GPTQLinearMethod):
    """A layer the model family keeps dense (DeepSeek's kv_b_proj: the absorbed MLA decode reads
    its weight) that the checkpoint stored as GPTQ / AWQ: its tensors are loaded as the checkpoint
    has them, then dequantized once to a dense weight in the compute dtype (w = (q - z) * s)."""

    def create_weights(self, layer: Linear, dtype: torch.dtype | None) -> None:
        super().create_weights(layer, dtype)
        self.dtype = dtype or torch.get_default_dtype()

    def process_weights_after_loading(self, layer: Linear) -> None:
        cfg = self.config
        codes, zeros, scales, g_idx = decode(cfg, layer.qweight.data, layer.qzeros.data, layer.scales.data,
                                             None if cfg.awq else layer.g_idx.data, self.group, layer.input_start)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            if hasattr(layer, name):
                delattr(layer, name)
        weight = ((codes.float() - zeros[g_idx]) * scales[g_idx]).T  # [n, k]
        layer.weight = nn.Parameter(weight.to(self.dtype).contiguous(), requires_grad=False)
        self.dense = DenseLinearMethod()
        self.dense.process_weights_after_loading(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return self.dense.apply(layer, x)

class GPTQExpertsMethod(WeightOnlyExpertsMethod):
    """A MoE layer's experts from a GPTQ / AWQ checkpoint: every expert's packed tensors stacked
    per projection in the checkpoint's own layout, converted at load to the int4 kernel's grid and
    packed (the dense GPTQ layers' conversion, expert by expert); desc_act's column order per
    expert (gate and up share theirs: GPTQ orders a shared input once)."""

    def __init__(self, config: GPTQConfig):
        super().__init__("int4")
        self.config = config

    def _group(self, experts, projection: str) -> int:
        k = experts.hidden if projection == "gate_up_proj" else experts.global_intermediate
        return k if self.config.group_size == -1 else self.config.group_size

    def create_weights(self, experts) -> None:
        cfg, e = self.config, experts.local_experts
        for projection, n, k in (("gate_up_proj", 2 * experts.intermediate, experts.hidden),
                                 ("down_proj", experts.hidden, experts.intermediate)):
            g = self._group(experts, projection)
            global_k = experts.hidden if projection == "gate_up_proj" else experts.global_intermediate
            delattr(experts, projection)  # the dense stack, replaced before anything is loaded
            # desc_act: a slice of the input columns may use any group, so every group is kept.
            groups, group_dim = (global_k // g, None) if cfg.desc_act else (k // g, 0)
            tensors = [("qzeros", (groups, n // PACK), torch.int32, dict(output_dim=1, output_pack=PACK,
                                                                          input_dim=group_dim, input_pack=g)),
                       ("scales", (groups, n), torch.float16, dict(output_dim=1, input_dim=group_dim, input_pack=g))]
            if cfg.awq:
                tensors.append(("qweight", (k, n // PACK), torch.int32, dict(output_dim=1, output_pack=PACK,
                                                                              input_dim=0)))
            else:
                tensors.append(("qweight", (k // PACK, n), torch.int32, dict(output_dim=1, input_dim=0,
                                                                              input_pack=PACK)))
                # Per checkpoint tensor: gate's and up's side by side.
                shape = (2, k) if projection == "gate_up_proj" else (k,)
                tensors.append(("g_idx", shape, torch.int32, dict(output_dim=None, input_dim=0)))
            for suffix, shape, dtype, dims in tensors:
                experts.register_parameter(f"{projection}_{suffix}",
                                           experts.stacked_parameter(projection, (e, *shape), dtype, **dims))

    def process_weights_after_loading(self, experts) -> None:
        cfg = self.config
        self.weights, self.perms = {}, {}
        for projection in ("gate_up_proj", "down_proj"):
            g = self._group(experts, projection)
            qweight, qzeros, scales = (getattr(experts, f"{projection}_{suffix}").detach()
                                       for suffix in ("qweight", "qzeros", "scales"))
            g_idx = None if cfg.awq else getattr(experts, f"{projection}_g_idx").detach()
            input_start = experts.intermediate_start if projection == "down_proj" else 0
            grids = []
            for local in range(qweight.shape[0]):
                expert_g_idx = None
                if g_idx is not None:
                    expert_g_idx = g_idx[local]
                    if projection == "gate_up_proj":
                        if not torch.equal(expert_g_idx[0], expert_g_idx[1]):
                            raise QuantizationError(f"expert {experts.first_expert + local}: gate_proj and up_proj "
                                                    "have different g_idx (activation orders); one is supported")
                        expert_g_idx = expert_g_idx[0]
                try:
                    decoded = decode(cfg, qweight[local], qzeros[local], scales[local], expert_g_idx, g, input_start)
                except QuantizationError as e:
                    raise QuantizationError(f"expert {experts.first_expert + local} {projection}: {e}") from None
                grids.append((to_kernel_grid(*decoded, g), decoded))
            for suffix in ("qweight", "qzeros", "scales", "g_idx"):
                if hasattr(experts, f"{projection}_{suffix}"):
                    delattr(experts, f"{projection}_{suffix}")
            self.perms[projection] = [grid.perm for grid, _ in grids]
            refusal = next((grid.refusal for grid, _ in grids if grid.refusal is not None), None)
            if refusal is None:
                # One kernel group for every expert (the same shape and group size): packed in one call.
                stacked = (torch.stack([getattr(grid.grid, part) for grid, _ in grids])
                           for part in ("codes", "scale", "zero"))
                self.weights[projection] = int4_kernel.pack_experts(*stacked)
            else:
                n, k = grids[0][0].codes.shape
                logger.info("%s experts %s [%d, %d]: %s; dequantizing per call", cfg.name, projection, n, k, refusal)
                self.weights[projection] = [
                    DequantizedExpert(grid.codes, grid.sorted_groups, scales.T.contiguous(),
                                      ((8 - zeros) * scales).T.contiguous())
                    for grid, (_, zeros, scales, _) in grids]
            # The projection's name stays, empty (as the other experts methods leave it).
            setattr(experts, projection, nn.Parameter(torch.empty(0), requires_grad=False))

    def apply_expert(self, experts, local: int, projection: str, x: torch.Tensor) -> torch.Tensor:
        perm = self.perms[projection][local]
        if perm is not None:
            x = x.index_select(-1, perm.to(x.device))
        weight = self.weights[projection][local]
        if isinstance(weight, DequantizedExpert):
            return F.linear(x, weight.dequantize().to(x.dtype))
        return super().apply_expert(experts, local, projection, x)

    def quantized_bytes(self) -> int:
        total = 0
        for weights in self.weights.values():
            for w in weights:
                parts = (w.qweight, w.scales_zeros) if isinstance(w, int4_kernel.PackedInt4) else (
                    w.codes, w.col_groups, w.group_scales, w.group_zeros)
                total += sum(t.numel() * t.element_size() for t in parts)
        return total


@dataclass
class DequantizedExpert:
    """An expert's projection the int4 kernel cannot take: codes one per byte, in sorted column
    order, dequantized per call."""

    codes: torch.Tensor  # uint8 [n, k]
    col_groups: torch.Tensor  # the group of each (sorted) column
    group_scales: torch.Tensor  # [n, groups]
    group_zeros: torch.Tensor  # [n, groups]

    def dequantize(self) -> torch.Tensor:
        return ((self.codes.float() - 8) * self.group_scales[:, self.col_groups]
                + self.group_zeros[:, self.col_groups])
