"""The token embedding and the LM head, split over the vocabulary under tensor parallelism.

Each rank keeps vocab_padded / tp consecutive rows; the vocabulary is padded up to a multiple of
the rank count (the padding rows are zero and never looked up; their logits are cut off), so any
vocabulary size shards. The embedding looks up the ids in its range, zeroes the others' rows and
sums over the ranks (exactly one rank contributes each row, so the sum is the row itself). The LM
head computes its slice of the logits and gathers them on rank 0, the one rank that samples.
With one rank both are the plain layers they replace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.distributed.group import TPGroup, current_group
from lmserve.layers.linear import ColumnParallelLinear, set_weight_loader


def padded_vocab(vocab_size: int, tp: TPGroup) -> int:
    return -(-vocab_size // tp.size) * tp.size


def load_vocab_rows(param: nn.Parameter, tensor: torch.Tensor, vocab_size: int, start: int) -> None:
    """This rank's rows of a [vocab, hidden] checkpoint tensor; padding rows zero."""
    expected = (vocab_size, param.shape[1])
    if tuple(tensor.shape) != expected:
        raise ValueError(f"has shape {tuple(tensor.shape)}, expected {expected}")
    rows = max(min(param.shape[0], vocab_size - start), 0)
    param.data.zero_()
    param.data[:rows].copy_(tensor[start:start + rows])


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp = current_group()
        self.vocab_size = vocab_size
        self.rows = padded_vocab(vocab_size, self.tp) // self.tp.size
        self.start = self.tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"embedding of shape {tuple(param.shape)} is not packed (shard {shard_id!r})")
        load_vocab_rows(param, tensor, self.vocab_size, self.start)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.is_parallel:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(x)

    def extra_repr(self) -> str:
        return f"vocab={self.vocab_size}, rows={self.start}..{self.start + self.rows}, hidden={self.weight.shape[1]}"


class ParallelLMHead(ColumnParallelLinear):
    """Logits = hidden @ W^T over the vocabulary slice of each rank, gathered on rank 0 (other
    ranks return None). Tied to the embedding by sharing its weight (same slice per rank)."""

    deferrable = False  # always dense (int4 on the head alone changes many greedy tokens), tieable at once

    def __init__(self, hidden_size: int, vocab_size: int, bias: bool = False):
        self.vocab_size = vocab_size
        super().__init__(hidden_size, padded_vocab(vocab_size, current_group()), bias)

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None or param.dim() != 2:
            raise ValueError(f"LM head parameter of shape {tuple(param.shape)} takes one [vocab, hidden] tensor")
        load_vocab_rows(param, tensor, self.vocab_size, self.output_partitions[0][2])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.tp.gather_to_first(self.quant_method.apply(self, hidden), dim=-1)
        if logits is None or logits.shape[-1] == self.vocab_size:
            return logits
        return logits[..., :self.vocab_size]
