"""Mixture-of-experts MLP: a router picks k experts per token, each expert runs only on the tokens
routed to it, plus optional always-on shared experts. Qwen2-MoE and DeepSeek-V2 use it.

Numerics follow transformers' modeling_qwen2_moe / modeling_deepseek_v2 (and DeepSeek's own
remote code where transformers simplifies):
- router: softmax over the expert logits in fp32, top-k; Qwen2-MoE computes the logits in the
  activation dtype and casts the weights back to it, DeepSeek computes them in fp32 and keeps
  the weights in fp32 (its gate weight is kept in fp32 by transformers);
- `renormalize` (norm_topk_prob) divides the k weights by their sum; DeepSeek otherwise scales
  them by `routed_scaling_factor` (16 for V2);
- DeepSeek's group-limited greedy routing: the experts form `num_groups` groups, a group scores
  its best expert, only the `topk_groups` best groups stay eligible (the others' scores become
  0), then the top-k experts among them;
- experts are SwiGLU MLPs; each token's output is sum_e weight_e * expert_e(x), accumulated in
  expert order (as transformers does, so fp32 results agree to the last bits);
- shared experts: Qwen2-MoE multiplies its one shared expert by sigmoid(shared_expert_gate(x))
  (one scalar per token), DeepSeek adds its shared experts as they are.

Under tensor parallelism (the router and the shared experts' input are replicated on every rank):
- by default every rank keeps a slice of every expert's intermediate (gate/up rows, down
  columns), runs the routed tokens through its slices and the partial outputs are summed over
  the ranks (one all-reduce), as vLLM's fused MoE does under TP;
- with expert parallelism (`enable_expert_parallel`) each rank keeps num_experts / tp whole
  experts. Every rank holds every token (attention's outputs are all-reduced), so dispatch is
  each rank taking the (token, expert) pairs routed to its own experts, and combine is the same
  all-reduce of the partial outputs (vLLM's EP over a TP group without data parallelism).

The experts' weights are stacked ([E, 2I, H] for gate/up, [E, H, I] for down) and fill through
one weight loader, from a checkpoint's per-expert tensors (`mlp.experts.{e}.gate_proj.weight`,
shard id (e, shard)) or from a stacked tensor of every expert (GGUF's `ffn_gate_exps`, read as
`mlp.experts.gate_proj.weight` [E, I, H], shard id (None, shard)), each copied once into its
slot. A quantization method may replace the stacked weights by its own stacked parameters (a
GGUF file's int4 grid: `gate_up_proj_codes`, `_group_scale`, `_group_zero`; an FP8 checkpoint's
fp8 weights and `_weight_scale`; GPTQ / AWQ's `_qweight`, `_qzeros`, `_scales`, `_g_idx`), which
fill the same way: each names where its tensor's output rows and input columns lie and how many
of them one stored element packs, so tensor parallelism slices them as it slices the weights.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.distributed.group import current_group, shard_range
from lmserve.layers import fused
from lmserve.layers.activation import activation_kind, get_activation
from lmserve.layers.linear import Linear, set_weight_loader
from lmserve.layers.mlp import GatedMLP

# Checkpoint name of one expert's projection (or of every expert's, stacked: no expert index)
# -> its slot in the stacked parameters. Besides `weight`, a quantization method's tensors
# (models/gguf.py's int4 grids; FP8 scales; GPTQ / AWQ's packed tensors) name parameters
# `<projection>_<suffix>`.
_EXPERT_TENSOR = re.compile(
    r"^(?:model\.)?(.*\.experts)\.(?:(\d+)\.)?(gate_proj|up_proj|down_proj)\.(weight|codes|group_scale|group_zero|weight_scale|input_scale|qweight|qzeros|scales|g_idx)$")
_EXPERT_SHARD = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}
PROJECTIONS = ("gate_up_proj", "down_proj")


def map_expert_name(name: str) -> tuple[str, tuple[int | None, int | None]] | None:
    """`layers.3.mlp.experts.7.up_proj.weight` -> (`layers.3.mlp.experts.gate_up_proj`, (7, 1));
    the stacked `layers.3.mlp.experts.up_proj.weight` -> (..., (None, 1)); None for a tensor that
    is not a routed expert's."""
    match = _EXPERT_TENSOR.match(name)
    if match is None:
        return None
    prefix, expert, proj, kind = match.groups()
    param, shard = _EXPERT_SHARD[proj]
    if kind != "weight":
        param = f"{param}_{kind}"
    return f"{prefix}.{param}", (None if expert is None else int(expert), shard)


