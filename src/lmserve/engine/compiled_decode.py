"""Decode-only steps through a torch.compile'd forward (engine option `compile`).

Why: at decode-batch sizes a step is dominated by ~45 small ops per layer (norms, rope, adds,
activations) that Inductor fuses. Prefill and mixed steps stay eager: their shapes vary with
every prompt, and their cost is in the matmuls, which compiling does not change.

How:
- The graph is the model's forward plus the LM head over a decode batch, with the attention of
  every layer as one opaque in-place operator (lmserve.attention.compiled_decode_backend); weights are
  frozen into the graph (Inductor's `freezing`, which also lays the bf16 weights out for oneDNN).
- One graph covers every decode batch: the batch size and the block-table width are dynamic
  (torch specializes sizes 0 and 1, so a batch of one is padded with a dummy row and tables to
  at least 2 blocks; a second graph for batch 1 would double the compile time for a ~1% faster
  step). Neither the batch size nor the context length triggers a recompile.
- Compiling takes tens of seconds on a small CPU, so it runs in a background thread once the
  engine is up: decode steps run eager until both graphs are ready, then switch over. The
  warm-up calls write only to a scratch block allocated past the block manager's blocks, so they
  never touch a live sequence's cache.
- Inductor's caches live in TORCHINDUCTOR_CACHE_DIR (the server points it into its data
  directory), so a restart reuses the generated kernels.
- Only models whose attention layers are plain (no sliding window, softcap or MLA) are compiled;
  others, and any compile failure, keep the eager path, with the reason in the log.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

from lmserve.attention.compiled_decode_backend import CompiledDecodeBackend, CompiledDecodeMetadata, decode_mask
from lmserve.attention.layer import Attention, MLAAttention
from lmserve.model_input import ModelInput
from lmserve.staging import host_to_device

log = logging.getLogger("lmserve.engine")

# Smaller batches and narrower tables are padded to these sizes: a dynamic size of 1 would be
# specialized (a graph of its own).
MIN_BATCH = 2
MIN_TABLE_WIDTH = 2


def use_cache_dir(directory: str | Path) -> None:
    """Keep Inductor's caches (generated kernels, FX graphs) in `directory` unless the
    environment already chose one. Call before anything compiles."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(directory).expanduser()))


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why this model's decode cannot be compiled (None: it can)."""
    for module in model.modules():
        if isinstance(module, MLAAttention):
            return "MLA attention runs eager"
        if isinstance(module, Attention) and (module.sliding_window is not None or module.softcap is not None):
            return "sliding-window and softcapped attention run eager"
    return None


class DecodeGraph(torch.nn.Module):
    """What is compiled: the model over a decode batch, plus the LM head. The model is a
    submodule (not an argument) so Inductor's freezing sees its weights as parameters and folds
    them into the graph (bf16 weights pre-packed for oneDNN, as the eager path does)."""

    def __init__(self, model: torch.nn.Module, block_size: int):
        super().__init__()
        self.model = model
        self.block_size = block_size
        self.backend = CompiledDecodeBackend()

    def forward(self, ids, positions, slots, tables, kv_caches):
        mask = decode_mask(positions, tables.shape[1], self.block_size, kv_caches[0][0].dtype)
        meta = CompiledDecodeMetadata(self.backend, slots, tables, mask, positions + 1)
        return self.model.compute_logits(self.model(ids, positions, kv_caches, meta))


class CompiledDecode:
    """The compiled decode forward of one engine: compiles in the background, then serves
    decode-only batches (`run` returns None for anything it does not take)."""

    def __init__(self, model: torch.nn.Module, kv_caches: list, block_size: int, scratch_block: int):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.ready = threading.Event()
        self.enabled = True  # False: decode runs eager even when compiled (benchmarks, tests compare the two)
        self.done = threading.Event()  # ready, or given up
        self.error: str | None = None
        self.compile_seconds: float | None = None
        self.steps = 0  # decode steps served compiled
        self._thread: threading.Thread | None = None
        self._forward = torch.compile(DecodeGraph(model, block_size), fullgraph=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._compile, name="lmserve-compile", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until compiling is over; True if the compiled path is in use."""
        self.done.wait(timeout)
        return self.ready.is_set()

    def _compile(self) -> None:
        started = time.perf_counter()
        log.info("compiling the decode forward in the background (decode runs eager until it is ready)")
        try:
            # Freezing is read by Dynamo when it traces (parameters become constants), not only by
            # Inductor, so it is patched around the tracing calls rather than passed as an option.
            with torch.inference_mode(), torch._inductor.config.patch(freezing=True):
                # Sizes distinct from each other (and from every static size): equal sizes would be
                # traced as one symbol, and a later batch breaking that equality would recompile.
                self._call(*self._warmup_inputs(3, 5))
        except Exception as e:  # noqa: BLE001 - any failure leaves the (always correct) eager path
            self.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log.warning("compiled decode unavailable, decode stays eager: %s", self.error)
            self.done.set()
            return
        self.compile_seconds = time.perf_counter() - started
        log.info("compiled decode ready in %.1fs (cache: %s)", self.compile_seconds,
                 os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default"))
        self.ready.set()
        self.done.set()

    def _warmup_inputs(self, batch_size: int, width: int):
        pos = width * self.block_size - 1
        tables = torch.full((batch_size, width), self.scratch_block, dtype=torch.int64)
        positions = torch.full((batch_size,), pos, dtype=torch.int64)
        slots = torch.full((batch_size,), self.scratch_block * self.block_size + pos % self.block_size,
                           dtype=torch.int64)
        return torch.zeros(batch_size, dtype=torch.int64), positions, slots, tables

    def _call(self, ids, positions, slots, tables) -> torch.Tensor:
        torch._dynamo.mark_dynamic(tables, 1)
        for t in (ids, positions, slots, tables):
            torch._dynamo.mark_dynamic(t, 0)
        return self._forward(ids, positions, slots, tables, self.kv_caches)

    def run(self, batch: ModelInput, device: torch.device) -> torch.Tensor | None:
        """Logits [len(batch.logit_rows), vocab] of a decode-only batch, or None (not ready, or
        not a decode-only batch): the caller runs it eager."""
        n = batch.num_decodes
        if not (self.enabled and self.ready.is_set()) or n == 0 or n != len(batch.query_lens):
            return None
        bs = self.block_size
        width = max(MIN_TABLE_WIDTH, max(len(t) for t in batch.block_tables))
        token_ids = list(batch.token_ids)
        positions = list(batch.context_lens)  # a decode token sits right after its cached context
        tables = [t + [0] * (width - len(t)) for t in batch.block_tables]  # padding is masked out
        slots = batch.decode_slots(bs)
        for _ in range(n, MIN_BATCH):  # a dummy row that writes and reads only the scratch block
            token_ids.append(0)
            positions.append(0)
            tables.append([self.scratch_block] * width)
            slots.append(self.scratch_block * bs)
        logits = self._call(torch.tensor(token_ids, dtype=torch.int64, device=device),
                            torch.tensor(positions, dtype=torch.int64, device=device),
                            torch.tensor(slots, dtype=torch.int64, device=device),
                            torch.tensor(tables, dtype=torch.int64, device=device))
        self.steps += 1
        if batch.logit_rows != list(range(len(token_ids))):
            logits = logits[host_to_device(batch.logit_rows, torch.int64, device)]
        return logits
