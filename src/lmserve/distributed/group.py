"""The tensor-parallel group of one engine: its rank, its size, and the collectives its layers use.

Each engine gets its own process groups, built directly from a TCP store
(`ProcessGroupGloo` / `ProcessGroupNCCL`) instead of torch.distributed's one process-wide default
group: so a second engine in the same process (two `LLM`s, a test's TP=1 and TP=2 engines side
by side) has groups of its own, and shutting one down leaves the other working.

Two groups per engine, as vLLM has: the device group carries the layers' tensors (NCCL on CUDA,
gloo on CPU), and a gloo group on the CPU carries the step's plain-data metadata (pickled
`ModelInput`s, commands) without a host-device round trip.

Layers find their group when they are built: the executor builds a model inside `building(group)`,
and the parallel layers keep `current_group()`. Outside it the group is `SINGLE` (one rank, every
collective a no-op), so every model built the usual way is the unsharded model it always was.
"""

from __future__ import annotations

import contextlib
import datetime
import pickle
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")
# A collective whose peer does not answer for this long fails instead of hanging the engine
# (a dead peer's closed connection fails it at once; this bounds a peer that hangs).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
# Bytes of pickled metadata that go in a broadcast's first (fixed-size) buffer: a decode step of
# a few dozen sequences fits, so a step costs one broadcast round trip.
_INLINE_BYTES = 16 << 10


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    device_group: object | None = None  # a c10d ProcessGroup; None when size == 1
    cpu_group: object | None = None
    # Expert parallelism: MoE layers hold whole experts per rank instead of a slice of each.
    expert_parallel: bool = False
    backend: str = "gloo"  # the device group's
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def is_parallel(self) -> bool:
        return self.size > 1

    def __deepcopy__(self, memo) -> TPGroup:
        # A handle on the process's communicators, not data: a copied layer talks through the
        # same group (and a lock or a c10d group could not be copied anyway).
        return self

    # ---- tensors (the device group) --------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; x itself when there is one rank."""
        if self.size > 1:
            self.device_group.allreduce([x]).wait()
        return x

    def gather_to_first(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """The ranks' x concatenated along `dim` on rank 0; None on the other ranks."""
        if self.size == 1:
            return x
        device = x.device
        # Gloo gathers host tensors only (it all-reduces CUDA tensors, but not this).
        x = (x.cpu() if self.backend == "gloo" else x).contiguous()
        options = dist.GatherOptions()
        options.rootRank = 0
        if self.rank == 0:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            self.device_group.gather([parts], [x], options).wait()
            return torch.cat(parts, dim=dim).to(device)
        self.device_group.gather([], [x], options).wait()
        return None

    # ---- plain data (the CPU group) --------------------------------------------------------

    def broadcast_object(self, obj=None):
        """Rank 0's `obj` on every rank, pickled through the gloo CPU group: one broadcast of a
        fixed-size buffer (an 8-byte length, then the bytes) carries a typical step; a larger
        payload sends its remainder in a second one."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        head = torch.zeros(_INLINE_BYTES, dtype=torch.uint8)
        if self.rank == 0:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            head[:8] = torch.frombuffer(bytearray(len(data).to_bytes(8, "little")), dtype=torch.uint8)
            inline = min(len(data), _INLINE_BYTES - 8)
            if inline:
                head[8:8 + inline] = torch.frombuffer(bytearray(data[:inline]), dtype=torch.uint8)
        self.cpu_group.broadcast([head], options).wait()
        length = int.from_bytes(head[:8].numpy().tobytes(), "little")
        rest = length - (_INLINE_BYTES - 8)
        if rest > 0:
            tail = torch.frombuffer(bytearray(data[_INLINE_BYTES - 8:]), dtype=torch.uint8) if self.rank == 0 \
                else torch.empty(rest, dtype=torch.uint8)
            self.cpu_group.broadcast([tail], options).wait()
        if self.rank == 0:
            return obj
        payload = head[8:8 + length].numpy().tobytes()
        if rest > 0:
            payload += tail.numpy().tobytes()
        return pickle.loads(payload)

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's `value` (the KV cache is sized by the tightest rank)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self.cpu_group.allreduce([t], options).wait()
        return int(t)


SINGLE = TPGroup()
_current = threading.local()


def current_group() -> TPGroup:
    """The group the model being built belongs to (SINGLE outside `building`)."""
    return getattr(_current, "group", SINGLE)


@contextlib.contextmanager
def building(group: TPGroup):
    """Build a model whose parallel layers shard for `group` (thread-local: two engines may
    load at once on different threads)."""
    saved = current_group()
    _current.group = group
    try:
        yield group
    finally:
        _current.group = saved


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def connect(store_host: str, store_port: int, rank: int, size: int, backend: str, device: torch.device,
            expert_parallel: bool = False, is_master: bool | None = None,
            timeout: datetime.timedelta = COLLECTIVE_TIMEOUT) -> TPGroup:
    """Join the engine's groups through its TCP store (rank 0 hosts the store)."""
    if backend not in BACKENDS:
        raise ValueError(f"distributed_backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("distributed_backend nccl needs CUDA devices; use gloo on CPU")
    store = dist.TCPStore(store_host, store_port, size, rank == 0 if is_master is None else is_master,
                          timeout=timeout)
    return join(store, rank, size, backend, device, expert_parallel, timeout)


def join(store, rank: int, size: int, backend: str, device: torch.device, expert_parallel: bool = False,
         timeout: datetime.timedelta = COLLECTIVE_TIMEOUT) -> TPGroup:
    cpu_group = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", store), rank, size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        device_group = dist.ProcessGroupNCCL(dist.PrefixStore("device/", store), rank, size, options)
        # Bind the communicator to this rank's device now (NCCL would guess from the first tensor).
        device_group.allreduce([torch.zeros(1, device=device)]).wait()
    else:
        device_group = dist.ProcessGroupGloo(dist.PrefixStore("device/", store), rank, size, timeout)
    return TPGroup(rank, size, device_group, cpu_group, expert_parallel, backend)


def shard_range(total: int, rank: int, size: int) -> tuple[int, int]:
    """(start, length) of rank's equal share of `total` items (total divisible by size)."""
    if total % size:
        raise ValueError(f"{total} does not divide over {size} tensor-parallel ranks")
    length = total // size
    return rank * length, length