class FusedExperts(nn.Module):
    """E SwiGLU experts with stacked weights, run as one matmul pair per expert that got tokens."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, activation: str = "silu"):
        super().__init__()
        self.tp = current_group()
        self.num_experts, self.global_intermediate = num_experts, intermediate
        if self.tp.expert_parallel:  # whole experts [first_expert, first_expert + local_experts)
            self.first_expert, self.local_experts = shard_range(num_experts, self.tp.rank, self.tp.size)
            self.intermediate_start, self.intermediate = 0, intermediate
        else:  # every expert, a slice of its intermediate
            self.first_expert, self.local_experts = 0, num_experts
            self.intermediate_start, self.intermediate = shard_range(intermediate, self.tp.rank, self.tp.size)
        self.hidden = hidden
        e, i = self.local_experts, self.intermediate
        self.gate_up_proj = self.stacked_parameter("gate_up_proj", (e, 2 * i, hidden), torch.get_default_dtype())
        self.down_proj = self.stacked_parameter("down_proj", (e, hidden, i), torch.get_default_dtype())
        self.act = get_activation(activation)
        self.act_kind = activation_kind(activation)
        # A weight-only quantization method for the experts (layers/quantization/), set by the
        # loader (`create_weights`); None: the dense stacked weights.
        self.quant_method = None
        self.processed = False

    def stacked_parameter(self, projection: str, shape: tuple[int, ...], dtype: torch.dtype,
                          input_pack: int = 1, output_pack: int = 1, output_dim: int | None = 0,
                          input_dim: int | None = 1) -> nn.Parameter:
        """A new stacked parameter of `projection` ("gate_up_proj": gate and up rows; "down_proj")
        filled by `weight_loader`. Each expert's checkpoint tensor has its output rows along
        `output_dim` and its input columns along `input_dim` (None: the tensor has no such
        dimension: a per-tensor scale, GPTQ's g_idx), `output_pack` / `input_pack` of them per
        stored element (a group scale's 32 columns, GPTQ's 8 rows per int32). `shape` is
        [experts, *this rank's tensor shape]; a gate_up parameter without an output dimension
        holds gate's and up's tensors side by side ([experts, 2, *tensor shape])."""
        param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        param.projection, param.input_pack, param.output_pack = projection, input_pack, output_pack
        param.output_dim, param.input_dim = output_dim, input_dim
        set_weight_loader(param, self.weight_loader)
        owned = range(self.first_expert, self.first_expert + self.local_experts)
        shards = (0, 1) if projection == "gate_up_proj" else (None,)
        param.shard_ids = [(e, s) for e in owned for s in shards]
        return param

    def create_weights(self, method) -> None:
        """Hand the experts to a quantization method, which may replace the stacked weights by
        its own parameters (before any tensor is loaded)."""
        self.quant_method = method
        create = getattr(method, "create_weights", None)
        if create is not None:
            create(self)

    def process_weights(self) -> None:
        """Once every tensor is in: the method's post-processing (quantizing, packing)."""
        if self.quant_method is not None and not self.processed:
            self.quant_method.process_weights_after_loading(self)
        self.processed = True

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard_id) -> None:
        if not isinstance(shard_id, tuple):
            raise ValueError(f"expert parameter of shape {tuple(param.shape)} needs an (expert, shard) id")
        expert, shard = shard_id
        out_dim, in_dim = param.output_dim, param.input_dim
        out_pack, in_pack = param.output_pack, param.input_pack
        side_by_side = param.projection == "gate_up_proj" and out_dim is None  # [E, 2, *tensor]
        rows, cols = ((self.global_intermediate, self.hidden) if param.projection == "gate_up_proj"
                      else (self.hidden, self.global_intermediate))
        expected = list(param.shape[2:] if side_by_side else param.shape[1:])
        if out_dim is not None:
            expected[out_dim] = rows // out_pack
        if in_dim is not None:
            expected[in_dim] = cols // in_pack
        expected = tuple(expected)
        if expert is None:  # every expert at once, stacked: this rank's experts
            expected = (self.num_experts, *expected)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"has shape {tuple(tensor.shape)}, expected {expected} (experts stacked)")
            tensor = tensor.narrow(0, self.first_expert, self.local_experts)
            dest, lead = param.data, 1
        else:
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"names expert {expert}, but the config has {self.num_experts} experts")
            if tensor.numel() == 1 and math.prod(expected) == 1:  # a per-tensor scale: [] or [1]
                tensor = tensor.reshape(expected)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"has shape {tuple(tensor.shape)}, expected {expected}")
            local = expert - self.first_expert
            if not 0 <= local < self.local_experts:
                return  # another rank's expert (expert parallelism)
            dest, lead = param.data[local], 0
        if shard is not None:  # gate (0) or up (1) of the expert's gate_up: this rank's rows
            if side_by_side:
                dest = dest.select(lead, shard)
            else:
                start, size = self._packed_slice(self.intermediate_start, self.intermediate, out_pack)
                dest = dest.narrow(lead + out_dim, shard * size, size)
                tensor = tensor.narrow(lead + out_dim, start, size)
        elif in_dim is not None:  # down: this rank's columns
            start, size = self._packed_slice(self.intermediate_start, self.intermediate, in_pack)
            tensor = tensor.narrow(lead + in_dim, start, size)
        dest.copy_(tensor)

    def _packed_slice(self, start: int, size: int, pack: int) -> tuple[int, int]:
        if start % pack or size % pack:
            raise ValueError(f"this rank's slice of the intermediate ({start}, {size} wide) does not split the "
                             f"file's groups of {pack}")
        return start // pack, size // pack

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; topk_weights, topk_ids [T, k] -> [T, H] (summed over the tensor-parallel ranks)."""
        if fused.use_triton(x) and not self.tp.expert_parallel and self.quant_method is None:
            # CUDA: one grouped-GEMM launch per projection, no host sync. Under TP every rank holds
            # every expert's slice of the intermediate, so the kernel runs as is; whole experts
            # per rank (expert parallelism) take the dispatch below.
            from lmserve.layers import triton_moe

            return self.tp.all_reduce(triton_moe.fused_experts(x, self.gate_up_proj, self.down_proj, topk_weights,
                                                               topk_ids, self.act_kind))
        k = topk_ids.shape[1]
        flat = topk_ids.reshape(-1)
        # Group the (token, slot) pairs by expert: one sort, then contiguous runs per expert.
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // k
        weights = topk_weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        # Dispatch: this rank runs the pairs routed to its experts (all of them without EP).
        start = sum(counts[:self.first_expert])
        mine = counts[self.first_expert:self.first_expert + self.local_experts]
        end = start + sum(mine)
        tokens, weights = tokens[start:end], weights[start:end]
        inputs = x.index_select(0, tokens)
        start = 0
        for local, n in enumerate(mine):
            if n == 0:
                continue
            rows = slice(start, start + n)
            start += n
            y = self._expert_linear(local, "down_proj",
                                    self._gated(self._expert_linear(local, "gate_up_proj", inputs[rows])))
            out.index_add_(0, tokens[rows], (y * weights[rows, None]).to(out.dtype))
        return self.tp.all_reduce(out)  # combine

    def _expert_linear(self, local: int, projection: str, x: torch.Tensor) -> torch.Tensor:
        """One expert's projection (`gate_up_proj` or `down_proj`) of x."""
        if self.quant_method is not None:
            return self.quant_method.apply_expert(self, local, projection, x)
        return F.linear(x, getattr(self, projection)[local])

    def _gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up: one fused kernel on CUDA (layers/fused.py), PyTorch's two ops elsewhere."""
        if fused.use_fused(gate_up):
            return fused.ops(gate_up).gated_act(gate_up, self.intermediate, self.act_kind)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts} (holding {self.first_expert}..{self.first_expert + self.local_experts}), "
                f"intermediate={self.intermediate}")


