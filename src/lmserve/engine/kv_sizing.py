"""How many KV cache blocks an engine allocates, when the options do not say (`num_kv_blocks`).

On CPU, or with `kv_cache_memory`, the budget is a number of bytes (1 GiB by default). On CUDA
it is what `gpu_memory_utilization` of the device leaves once the weights and the activation
peak of the largest step are in memory: that step is run once, before the real cache exists,
and measured (engine/memory.py has the accounting, vLLM's). Either way the bytes become blocks
by `cache_blocks`, the planner's arithmetic too (engine/capacity.py).
"""

from __future__ import annotations

import logging
import time

import torch

from lmserve.attention.kv_cache_dtype import kv_cache_torch_dtype
from lmserve.engine.batch import ModelInput
from lmserve.engine.capacity import cache_blocks
from lmserve.engine.memory import GiB, blocks_for, kv_cache_bytes, measure_peak, peak_in_use, profile_sequence_lengths
from lmserve.engine.model_runner import ModelRunner
from lmserve.engine.options import EngineConfig
from lmserve.engine.sampler import Sampler
from lmserve.engine.sequence import Request, Sequence
from lmserve.sampling_params import SamplingParams

log = logging.getLogger("lmserve.engine")


def auto_num_blocks(cfg: EngineConfig, executor, model_config, dtype: torch.dtype, device: torch.device,
                    max_model_len: int, num_speculative_tokens: int = 0, draft_bytes_per_block: int = 0) -> int:
    """The blocks the KV cache gets on this device (under tensor parallelism: on the tightest rank).
    A speculative draft model's cache gets as many blocks: each block of the budget pays for both."""
    # The cache's own dtype (fp8 halves the bytes per block: attention/kv_cache_dtype.py).
    per_block = ModelRunner.kv_bytes_per_block(executor.model, cfg.block_size,
                                               kv_cache_torch_dtype(cfg.kv_cache_dtype, dtype)) + draft_bytes_per_block
    if cfg.kv_cache_memory is None and device.type == "cuda":
        started = time.perf_counter()
        try:
            reading = measure_peak(device, lambda: profile_step(cfg, executor, model_config, dtype, device,
                                                                 max_model_len, num_speculative_tokens))
        except torch.cuda.OutOfMemoryError:
            raise ValueError(
                f"the memory profiling step ({cfg.max_num_batched_tokens} tokens, up to {cfg.max_num_seqs} sampled "
                "rows) ran out of GPU memory after the weights loaded; lower max_num_batched_tokens or "
                "max_num_seqs") from None
        in_use = peak_in_use(reading)
        budget = kv_cache_bytes(reading.total, cfg.gpu_memory_utilization, in_use)
        log.info("memory profile in %.1fs: peak step %.2f GiB in use of %.2f GiB; KV cache gets %.2f GiB "
                 "(gpu_memory_utilization %g)", time.perf_counter() - started, in_use / GiB,
                 reading.total / GiB, budget / GiB, cfg.gpu_memory_utilization)
        # Under tensor parallelism every rank profiled its own device: the tightest one decides.
        return executor.min_blocks(cache_blocks(budget, per_block, cfg.gpu_memory_utilization))
    budget = cfg.kv_cache_memory if cfg.kv_cache_memory is not None else 1 << 30
    return cache_blocks(budget, per_block)


def profile_step(cfg: EngineConfig, executor, model_config, dtype: torch.dtype, device: torch.device,
                 max_model_len: int, num_speculative_tokens: int = 0) -> int:
    """The largest step the scheduler can hand out, run once before the real cache exists so
    its activation peak can be measured: `max_num_batched_tokens` prefill tokens through the
    model and a runner whose temporary cache holds just them, then the sampler's heaviest
    path (nucleus sampling with top logprobs, a full-vocabulary sort on a GPU) over up to
    `max_num_seqs` rows. Returns the temporary cache's bytes; nothing it made outlives it."""
    model = executor.model  # rank 0's shard; the executor runs the same step on the other ranks
    lengths = profile_sequence_lengths(cfg.max_num_batched_tokens, max_model_len)
    num_blocks = blocks_for(lengths, cfg.block_size)
    runner = ModelRunner(model, model_config, num_blocks, cfg.block_size, dtype, device,
                         attention_backend=cfg.attention_backend, kv_cache_dtype=cfg.kv_cache_dtype)
    tables, next_block = [], 0
    for n in lengths:
        used = -(-n // cfg.block_size)
        tables.append(list(range(next_block, next_block + used)))
        next_block += used
    total = sum(lengths)
    # With speculation a decoding sequence samples one row per proposed token too.
    rows = min(cfg.max_num_seqs * (1 + num_speculative_tokens), total)
    vocab = model_config.vocab_size
    batch = ModelInput(token_ids=[i % vocab for i in range(total)], query_lens=lengths,
                       context_lens=[0] * len(lengths), block_tables=tables, num_decodes=0,
                       logit_rows=list(range(total - rows, total)))
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9, logprobs=True, top_logprobs=20)
    request = Request("memory-profile", [0], params, time.monotonic(), seed=0)
    seqs = [Sequence(seq_id=-1 - i, request=request, index=i, token_ids=[0], sampling_key=i, detok=None)
            for i in range(rows)]
    executor.profile(batch, num_blocks, cfg.block_size, cfg.gpu_memory_utilization)  # the other ranks' share
    logits = runner.execute(batch)
    Sampler()(logits, seqs)
    return num_blocks * ModelRunner.kv_bytes_per_block(model, cfg.block_size, runner.kv_dtype)
