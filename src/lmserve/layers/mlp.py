"""The gated MLP every catalog family uses: down(act(gate(x)) * up(x)).

Tensor-parallel like Megatron's: gate/up column-parallel, down row-parallel (one all-reduce).

On CUDA, act(gate) * up is one fused Triton kernel with PyTorch's roundings, on the CPU (bf16/fp16)
one C++ call (layers/fused.py).
"""

from __future__ import annotations

import torch
from torch import nn

from lmserve.layers import fused
from lmserve.layers.activation import activation_kind, get_activation
from lmserve.layers.linear import ColumnParallelLinear, RowParallelLinear


class GatedMLP(nn.Module):
    """gate and up share one matmul (gate first, as packed checkpoints store it too)."""

    def __init__(self, hidden: int, intermediate: int, activation: str = "silu", bias: bool = False,
                 down_bias: bool | None = None):
        super().__init__()
        # Tensor parallelism splits the intermediate: each rank's gate/up rows, down's columns.
        self.gate_up_proj = ColumnParallelLinear(hidden, [intermediate, intermediate], bias=bias)
        self.intermediate = self.gate_up_proj.shard_sizes[0]
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=bias if down_bias is None else down_bias)
        self.act = get_activation(activation)
        self.act_kind = activation_kind(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if fused.use_fused(gate_up):
            return self.down_proj(fused.ops(gate_up).gated_act(gate_up, self.intermediate, self.act_kind))
        gate, up = gate_up[..., :self.intermediate], gate_up[..., self.intermediate:]
        return self.down_proj(self.act(gate) * up)
