"""Between the engine and the model runner: where the model runs, on one rank or on several.

`LocalExecutor` is the one-process case (the runner called directly). `MultiprocExecutor` runs a
tensor-parallel model: rank 0 is the engine's own process (it keeps the scheduler, the block
manager and the sampler, and holds shard 0), ranks 1..N-1 are worker processes (torch
multiprocessing, spawn) holding their shards. One step is one broadcast of the plain-data
`ModelInput` over the gloo CPU group, then the same forward on every rank with the layers'
collectives on the device group; the logits arrive on rank 0 only.

Failure and lifetime:
- A worker that dies is seen at once by a watcher thread (its process sentinel), and a collective
  waiting on it fails (gloo: the peer's closed connection; NCCL: the group's timeout); either way
  the executor turns dead and every step raises `WorkerDiedError`, which stops the engine: the
  server's /health/live answers 503 and requests in flight fail with a 5xx, nothing hangs.
- Workers die with their parent: each holds the read end of a pipe whose write end only the
  parent holds, and exits when it reads end-of-file (the parent exited, however it exited).
- `shutdown()` (also at exit and on garbage collection) tells the workers to stop, joins them,
  and kills any that do not stop in time.

Multi-node: ranks are numbered node by node (`nnodes` nodes of tp / nnodes ranks each). Node 0
hosts the TCP store at `dist_init_addr` and serves; the other nodes run `run_node_workers`,
which reads the workers' configuration from the store (node 0 publishes it), spawns its ranks
and returns when they exit (when node 0 shuts down or dies).
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmserve.distributed.group import COLLECTIVE_TIMEOUT, TPGroup, building, join

log = logging.getLogger("lmserve.engine")

_CONFIG_KEY = "lmserve/worker_config"
_STOP = ("stop",)


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker is gone: the engine cannot run another step."""


@dataclass
class WorkerConfig:
    """What every rank needs to build its shard and runner (plain data: it crosses processes)."""

    checkpoint: str
    dtype: str  # torch dtype name, e.g. "float32"
    device: str  # "cpu" or "cuda"
    tensor_parallel_size: int
    backend: str
    expert_parallel: bool = False
    quantization: str = "none"
    quantized_max_rows: int | None = None
    load_format: str = "auto"
    nnodes: int = 1
    threads: int | None = None  # torch threads per worker process
    runner_options: dict = field(default_factory=dict)

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    def device_of(self, rank: int) -> torch.device:
        if self.device != "cuda":
            return torch.device(self.device)
        # Several ranks may share one GPU (gloo with CUDA tensors on a one-GPU host).
        return torch.device("cuda", (rank % self.ranks_per_node) % max(torch.cuda.device_count(), 1))


