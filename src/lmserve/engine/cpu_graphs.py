"""Decode steps on the CPU, replayed from C++ (engine option `cpu_graphs`, on by default on CPU).

Why: a CPU decode step of a small batch is bound by the interpreter, not the arithmetic. The
bundled model's batch-1 step is ~540 operator calls, and the Python around each (modules, quant
methods, argument parsing) cost ~3.5 ms of a 10.7 ms step on the 2-core box, more than all its
norms, rotaries and attention together. A CUDA graph removes launch overhead on a GPU; this removes
the interpreter on a CPU, the same way: record a step's operator calls once, replay them. Measured
(docs/benchmarks.md, "Round four"): batch 1 10.6 -> 6.8 ms a token offline; bf16 batch 32
815 -> 1,039 tok/s; one stream served 1.23x llama.cpp's tokens/s, from 0.89x.

How:
- A decode-only batch of n sequences (n <= max_num_seqs) runs over static input buffers: token ids,
  positions, cache slots, tokens to attend, and block tables as wide as max_model_len needs (the
  paged kernel reads only each sequence's own blocks, so stale columns are never read).
- `OpRecorder` (a TorchDispatchMode) records the forward plus the LM head over those buffers: every
  operator reaching the dispatcher, its arguments, and which of them are results of earlier calls.
  Everything else (weights, the KV cache, the buffers, sizes) is a constant of the recording.
- cpu_graph_replay.cpp replays it: one boxed dispatcher call per operator, with the same
  operators and arguments, so the same results bit for bit, and intermediates freed after their
  last use as eagerly as they are. The interpreter lock is released for the whole step.
- Batch sizes are padded up the CUDA graphs' ladder (1, 2, 4, then multiples of 8): padding rows
  attend one token of their own in a scratch block past the block manager's, so they never touch a
  live sequence. Without it every size a batch passes through while requests finish and arrive (11,
  then 5, then 16) ran eager, slowed further by the server's Python at those very moments: with 16
  streams, those steps took 50-70 ms where a replayed one takes 25, and they set the time to first
  token of the next requests.
- Per padded size, lazily: the first WARM_STEPS steps of that size run eager (the first makes the
  choices taken on first use: kernel timings, extension loads), the next is recorded, the next runs
  both ways and must agree bit for bit (a value read on the host and baked into the recording would
  differ at the next position), and only then does the size replay. A size whose replay differs
  stays eager; a recording that fails turns the graphs off. Either way the reason is in the log.
- Not recorded: prefill and mixed steps (their shapes change every step); MoE layers (they read
  expert counts on the host); an fp8 KV cache and any layer whose decode attention is not the paged
  kernel (the gather path builds its groups from host lists: the static metadata refuses it);
  tensor parallelism (the collectives); the compiled decode (one fast path at a time).
- A recording holds what the step read then: a weight edited in place afterwards (nothing in the
  engine does; the eager path's packed-copy version check would notice) is not seen by the replay,
  and neither is a process-wide kernel switch flipped later (cpu_decode_kernel.set_enabled). Code
  that does either should run its engine with `cpu_graphs=False`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmserve.cpu_extensions import CpuExtension
from lmserve.engine.cuda_graphs import graph_batch_sizes, padded_decode_inputs, padded_size
from lmserve.model_input import ModelInput

log = logging.getLogger("lmserve.engine")

# Eager steps of a padded batch size before it is recorded (recording and validating cost about two
# steps). One: the ladder has few sizes and they come back, and a size left eager is slowest exactly
# when it occurs, while requests finish and arrive and the server's Python holds the interpreter lock.
WARM_STEPS = 1

_REPLAY = CpuExtension(
    "lmserve_cpu_graph_replay", Path(__file__).with_name("cpu_graph_replay.cpp"), "CPU decode replay",
    needs=(), isa_flags=(), env="LMSERVE_CPU_GRAPHS", fallback="decode steps run eager", python_module=True)


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why this model's decode cannot be recorded (None: it can). Loads the replay, built once per
    machine: at start, not in the middle of a request (loading even a cached build takes ~1 s)."""
    from lmserve.layers.moe import FusedExperts

    if any(isinstance(m, FusedExperts) for m in model.modules()):
        return "MoE layers read expert counts on the host"
    return _REPLAY.unavailable_reason()