class TopKRouter(nn.Module):
    """The gate: expert logits -> (weights [T, k], expert ids [T, k])."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, renormalize: bool = False,
                 scaling_factor: float = 1.0, num_groups: int | None = None, topk_groups: int | None = None,
                 fp32_logits: bool = False):
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} exceeds the {num_experts} experts")
        if num_groups and (num_experts % num_groups or not topk_groups or topk_groups > num_groups):
            raise ValueError(f"{num_experts} experts cannot route over n_group {num_groups} / topk_group {topk_groups}")
        self.weight = nn.Parameter(torch.empty(num_experts, hidden), requires_grad=False)
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.scaling_factor = renormalize, scaling_factor
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.fp32_logits = fp32_logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fp32_logits:
            logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight)
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if self.num_groups and self.num_groups > 1:
            t = scores.shape[0]
            group_scores = scores.view(t, self.num_groups, -1).max(dim=-1).values
            groups = torch.topk(group_scores, k=self.topk_groups, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores).scatter_(1, groups, 1.0).bool()
            keep = keep.unsqueeze(-1).expand(t, self.num_groups, self.num_experts // self.num_groups)
            scores = scores.masked_fill(~keep.reshape(t, -1), 0.0)
        weights, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        elif self.scaling_factor != 1.0:
            weights = weights * self.scaling_factor
        if not self.fp32_logits:
            weights = weights.to(logits.dtype)
        return weights, ids

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
                f"scale={self.scaling_factor}, groups={self.num_groups}/{self.topk_groups}")


class SparseMoE(nn.Module):
    """Router + routed experts + optional shared experts, under the checkpoint's module names:
    `gate` (router), `experts`, and the shared MLP as `shared_name` (Qwen2-MoE `shared_expert`
    with a `shared_expert_gate`, DeepSeek `shared_experts` without)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, activation: str = "silu",
                 renormalize: bool = False, scaling_factor: float = 1.0, num_groups: int | None = None,
                 topk_groups: int | None = None, fp32_router: bool = False, shared_intermediate: int = 0,
                 shared_name: str = "shared_experts", shared_gate: bool = False):
        super().__init__()
        self.gate = TopKRouter(hidden, num_experts, top_k, renormalize, scaling_factor, num_groups, topk_groups,
                               fp32_router)
        self.experts = FusedExperts(num_experts, hidden, intermediate, activation)
        # Attribute names are the checkpoint's, so the generic name map needs no MoE rules.
        self.shared_name = shared_name if shared_intermediate else None
        self.shared_gate_name = f"{shared_name}_gate" if shared_intermediate and shared_gate else None
        if self.shared_name:
            self.add_module(self.shared_name, GatedMLP(hidden, shared_intermediate, activation))
        if self.shared_gate_name:
            self.add_module(self.shared_gate_name, Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.shared_name:
            shared = getattr(self, self.shared_name)(x)
            if self.shared_gate_name:
                shared = torch.sigmoid(getattr(self, self.shared_gate_name)(x)) * shared
            out = out + shared
        return out


def qwen2_moe_is_sparse(index: int, num_experts: int, sparse_step: int, mlp_only_layers: list[int]) -> bool:
    """Qwen2-MoE: every `decoder_sparse_step`-th layer is MoE, except those in mlp_only_layers."""
    return index not in mlp_only_layers and num_experts > 0 and (index + 1) % sparse_step == 0


def deepseek_is_sparse(index: int, num_experts: int | None, first_k_dense: int, layer_freq: int) -> bool:
    """DeepSeek: the first `first_k_dense_replace` layers are dense, then every `moe_layer_freq`-th."""
    return bool(num_experts) and index >= first_k_dense and index % layer_freq == 0