class Worker:
    """One rank's shard, runner and the commands rank 0 sends it."""

    def __init__(self, config: WorkerConfig, group: TPGroup):
        from lmserve.models.loader import load_model, read_config, resolve_checkpoint

        self.config, self.group = config, group
        self.device = config.device_of(group.rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = getattr(torch, config.dtype)
        checkpoint = resolve_checkpoint(config.checkpoint)
        self.model_config = read_config(checkpoint)
        with building(group):
            self.model = load_model(checkpoint, self.model_config, self.dtype, self.device, config.quantization,
                                    config.quantized_max_rows, config.load_format)
        self.runner = None

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        from lmserve.engine.model_runner import ModelRunner

        self.runner = ModelRunner(self.model, self.model_config, num_blocks, block_size, self.dtype, self.device,
                                  **self.config.runner_options)

    def execute(self, batch):
        return self.runner.execute(batch)

    def execute_scored(self, batch):
        # Every rank walks the same scoring slices: the LM head's gather is a collective.
        return self.runner.execute_scored(batch)

    def profile(self, batch, num_blocks: int, block_size: int, utilization: float) -> int:
        """A worker's share of the engine's memory profile: the same step on a temporary cache,
        its own device's peak, its own block count; every rank then takes the smallest."""
        from lmserve.attention.kv_cache_dtype import kv_cache_torch_dtype
        from lmserve.engine.capacity import cache_blocks
        from lmserve.engine.memory import kv_cache_bytes, measure_peak, peak_in_use
        from lmserve.engine.model_runner import ModelRunner

        kv_cache_dtype = self.config.runner_options.get("kv_cache_dtype", "auto")

        def step() -> int:
            runner = ModelRunner(self.model, self.model_config, num_blocks, block_size, self.dtype, self.device,
                                 attention_backend=self.config.runner_options.get("attention_backend", "auto"),
                                 kv_cache_dtype=kv_cache_dtype)
            runner.execute(batch)
            return num_blocks * ModelRunner.kv_bytes_per_block(self.model, block_size, runner.kv_dtype)

        reading = measure_peak(self.device, step)
        budget = kv_cache_bytes(reading.total, utilization, peak_in_use(reading))
        per_block = ModelRunner.kv_bytes_per_block(self.model, block_size,
                                                   kv_cache_torch_dtype(kv_cache_dtype, self.dtype))
        return self.group.min_over_ranks(cache_blocks(budget, per_block, utilization))

    def all_reduce_probe(self, repeats: int, shape: tuple[int, ...]) -> None:
        """`repeats` all-reduces of a tensor of `shape` (benchmarks/bench_tensor_parallel.py
        times the collectives alone through this)."""
        x = torch.ones(shape, dtype=self.dtype, device=self.device)
        for _ in range(repeats):
            self.group.all_reduce(x)

    def noop(self) -> None:
        """Nothing: timing it times one command's broadcast."""

    def serve(self) -> None:
        """Run rank 0's commands until it says stop (or its end of the group goes away)."""
        while True:
            command = self.group.broadcast_object()
            if command == _STOP:
                return
            name, args = command
            getattr(self, name)(*args)


# ---- the worker process ------------------------------------------------------------------------


def _die_with_parent(death_pipe) -> None:
    """Exit as soon as the parent is gone: its end of the pipe closes (however it died, SIGKILL
    included), our read sees EOF. Not PR_SET_PDEATHSIG: it fires when the parent *thread* that
    spawned us exits, and the server loads models (so spawns workers) on a thread that ends."""

    def watch():
        try:
            death_pipe.recv()
        except (EOFError, OSError):
            pass
        os._exit(0)

    threading.Thread(target=watch, name="lmserve-parent-watch", daemon=True).start()


def _worker_main(rank: int, store_addr: tuple[str, int], config: WorkerConfig, death_pipe) -> None:
    _die_with_parent(death_pipe)
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        store = dist.TCPStore(store_addr[0], store_addr[1], None, False, timeout=COLLECTIVE_TIMEOUT)
        group = join(store, rank, config.tensor_parallel_size, config.backend, config.device_of(rank),
                     config.expert_parallel)
        Worker(config, group).serve()
    except Exception as e:  # rank 0 went away or the step failed: this worker is done either way
        log.error("tensor-parallel worker %d stops: %s", rank, e)
        os._exit(1)
    os._exit(0)


def _spawn(ranks: list[int], store_addr: tuple[str, int], config: WorkerConfig):
    """Start worker processes for `ranks`; returns (processes, the pipes' write ends)."""
    ctx = mp.get_context("spawn")
    processes, pipes = [], []
    for rank in ranks:
        reader, writer = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_worker_main, args=(rank, store_addr, config, reader),
                              name=f"lmserve-tp-worker-{rank}", daemon=True)
        process.start()
        reader.close()
        processes.append(process)
        pipes.append(writer)
    return processes, pipes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"dist_init_addr must be HOST:PORT, got {addr!r}")
    return host, int(port)


# ---- executors ---------------------------------------------------------------------------------


class LocalExecutor:
    """One rank: the model runs in this process."""

    group = None
    alive = True

    def __init__(self, model, model_config, dtype, device, runner_options: dict):
        self.model, self.model_config, self.dtype, self.device = model, model_config, dtype, device
        self.runner_options = runner_options
        self.runner = None

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        from lmserve.engine.model_runner import ModelRunner

        self.runner = ModelRunner(self.model, self.model_config, num_blocks, block_size, self.dtype, self.device,
                                  **self.runner_options)

    def execute(self, batch) -> torch.Tensor:
        return self.runner.execute(batch)

    def execute_scored(self, batch):
        return self.runner.execute_scored(batch)

    def profile(self, batch, num_blocks, block_size, utilization) -> None:
        """Nothing to do: the engine profiles this process's device itself."""

    def min_blocks(self, blocks: int) -> int:
        return blocks

    def shutdown(self) -> None:
        pass