class NotRecordable(RuntimeError):
    """The forward did something a replay cannot repeat (a value read on the host)."""


class OpRecorder(TorchDispatchMode):
    """Records every operator call reaching the dispatcher while active (the forward's own calls:
    calls made inside an operator are not seen). A tensor argument produced by an earlier recorded
    call is a use of that value; any other tensor is a constant of the recording."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []  # (op, args, kwargs, uses, results)
        self.values: dict[int, int] = {}  # id(tensor) -> value index
        self._alive: list[torch.Tensor] = []  # keeps results' ids unique while recording (`calls` holds args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        position = {a.name: i for i, a in enumerate(schema.arguments)}
        uses = []
        inputs = []
        for index, arg in [*enumerate(args), *((position[k], v) for k, v in kwargs.items())]:
            if isinstance(arg, torch.Tensor):
                inputs.append(arg)
                if id(arg) in self.values:
                    uses.append((index, -1, self.values[id(arg)]))
            elif isinstance(arg, (list, tuple)):
                uses += [(index, j, self.values[id(e)]) for j, e in enumerate(arg)
                         if isinstance(e, torch.Tensor) and id(e) in self.values]
        if len(schema.returns) == 1 and isinstance(out, (list, tuple)):  # one Tensor[] return
            returned = [((0, j), o) for j, o in enumerate(out)]
        else:
            returned = [((i, -1), o) for i, o in enumerate(out if len(schema.returns) > 1 else (out,))]
        results = []
        for (index, element), o in returned:
            if o is None:
                continue
            if not isinstance(o, torch.Tensor):
                raise NotRecordable(f"{func} returned {type(o).__name__} to Python (a value read on the host)")
            if any(o is t for t in inputs):  # an in-place op hands back its argument
                if id(o) in self.values:
                    results.append((index, element, self.values[id(o)]))
                continue
            self.values[id(o)] = len(self.values)
            self._alive.append(o)
            results.append((index, element, self.values[id(o)]))
        self.calls.append((func, args, kwargs, uses, results))
        return out

    def program(self, output: torch.Tensor):
        """The replayable program of the recorded calls, returning `output`."""
        if id(output) not in self.values:
            raise NotRecordable("the output was not computed by a recorded call")
        if not _REPLAY.available():
            raise NotRecordable(f"the replay is unavailable: {_REPLAY.unavailable_reason()}")
        out = self.values[id(output)]
        last_use: dict[int, int] = {}
        for step, (_, _, _, uses, results) in enumerate(self.calls):
            for _, _, value in [*uses, *results]:
                last_use[value] = step
        releases: list[list[int]] = [[] for _ in self.calls]
        for value, step in last_use.items():
            if value != out:
                releases[step].append(value)
        program = _REPLAY.module.Program(len(self.values))
        for (func, args, kwargs, uses, results), release in zip(self.calls, releases):
            program.add(func._schema.name, func._schema.overload_name, tuple(args), dict(kwargs), uses, results,
                        release)
        return program, out


class CpuDecodeGraphs:
    """The recorded decode steps of one engine on the CPU: `run` returns the logits of a decode-only
    batch it serves, or None (the caller runs the step eager)."""

    RECORD, VALIDATE, REPLAY, EAGER = range(4)

    def __init__(self, model: torch.nn.Module, kv_caches: list, backend, block_size: int, max_rows: int,
                 max_blocks_per_seq: int, dtype: torch.dtype, scratch_block: int):
        self.model, self.kv_caches, self.backend, self.block_size = model, kv_caches, backend, block_size
        self.dtype = dtype
        self.sizes = graph_batch_sizes(max_rows)
        self.scratch_block = scratch_block
        i64 = dict(dtype=torch.int64)
        # Rows: token ids, positions, cache slots, tokens to attend (position + 1).
        self.inputs = torch.zeros(4, self.sizes[-1], **i64)
        self.block_tables = torch.zeros(self.sizes[-1], max_blocks_per_seq, **i64)
        self.seen: dict[int, int] = {}  # padded batch size -> eager steps so far
        self.state: dict[int, int] = {}  # padded batch size -> phase, once warm
        self.programs: dict[int, tuple] = {}  # padded batch size -> (program, output value, its views)
        self.steps = 0  # decode steps served by replay
        self.enabled = True  # False: every step eager (tests and benchmarks compare the two)
        self.failed: str | None = None  # why a recording failed: every step eager from then on
        # A dispatch mode's first use in a process imports ~1 s of torch: at start, not mid-request.
        with torch.inference_mode(), OpRecorder():
            torch.zeros(1).add_(1)

    def _views(self, n: int) -> tuple[torch.Tensor, ...]:
        ids, positions, slots, lens = self.inputs[:, :n]
        return ids, positions, slots, lens, self.block_tables[:n]

    def _forward(self, views: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, positions, slots, lens, tables = views
        meta = self.backend.static_decode_metadata(slots, positions, tables, lens, self.dtype)
        return self.model.compute_logits(self.model(ids, positions, self.kv_caches, meta))

    def run(self, batch: ModelInput) -> torch.Tensor | None:
        n = len(batch.query_lens)
        size = padded_size(n, self.sizes)
        if (not self.enabled or self.failed or size is None or batch.num_decodes != n
                or batch.logit_rows != list(range(n))):
            return None
        width = max(len(t) for t in batch.block_tables)
        if width > self.block_tables.shape[1]:
            return None
        phase = self.state.get(size)
        if phase is None:
            self.seen[size] = self.seen.get(size, 0) + 1
            if self.seen[size] <= WARM_STEPS:
                return None
            phase = self.state[size] = self.RECORD
        if phase == self.EAGER:
            return None
        self._stage(batch, size, width)
        try:
            if phase == self.RECORD:
                logits = self._record(size)
            elif phase == self.VALIDATE:
                logits = self._validate(size)
            else:
                program, out, _ = self.programs[size]
                logits = program.run(out)
                self.steps += 1
            return logits[:n]
        except Exception as e:  # noqa: BLE001 - any failure leaves the (always correct) eager path
            # What stops one recording (a host read, the gather attention path) stops every size.
            self._give_up(size, f"{type(e).__name__}: {str(e).strip()[:300]}", every_size=phase == self.RECORD)
            return None  # the step again, eager (the keys and values it wrote are the same ones)

    def _stage(self, batch: ModelInput, size: int, width: int) -> None:
        """This step's inputs into the first `size` rows of the buffers (one copy each): the batch's,
        then padding rows that attend only the token they write in the scratch block (the paged
        kernel needs one)."""
        *rows, tables = padded_decode_inputs(batch, size, width, self.block_size, self.scratch_block, padding_len=1)
        self.inputs[:, :size].copy_(torch.tensor(rows))
        self.block_tables[:size, :width].copy_(torch.from_numpy(tables))

    def _record(self, n: int) -> torch.Tensor:
        views = self._views(n)
        recorder = OpRecorder()
        with recorder:
            logits = self._forward(views)
        program, out = recorder.program(logits)
        self.programs[n] = (program, out, views)  # the views are constants of the program: keep them
        self.state[n] = self.VALIDATE
        return logits

    def _validate(self, n: int) -> torch.Tensor:
        program, out, views = self.programs[n]
        eager = self._forward(views)
        replayed = program.run(out)  # writes the same keys and values to the same slots again
        if not torch.equal(eager, replayed):
            self._give_up(n, "the replay differs from the eager forward at a new position")
            return eager
        self.state[n] = self.REPLAY
        log.info("CPU graphs: decode batches of %d replay %d recorded operator calls", n, len(program))
        return replayed

    def _give_up(self, n: int, reason: str, every_size: bool = False) -> None:
        self.state[n] = self.EAGER
        self.programs.pop(n, None)
        if every_size:
            self.failed = reason
            log.warning("CPU graphs: off, decode runs eager (%s)", reason)
        else:
            log.warning("CPU graphs: decode batches of %d run eager (%s)", n, reason)
