"""Where an engine's model runs: in this process (one rank, weights from the process-wide cache)
or split over tensor-parallel ranks (distributed/executor.py). Either way the engine talks to an
executor, which stands between it and the model runner(s)."""

from __future__ import annotations

import logging

import torch

from lmserve.distributed.executor import LocalExecutor, MultiprocExecutor, WorkerConfig
from lmserve.distributed.group import BACKENDS, default_backend
from lmserve.engine.options import EngineConfig
from lmserve.engine.weight_cache import shared_weights

log = logging.getLogger("lmserve.engine")


def check_parallel_options(tp: int, nnodes: int, dist_init_addr: str | None, backend: str,
                           device: torch.device) -> None:
    if tp < 1 or nnodes < 1:
        raise ValueError(f"tensor_parallel_size and nnodes must be at least 1, got {tp} and {nnodes}")
    if tp % nnodes:
        raise ValueError(f"tensor_parallel_size {tp} does not divide over {nnodes} nodes")
    if nnodes > 1 and not dist_init_addr:
        raise ValueError("a multi-node engine needs dist_init_addr (HOST:PORT of node 0's rendezvous)")
    if backend not in BACKENDS:
        raise ValueError(f"distributed_backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("distributed_backend nccl needs CUDA devices; use gloo on CPU")


def build_executor(cfg: EngineConfig, checkpoint, model_config, dtype: torch.dtype, device: torch.device,
                   max_model_len: int) -> LocalExecutor | MultiprocExecutor:
    """The model on this process (one rank), or split over tensor-parallel ranks."""
    runner_options = dict(compile_decode=cfg.compile, attention_backend=cfg.attention_backend,
                          use_cuda_graphs=cfg.cuda_graphs, use_cpu_graphs=cfg.cpu_graphs, max_num_seqs=cfg.max_num_seqs,
                          max_model_len=max_model_len, kv_cache_dtype=cfg.kv_cache_dtype)
    tp = cfg.tensor_parallel_size
    # An explicit backend at one rank still goes through the multi-process executor (a device
    # check of the NCCL setup on a one-GPU host).
    if tp == 1 and cfg.nnodes == 1 and cfg.distributed_backend is None:
        weights = shared_weights(checkpoint, model_config, dtype, device, cfg.quantization, cfg.quantized_max_rows,
                                 cfg.load_format)
        return LocalExecutor(weights, model_config, dtype, device, runner_options)
    if device.type == "cuda" and (cfg.cuda_graphs or cfg.compile):
        # Graph capture and compiled decode would have to capture the collectives too.
        log.warning("CUDA graphs and compiled decode are off under tensor parallelism; decode runs eager")
    # CPU graphs would record the collectives too.
    runner_options.update(use_cuda_graphs=False, use_cpu_graphs=False, compile_decode=False)
    backend = cfg.distributed_backend or default_backend(device)
    check_parallel_options(tp, cfg.nnodes, cfg.dist_init_addr, backend, device)
    threads = max(torch.get_num_threads() // tp, 1) if device.type == "cpu" else None
    config = WorkerConfig(str(checkpoint.path), str(dtype).removeprefix("torch."), device.type,
                          tp, backend, cfg.enable_expert_parallel, cfg.quantization, cfg.quantized_max_rows,
                          cfg.load_format, cfg.nnodes, threads, runner_options)
    return MultiprocExecutor(config, dist_init_addr=cfg.dist_init_addr)
