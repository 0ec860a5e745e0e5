"""Owns the model and its KV cache; runs one forward over a plain-data `ModelInput`.

The cache is allocated from the KV specs the model's attention layers declare (one pair of
tensors per layer, shaped by that layer's spec). Per step it builds the flattened token ids and
positions (copied to the device in one transfer), lets the device's attention backend build its
metadata once for all layers, and sends only the rows that need a next token through the LM head.
Decode-only steps may instead replay a CUDA graph (engine/cuda_graphs.py, on CUDA), replay their
recorded operator calls from C++ (engine/cpu_graphs.py, on the CPU) or run a
torch.compile'd forward (engine/compiled_decode.py, a CPU option).
"""

from __future__ import annotations

import logging

import torch

from lmserve.attention import KVSpec, get_attention_backend
from lmserve.attention.kv_cache_dtype import kv_cache_torch_dtype
from lmserve.attention.reference import ReferenceBackend
from lmserve.attention.spec import kv_bytes_per_block
from lmserve.engine import cpu_graphs, cuda_graphs
from lmserve.engine.compiled_decode import CompiledDecode, unsupported_reason
from lmserve.engine.prompt_logprobs import PromptScores, score_rows
from lmserve.model_input import ModelInput
from lmserve.models.config import ModelConfig
from lmserve.staging import ints_to_device

log = logging.getLogger("lmserve.engine")


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, compile_decode: bool = False,
                 attention_backend: str = "auto", use_cuda_graphs: bool = False, max_num_seqs: int = 256,
                 max_model_len: int | None = None, kv_cache_dtype: str = "auto", use_cpu_graphs: bool = False):
        self.model = model
        self.config = config
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.kv_specs: list[KVSpec] = model.kv_cache_specs()
        self.kv_dtype = kv_cache_torch_dtype(kv_cache_dtype, dtype)  # fp8: attention/kv_cache_dtype.py
        self.attention_backend = get_attention_backend(device, self.kv_specs, attention_backend)
        self.compiled: CompiledDecode | None = None
        self.graphs: cuda_graphs.DecodeGraphs | None = None
        self.cpu_graphs: cpu_graphs.CpuDecodeGraphs | None = None
        graphs_reason = self._graphs_unavailable(use_cuda_graphs)
        if use_cuda_graphs and graphs_reason is not None and device.type == "cuda":
            log.warning("CUDA graphs: not for this model (%s); decode stays eager", graphs_reason)
        use_cuda_graphs = use_cuda_graphs and graphs_reason is None
        compile_decode = compile_decode and not use_cuda_graphs  # one decode fast path at a time
        reason = unsupported_reason(model) if compile_decode else None
        if compile_decode and reason is None and self.kv_dtype != dtype:
            reason = "the compiled decode reads a KV cache in the compute dtype, not fp8"
        if reason is not None:
            log.warning("compile: not for this model (%s); decode stays eager", reason)
        compiled = compile_decode and reason is None
        use_cpu_graphs = (use_cpu_graphs and not use_cuda_graphs and not compiled and device.type == "cpu"
                          and isinstance(self.attention_backend, ReferenceBackend))
        if use_cpu_graphs:
            reason = cpu_graphs.unsupported_reason(model)
            if reason is None and self.kv_dtype != dtype:
                reason = "an fp8 KV cache decodes through the gather path"
            if reason is not None:
                log.info("CPU graphs: not for this model (%s); decode runs eager", reason)
                use_cpu_graphs = False
        # The compiled path's warm-up and the graphs' padding rows write to one scratch block past
        # the block manager's.
        extra = self.scratch_blocks = 1 if use_cuda_graphs or compiled or use_cpu_graphs else 0
        self.kv_caches = [spec.allocate(num_blocks + extra, block_size, self.kv_dtype, device)
                          for spec in self.kv_specs]
        max_len = max_model_len or config.context_length
        if use_cuda_graphs:
            self.graphs = cuda_graphs.DecodeGraphs(
                model, self.kv_caches, self.attention_backend, block_size, max_num_seqs,
                max_blocks_per_seq=-(-max_len // block_size), scratch_block=num_blocks, device=device,
                capture=device.type == "cuda")
            self.graphs.capture_all()
        elif compiled:
            self.compiled = CompiledDecode(model, self.kv_caches, block_size, scratch_block=num_blocks)
            self.compiled.start()
        elif use_cpu_graphs:
            self.cpu_graphs = cpu_graphs.CpuDecodeGraphs(model, self.kv_caches, self.attention_backend, block_size,
                                                         max_num_seqs, -(-max_len // block_size), dtype,
                                                         scratch_block=num_blocks)

    def _graphs_unavailable(self, wanted: bool) -> str | None:
        """Why decode cannot run from CUDA graphs here (None: it can). Graphs need the Triton
        backend's static-shape metadata; on CPU that backend runs only under Triton's
        interpreter, where the same padded path runs without capture."""
        if not wanted:
            return "off"
        if not self.attention_backend.supports_cuda_graphs:
            return "they need the Triton attention backend"
        return cuda_graphs.unsupported_reason(self.model)

    @staticmethod
    def kv_bytes_per_block(model: torch.nn.Module, block_size: int, dtype: torch.dtype) -> int:
        return kv_bytes_per_block(model.kv_cache_specs(), block_size, dtype)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src, dst = ints_to_device(self.device, [s for s, _ in copies], [d for _, d in copies])
        for cache in self.kv_caches:
            for part in cache:
                part[dst] = part[src]

    @torch.inference_mode()
    def execute(self, batch: ModelInput) -> torch.Tensor:
        """Run the batch; return logits [len(batch.logit_rows), vocab]."""
        self.copy_blocks(batch.block_copies)
        dev = self.device
        if self.compiled is not None:
            logits = self.compiled.run(batch, dev)
            if logits is not None:
                return logits
        if self.graphs is not None:
            logits = self.graphs.run(batch)
            if logits is not None:
                return logits
        if self.cpu_graphs is not None:
            logits = self.cpu_graphs.run(batch)
            if logits is not None:
                return logits
        return self._logits(batch, *self._forward(batch))

    @torch.inference_mode()
    def execute_scored(self, batch: ModelInput) -> tuple[torch.Tensor, PromptScores]:
        """`execute`, always eager, plus the prompt logprobs `batch.score_rows` asks for."""
        self.copy_blocks(batch.block_copies)
        hidden, rows = self._forward(batch)
        return self._logits(batch, hidden, rows), score_rows(self.model, hidden, batch)

    def _forward(self, batch: ModelInput) -> tuple[torch.Tensor, torch.Tensor]:
        """The eager forward: hidden states of every row, and the logit rows (already on the device)."""
        ids, positions, rows = ints_to_device(self.device, batch.token_ids, batch.positions, batch.logit_rows)
        meta = self.attention_backend.build_metadata(batch, positions, self.block_size, self.dtype)
        return self.model(ids, positions, self.kv_caches, meta), rows

    def _logits(self, batch: ModelInput, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if not batch.logit_rows:
            return hidden.new_empty(0, self.config.vocab_size)
        return self.model.compute_logits(hidden[rows])
