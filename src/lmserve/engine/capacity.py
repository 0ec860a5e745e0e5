"""How much of a model fits on each of N tensor-parallel ranks, and how big its KV cache is: the
arithmetic of `lmserve plan`, on the engine's own sizing code.

What is the engine's, not a copy: the KV bytes per token are the sum of the very KV cache specs
(attention/spec.py) a model's attention layers declare, built for the rank's share of KV heads;
the cache budget is engine/memory.py's `kv_cache_bytes` (the fraction of the device less what is
in use) and the blocks are `cache_blocks`, which the engine's sizing (engine/kv_sizing.py) calls too.

What the planner must predict and the engine measures:
- weights: counted from the model's tensor inventory (models/inventory.py), split as tensor
  parallelism splits them, in the compute dtype or as a weight-only method stores them;
- the activation peak of the largest step (the engine runs one and reads the allocator; see
  `activation_bytes` for the rule that stands in for it);
- what the device holds outside torch's tensors (CUDA context, library workspaces, NCCL
  buffers): a constant per rank, `DEVICE_OVERHEAD` (+ `NCCL_OVERHEAD` under TP).
benchmarks/gpu_check.py (part `plan`) compares the prediction with the engine on a real GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import get_args

import torch

from lmserve.attention.kv_cache_dtype import kv_cache_torch_dtype
from lmserve.attention.spec import kv_bytes_per_block
from lmserve.engine.memory import GiB, kv_cache_blocks, kv_cache_bytes
from lmserve.engine.options import EngineConfig, Quantization
from lmserve.models.inventory import Inventory, Tensor

MiB = 1 << 20
QUANTIZATIONS = get_args(Quantization)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INT4_GROUP = 32  # layers/quantization.py's group size
# The activation estimate's constants (see `activation_bytes`, `overhead_bytes`), calibrated on
# an H200 against the engine's measured profiling step (docs/capacity_planning.md has the numbers).
SAMPLER_BYTES_PER_LOGIT = 56
DEVICE_OVERHEAD = 800 * MiB
NCCL_OVERHEAD = 512 * MiB


def cache_blocks(budget: int, bytes_per_block: int, utilization: float | None = None) -> int:
    """Whole KV cache blocks in `budget` bytes. Sized from `gpu_memory_utilization` (pass it)
    fewer than one block is an error naming the option; from an explicit `kv_cache_memory` the
    cache gets at least one block. The engine allocates this many; the planner predicts it."""
    if utilization is not None:
        return kv_cache_blocks(budget, bytes_per_block, utilization)
    return max(budget // bytes_per_block, 1)


def kv_bytes_per_token(inv: Inventory, tensor_parallel_size: int, dtype: torch.dtype) -> int:
    """One rank's KV cache bytes per token, over every layer (the engine's KV spec arithmetic)."""
    return kv_bytes_per_block(inv.kv_specs(tensor_parallel_size), 1, dtype)


def _quantizes(method: str, rows: int, cols: int) -> bool:
    """Whether the weight-only method takes a weight of this (rank's) shape; the kernels' own
    limits (layers/quantization/), fp8 taking any."""
    if method == "int8":
        return cols % 16 == 0
    if method == "int4":
        return cols % INT4_GROUP == 0 and rows % 16 == 0
    return True


def tensor_bytes(tensor: Tensor, tensor_parallel_size: int, quantization: str, dtype_bytes: int) -> int:
    """One rank's bytes of `tensor` (all `count` of them). Quantized layouts as stored:
    int8 = 1 byte per weight + a bf16 scale per output row (lmserve's CPU method); int4 = half a
    byte per weight + a bf16 scale and zero per group of 32 inputs (lmserve's CPU method); fp8 =
    1 byte per weight + a float32 scale per output row (per-channel fp8 checkpoints)."""
    rows, cols = tensor.shape_per_rank(tensor_parallel_size)
    n = tensor.count * tensor.experts
    if cols == 0:
        return n * rows * dtype_bytes
    if quantization in tensor.quantized_by and _quantizes(quantization, rows, cols):
        if quantization == "int8":
            return n * (rows * cols + 2 * rows)
        if quantization == "int4":
            return n * (rows * cols // 2 + 2 * 2 * rows * (cols // INT4_GROUP))
        return n * (rows * cols + 4 * rows)
    return n * rows * cols * dtype_bytes


def weight_bytes(inv: Inventory, tensor_parallel_size: int, quantization: str = "none",
                 dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """One rank's weight bytes per parameter group (the largest rank's: the vocabulary's padding
    and the whole biases of row-parallel layers count on every rank)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
    size = torch.empty((), dtype=dtype).element_size()
    # A MoE layer's experts are quantized together or not at all (layers/quantization/weight_only.py
    # WeightOnlyExpertsMethod.refusal): both projections' shapes must suit the kernel.
    experts = [t for t in inv.tensors if t.experts > 1]
    experts_quantization = quantization if quantization == "fp8" or all(
        _quantizes(quantization, *t.shape_per_rank(tensor_parallel_size)) for t in experts) else "none"
    groups: dict[str, int] = {}
    for tensor in inv.tensors:
        method = experts_quantization if tensor.experts > 1 else quantization
        groups[tensor.group] = groups.get(tensor.group, 0) + tensor_bytes(tensor, tensor_parallel_size, method, size)
    return groups


def rope_table_bytes(inv: Inventory, dtype: torch.dtype) -> int:
    """The rope cos/sin table every rank keeps (a buffer, not a parameter): positions x values."""
    positions, values, fp32 = inv.rope_table
    return positions * values * (4 if fp32 else torch.empty((), dtype=dtype).element_size())


def activation_bytes(inv: Inventory, tensor_parallel_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                     dtype: torch.dtype) -> int:
    """The estimate of the largest step's activation peak on the rank that samples (rank 0).

    Rule: the larger of two peaks that never overlap (the layers' tensors are freed before the
    sampler runs):
    - the layers: `max_num_batched_tokens` tokens through one layer at its widest (residual and
      normed input, plus the larger of attention's q/k/v/output and the MLP's gate/up/product,
      at the rank's share of heads and intermediate size; MoE: the token copies gathered for
      the experts; MLA: the per-head keys and values a prefill expands), in the compute dtype;
      layers run one at a time, so one layer's tensors are alive at once;
    - the sampler: min(max_num_seqs, tokens) rows of the whole vocabulary (gathered on rank 0)
      at `SAMPLER_BYTES_PER_LOGIT` bytes per logit: float32 logits, log-softmax, a full sort's
      values and int64 indices, probabilities, cumulative sums (the nucleus + top-logprobs path
      the engine's profiling step takes).
    Measured on an H200 (docs/capacity_planning.md): the sampler 56 bytes per logit (256 rows);
    the layers of the Llama-3.1-8B shape 63,629 values per token (16K and 32K tokens, 8 rows)
    against the 63,616 of the width rule, plus a constant 32-59 MiB counted in `DEVICE_OVERHEAD`."""
    size = torch.empty((), dtype=dtype).element_size()
    layer = max_num_batched_tokens * inv.peak_width(tensor_parallel_size) * size
    rows = min(max_num_seqs, max_num_batched_tokens)
    return max(layer, rows * inv.vocab_size * SAMPLER_BYTES_PER_LOGIT)


def overhead_bytes(tensor_parallel_size: int) -> int:
    """Device memory the step holds besides weights and activations, per rank: the CUDA
    context, cuBLAS/Triton workspaces and allocator slack (measured on an H200: 704-745 MiB
    outside torch's tensors, 32-59 MiB of the step's own, 793 MiB at most together over three
    shapes); NCCL's buffers when there are several ranks (not measured here: one GPU cannot run
    NCCL with two ranks)."""
    return DEVICE_OVERHEAD + (NCCL_OVERHEAD if tensor_parallel_size > 1 else 0)


@dataclass
class Hardware:
    gpus_per_node: int
    gpu_memory: int  # bytes per GPU
    nnodes: int = 1

    @property
    def ranks(self) -> int:
        return self.gpus_per_node * self.nnodes

    def placement_reason(self, tensor_parallel_size: int) -> str | None:
        """Why TP cannot be laid out on these nodes (None: it can): one node's GPUs, or whole
        nodes (every node runs the same number of ranks)."""
        tp = tensor_parallel_size
        if tp > self.ranks:
            return f"TP {tp} needs more than the {self.ranks} GPUs of {self.nnodes} node(s) x {self.gpus_per_node}"
        if tp > self.gpus_per_node and tp % self.gpus_per_node:
            return f"TP {tp} spans nodes but is not a whole number of {self.gpus_per_node}-GPU nodes"
        return None


_ENGINE = EngineConfig()  # the engine's defaults (engine/options.py)


@dataclass
class Options:
    dtype: torch.dtype = torch.bfloat16
    quantization: str = _ENGINE.quantization
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = _ENGINE.max_model_len  # default: the model's context
    gpu_memory_utilization: float = _ENGINE.gpu_memory_utilization
    block_size: int = _ENGINE.block_size
    max_num_batched_tokens: int = _ENGINE.max_num_batched_tokens
    max_num_seqs: int = _ENGINE.max_num_seqs


@dataclass
class RankPlan:
    """One tensor-parallel size's numbers, per rank."""

    tensor_parallel_size: int
    invalid: str | None = None  # why this TP size cannot be used at all
    weights: dict[str, int] = field(default_factory=dict)
    rope_table: int = 0
    activation: int = 0
    overhead: int = 0
    usable: int = 0  # gpu_memory_utilization x the GPU's memory
    kv_bytes_per_token: int = 0
    kv_cache: int = 0
    num_blocks: int = 0
    tokens: int = 0
    full_context_requests: int = 0
    fits: bool = False
    why_not: str | None = None

    @property
    def weight_total(self) -> int:
        return sum(self.weights.values())

    @property
    def in_use(self) -> int:
        return self.weight_total + self.rope_table + self.activation + self.overhead


def plan_rank(inv: Inventory, hardware: Hardware, options: Options, tensor_parallel_size: int,
              max_model_len: int) -> RankPlan:
    tp = tensor_parallel_size
    plan = RankPlan(tp, invalid=hardware.placement_reason(tp) or inv.invalid_reason(tp))
    if plan.invalid:
        return plan
    plan.weights = weight_bytes(inv, tp, options.quantization, options.dtype)
    plan.rope_table = rope_table_bytes(inv, options.dtype)
    plan.activation = activation_bytes(inv, tp, options.max_num_batched_tokens, options.max_num_seqs, options.dtype)
    plan.overhead = overhead_bytes(tp)
    plan.usable = int(hardware.gpu_memory * options.gpu_memory_utilization)
    plan.kv_bytes_per_token = kv_bytes_per_token(inv, tp, kv_cache_torch_dtype(options.kv_cache_dtype, options.dtype))
    utilization = options.gpu_memory_utilization
    if plan.weight_total > plan.usable:
        plan.why_not = (f"the weights need {plan.weight_total / GiB:.2f} GiB per rank > {plan.usable / GiB:.2f} GiB "
                        f"available ({utilization:g} x {hardware.gpu_memory / GiB:.2f} GiB)")
        return plan
    try:
        plan.kv_cache = kv_cache_bytes(hardware.gpu_memory, utilization, plan.in_use)
    except ValueError:
        plan.why_not = (f"weights {plan.weight_total / GiB:.2f} GiB + activations {plan.activation / GiB:.2f} GiB "
                        f"+ rope table and device overhead {(plan.rope_table + plan.overhead) / GiB:.2f} GiB per rank "
                        f"leave nothing of {plan.usable / GiB:.2f} GiB for the KV cache")
        return plan
    per_block = plan.kv_bytes_per_token * options.block_size
    plan.num_blocks = plan.kv_cache // per_block
    plan.tokens = plan.num_blocks * options.block_size
    blocks_per_request = math.ceil(max_model_len / options.block_size)
    plan.full_context_requests = plan.num_blocks // blocks_per_request
    if plan.num_blocks:
        cache_blocks(plan.kv_cache, per_block, utilization)  # the engine's own check, passing
    if plan.full_context_requests < 1:
        plan.why_not = (f"the KV cache holds {plan.tokens} tokens per rank, less than one {max_model_len}-token "
                        f"request (lower --max-model-len or use more GPUs)")
        return plan
    plan.fits = True
    return plan


@dataclass
class Plan:
    inventory: Inventory
    hardware: Hardware
    options: Options
    max_model_len: int
    candidates: list[RankPlan]
    chosen: RankPlan | None  # the smallest TP that fits
    reason: str | None  # why nothing fits

    @property
    def detail(self) -> RankPlan | None:
        """The TP size to itemize: the chosen one, else the largest valid one (closest to fitting)."""
        valid = [c for c in self.candidates if not c.invalid]
        return self.chosen or (valid[-1] if valid else None)


def plan(inv: Inventory, hardware: Hardware, options: Options, tensor_parallel_size: int | None = None) -> Plan:
    """Every candidate TP size (or the one asked for), and the smallest that fits."""
    if options.quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {options.quantization!r}")
    max_model_len = min(options.max_model_len or inv.context_length, inv.context_length)
    sizes = [tensor_parallel_size] if tensor_parallel_size else range(1, hardware.ranks + 1)
    candidates = [plan_rank(inv, hardware, options, tp, max_model_len) for tp in sizes]
    chosen = next((c for c in candidates if c.fits), None)
    reason = None
    if chosen is None:
        valid = [c for c in candidates if not c.invalid]
        if not valid:
            reason = candidates[-1].invalid if tensor_parallel_size else (
                f"no TP size up to {hardware.ranks} is valid for {inv.num_heads} attention heads")
        else:
            last = valid[-1]
            most = "" if tensor_parallel_size else " (the most ranks these GPUs allow for this model)"
            reason = f"at TP={last.tensor_parallel_size}{most}, {last.why_not}"
    return Plan(inv, hardware, options, max_model_len, candidates, chosen, reason)
