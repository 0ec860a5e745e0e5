"""Decode steps replayed from CUDA graphs (engine option `cuda_graphs`, on by default on CUDA).

Why: a decode step of a small batch launches hundreds of small kernels (norms, rope, adds,
attention per layer); on a GPU their launch overhead, not the HBM traffic, sets the step time.
A CUDA graph replays the whole step's launches at once.

How:
- At start, one graph per size of a ladder (1, 2, 4, then multiples of 8 up to max_num_seqs) is
  captured from the model's forward plus the LM head over static input buffers: token ids,
  positions, cache slots, cached lengths and block tables (as wide as max_model_len needs).
- A decode-only step copies its inputs into the buffers' first rows, pads the batch to the next
  ladder size and replays that graph. Padding rows have no cached tokens (their attention reads
  nothing and yields zeros) and write their key/value into one scratch block past the block
  manager's, so they never touch a live sequence.
- The attention metadata the graph captured is built from views of the buffers, with tiles and
  key splits fixed per size (attention/triton_backend.py: the grid depends on the batch's shape,
  never on its lengths), so a replay is right for any context lengths. A size whose batch splits
  keys is captured twice, split and in one pass; the one-pass graph replays while every context
  is short enough (TritonPagedBackend.decode_splits).
- Prefill and mixed steps, and batches over the largest size, run eager.

Without a GPU (`capture=False`: CPU under Triton's interpreter) the same padded static-buffer
forward runs eagerly each step; CI checks the padding logic that way.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmserve.model_input import ModelInput
from lmserve.staging import host_to_device, ints_to_device, padded_rows

if TYPE_CHECKING:  # the Triton modules import Triton, which a CPU install may lack
    from lmserve.attention.triton_backend import TritonPagedBackend

log = logging.getLogger("lmserve.engine")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The ladder of captured batch sizes: 1, 2, 4, then every multiple of 8 up to the first
    that holds max_num_seqs (padding wastes at most 7 rows of a batch over 8)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    sizes += range(8, max_num_seqs + 8, 8) if max_num_seqs > 4 else [max_num_seqs]
    return sorted(set(sizes))


def padded_size(n: int, sizes: list[int]) -> int | None:
    """The smallest ladder size that holds n rows (None: bigger than the ladder)."""
    return next((s for s in sizes if s >= n), None)


def padded_decode_inputs(batch: ModelInput, size: int, width: int, block_size: int, scratch_block: int,
                         padding_len: int) -> tuple[list[int], list[int], list[int], list[int], np.ndarray]:
    """A decode-only batch's host inputs, padded to `size` rows: token ids, positions, cache slots,
    tokens each row attends, and block tables [size, width]. Padding rows are token 0 at position 0,
    writing slot 0 of the scratch block (never a live sequence's) and attending `padding_len` tokens
    there; table columns past a sequence's own blocks hold the scratch block and are never read."""
    pad = size - len(batch.query_lens)
    positions = list(batch.context_lens)  # a decode token sits right after its cached context
    return (list(batch.token_ids) + [0] * pad, positions + [0] * pad,
            batch.decode_slots(block_size) + [scratch_block * block_size] * pad,
            [p + 1 for p in positions] + [padding_len] * pad,
            padded_rows(batch.block_tables + [[]] * pad, width, scratch_block))


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why this model's decode cannot be captured (None: it can)."""
    from lmserve.layers import fused
    from lmserve.layers.moe import FusedExperts

    # The fused-MoE kernels (layers/triton_moe.py) route on the device; the eager experts read
    # expert counts on the host, which a capture cannot.
    if any(isinstance(m, FusedExperts) for m in model.modules()) and fused._triton_ops() is None:
        return "MoE layers read expert counts on the host (the fused Triton kernels are off)"
    return None


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list, backend: TritonPagedBackend, block_size: int,
                 max_num_seqs: int, max_blocks_per_seq: int, scratch_block: int, device: torch.device,
                 capture: bool):
        from lmserve.attention.triton_paged import split_buffer_sizes

        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.block_size, self.scratch_block, self.device = block_size, scratch_block, device
        self.capture = capture
        self.sizes = graph_batch_sizes(max_num_seqs)
        largest = self.sizes[-1]
        i64 = dict(dtype=torch.int64, device=device)
        self.ids = torch.zeros(largest, **i64)
        self.positions = torch.zeros(largest, **i64)
        self.slots = torch.full((largest,), scratch_block * block_size, **i64)
        self.seq_lens = torch.zeros(largest, **i64)
        self.block_tables = torch.full((largest, max_blocks_per_seq), scratch_block, **i64)
        self.query_start = torch.arange(largest + 1, **i64)  # one token per sequence
        self.tile_seq = torch.arange(largest, **i64)
        self.tile_first = torch.zeros(largest, **i64)
        # One set of split-key partials, as large as the largest size needs: graphs replay one at
        # a time, so they can share it.
        attn = [m for m in model.modules() if hasattr(m, "kv_spec")]
        q_heads = max(m.num_heads for m in attn)
        head_dim = max(m.partial_width for m in attn)
        need = [split_buffer_sizes(n, q_heads, head_dim, self._splits(n)) for n in self.sizes]
        f32 = dict(dtype=torch.float32, device=device)
        self.split_acc = torch.empty(max(a for a, _ in need), **f32)
        self.split_max = torch.empty(max(s for _, s in need), **f32)
        self.split_sum = torch.empty(max(s for _, s in need), **f32)
        # Keyed by (batch size, key splits): a size whose batch splits keys also has a one-pass
        # graph, replayed while every context is short (TritonPagedBackend.decode_splits).
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.capture_seconds: float | None = None
        self.steps = 0  # decode steps served by this path

    def _splits(self, n: int) -> int:
        from lmserve.attention.triton_backend import choose_num_splits

        return choose_num_splits(n, self.backend.num_kv_heads, self.backend.num_sms)

    def _variants(self, n: int) -> list[int]:
        """The key splits a batch of n is captured with: its own, and one pass if that differs."""
        splits = self._splits(n)
        return [splits, 1] if splits > 1 and self.backend.single_pass_max_keys > 0 else [splits]

    def _forward(self, n: int, splits: int) -> torch.Tensor:
        """Logits [n, vocab] of the first n rows of the static buffers."""
        from lmserve.attention.triton_backend import TritonAttentionMetadata

        meta = TritonAttentionMetadata(
            self.backend, self.slots[:n], self.block_tables[:n], self.seq_lens[:n], self.query_start[:n + 1],
            [1] * n, n, decode_only=True, num_splits=splits,
            split_buffers=(self.split_acc, self.split_max, self.split_sum) if splits > 1 else None)
        meta._tiles[1] = (self.tile_seq[:n], self.tile_first[:n])
        return self.model.compute_logits(self.model(self.ids[:n], self.positions[:n], self.kv_caches, meta))

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every ladder size (largest first, so the smaller graphs reuse its memory
        pool). The buffers hold padding rows, which touch only the scratch block."""
        if not self.capture:
            return
        started = time.perf_counter()
        pool = None
        for n in reversed(self.sizes):
            for splits in self._variants(n):
                self._forward(n, splits)  # compiles the Triton kernels for this shape outside the capture
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                # thread_local: another engine of this process may use the device from its own thread.
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self.outputs[n, splits] = self._forward(n, splits)
                pool = graph.pool()
                self.graphs[n, splits] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started
        log.info("CUDA graphs: %d decode batch sizes (1 to %d) captured in %.1fs (%d graphs: one-pass variants "
                 "for contexts up to %d tokens)", len(self.sizes), self.sizes[-1], self.capture_seconds,
                 len(self.graphs), self.backend.single_pass_max_keys)

    def run(self, batch: ModelInput) -> torch.Tensor | None:
        """Logits [len(batch.logit_rows), vocab] of a decode-only batch, or None when it is not
        one this path takes (the caller runs it eager)."""
        n = len(batch.query_lens)
        size = padded_size(n, self.sizes)
        if size is None or batch.num_decodes != n:
            return None
        bs, width = self.block_size, max(len(t) for t in batch.block_tables)
        if width > self.block_tables.shape[1]:
            return None
        # Padding rows attend nothing: the Triton kernels give them zeros.
        ids, positions, slots, lens, tables = ints_to_device(
            self.device, *padded_decode_inputs(batch, size, width, bs, self.scratch_block, padding_len=0))
        self.ids[:size].copy_(ids)
        self.positions[:size].copy_(positions)
        self.slots[:size].copy_(slots)
        self.seq_lens[:size].copy_(lens)
        # Columns past `width` keep stale pages: a sequence reads only the pages its length covers.
        self.block_tables[:size, :width].copy_(tables.view(size, width))
        key = (size, self.backend.decode_splits(size, max(batch.context_lens) + 1))
        if key in self.graphs:
            self.graphs[key].replay()
            logits = self.outputs[key]
        else:
            logits = self._forward(*key)
        self.steps += 1
        rows = batch.logit_rows
        if rows == list(range(n)):
            return logits[:n]
        return logits[host_to_device(rows, torch.int64, self.device)]  # torch.tensor(..., device) would sync