class MultiprocExecutor:
    """Rank 0 here, ranks 1..N-1 in worker processes (and on other nodes)."""

    def __init__(self, config: WorkerConfig, node_rank: int = 0, dist_init_addr: str | None = None):
        if config.tensor_parallel_size % config.nnodes:
            raise ValueError(f"tensor_parallel_size {config.tensor_parallel_size} does not divide over "
                             f"{config.nnodes} nodes")
        self.config = config
        # Shared with the watcher thread, which must not hold the executor itself (a reference
        # from a running thread would keep it from ever being garbage-collected).
        self._state = {"failure": None, "stopped": False}
        host, port = parse_addr(dist_init_addr) if dist_init_addr else ("127.0.0.1", free_port())
        size = config.tensor_parallel_size
        # Rank 0 hosts the store; node 0's other ranks are our children; other nodes read the
        # config from the store and start theirs.
        store = dist.TCPStore(host if config.nnodes == 1 else "0.0.0.0", port, None, True,
                              timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
        store.set(_CONFIG_KEY, pickle.dumps(config))
        self.processes, self._pipes = _spawn(list(range(1, config.ranks_per_node)), (host, port), config)
        self._finalizer = weakref.finalize(self, _stop_processes, self.processes, self._pipes, self._state)
        started = time.perf_counter()
        try:
            self.group = join(store, 0, size, config.backend, config.device_of(0), config.expert_parallel)
            self.worker = Worker(config, self.group)
        except Exception:
            self._finalizer()
            raise
        self.model = self.worker.model
        self._watcher = threading.Thread(target=_watch, args=(self.processes, self._state), name="lmserve-tp-watch",
                                         daemon=True)
        self._watcher.start()
        log.info("tensor parallelism: %d ranks (%s, %d node(s)), rank 0 ready in %.1fs", size, config.backend,
                 config.nnodes, time.perf_counter() - started)

    @property
    def runner(self):
        return self.worker.runner

    @property
    def failure(self) -> str | None:
        return self._state["failure"]

    @property
    def _stopped(self) -> bool:
        return self._state["stopped"]

    @property
    def alive(self) -> bool:
        return self.failure is None and not self._stopped

    def _run_all(self, name: str, *args):
        """Every rank runs Worker.<name>(*args); rank 0's result."""
        if self.failure is not None:
            raise WorkerDiedError(self.failure)
        if self._stopped:
            raise WorkerDiedError("the engine's tensor-parallel workers were shut down")
        try:
            self.group.broadcast_object((name, args))
            return getattr(self.worker, name)(*args)
        except Exception as e:
            if self.failure is None:
                time.sleep(0.2)  # let the watcher name the worker that died, if one did
            self._state["failure"] = self.failure or (f"a tensor-parallel collective failed ({e}); "
                                                      "the engine cannot continue")
            raise WorkerDiedError(self.failure) from e

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        self._run_all("init_cache", num_blocks, block_size)

    def execute(self, batch) -> torch.Tensor:
        return self._run_all("execute", batch)

    def execute_scored(self, batch):
        """`execute` plus prompt logprobs (engine/prompt_logprobs.py): rank 0's logits and scores."""
        return self._run_all("execute_scored", batch)

    def run_all(self, name: str, *args):
        """Every rank runs Worker.<name>(*args) (the probes of benchmarks); rank 0's result."""
        return self._run_all(name, *args)

    def profile(self, batch, num_blocks: int, block_size: int, utilization: float) -> None:
        """Start the workers' share of a memory profile (rank 0 profiles itself, then
        `min_blocks` agrees with them on the smallest)."""
        self.group.broadcast_object(("profile", (batch, num_blocks, block_size, utilization)))

    def min_blocks(self, blocks: int) -> int:
        return self.group.min_over_ranks(blocks)

    def shutdown(self) -> None:
        if self._stopped:
            return
        if self.failure is None:
            try:
                self.group.broadcast_object(_STOP)
            except Exception:  # a worker already gone: the processes are reaped below regardless
                pass
        self._finalizer()


def _watch(processes, state: dict) -> None:
    """Mark the executor failed the moment one of its workers exits uninvited."""
    sentinels = {p.sentinel: p for p in processes}
    while sentinels and not state["stopped"]:
        for ready in wait_for(list(sentinels), timeout=1.0):
            process = sentinels.pop(ready)
            if not state["stopped"] and state["failure"] is None:
                process.join(timeout=1)
                state["failure"] = (f"tensor-parallel worker {process.name} died (exit code {process.exitcode}); "
                                    "the engine cannot continue")
                log.error("%s", state["failure"])


def _stop_processes(processes, pipes, state: dict | None = None, grace: float = 10.0) -> None:
    """Join the workers (they were told to stop, or see their pipe close); kill stragglers."""
    if state is not None:
        state["stopped"] = True
    for pipe in pipes:
        pipe.close()  # a worker that missed the stop command exits on EOF
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(timeout=max(deadline - time.monotonic(), 0.1))
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def run_node_workers(node_rank: int, dist_init_addr: str, nnodes: int, wait_s: float = 600.0) -> int:
    """A node other than 0: read the workers' config from node 0's store, run this node's ranks,
    return their worst exit code once they stop (node 0 shut down or died)."""
    if node_rank < 1 or node_rank >= nnodes:
        raise ValueError(f"node_rank must be in 1..{nnodes - 1} on a worker node, got {node_rank}")
    host, port = parse_addr(dist_init_addr)
    store = dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=wait_s))
    config: WorkerConfig = pickle.loads(store.get(_CONFIG_KEY))
    if config.nnodes != nnodes:
        raise ValueError(f"node 0 runs {config.nnodes} nodes, this node was started with --nnodes {nnodes}")
    per = config.ranks_per_node
    processes, pipes = _spawn(list(range(node_rank * per, (node_rank + 1) * per)), (host, port), config)
    log.info("node %d: tensor-parallel ranks %d..%d started", node_rank, node_rank * per, (node_rank + 1) * per - 1)
    try:
        for process in processes:
            process.join()
    finally:
        _stop_processes(processes, pipes, grace=5.0)
    return max((p.exitcode or 0) for p in processes)
