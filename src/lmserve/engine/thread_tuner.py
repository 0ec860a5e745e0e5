"""CPU threads per step, chosen by measuring: the default survives a busy neighbour.

Why: on a quiet host, one intra-op thread per physical core is fastest (2 threads beat 1 by 20-40%
on the 2-core box). When another process keeps a core busy, the same setting collapses: OpenMP
threads meet at the end of every op, so the thread that lost its core stalls every op of the
step for a scheduler time slice (64 streams served 5x slower than with 1 thread; docs/benchmarks.md,
"Threads"). No fixed thread count or OpenMP wait policy wins both cases (PASSIVE survives the
neighbour but costs the quiet host a fifth of int4's speed), so the engine measures instead.

How: steps are grouped by their size (query tokens, rounded up to a power of two: a 1-row decode
and a 512-token prefill chunk are never compared). For each group the tuner keeps a decaying
average of step time per thread count. It runs the count with the lowest average, and every so
often one of the others (round robin), whose measurement replaces that count's stale average:
when a neighbour comes, the running count's average rises within a few steps; when it goes, the
next exploration sees it. A new step size starts on the count the busiest size runs and tries the
others on its next steps (later, if the busiest size's explorations keep losing), then explores
every `EXPLORE_EVERY` steps; each exploration that loses
doubles the interval (and more, the worse it did), up to `MAX_EXPLORE_EVERY`, and one that wins
resets it, so exploring costs little even when the other count is many times slower
(docs/benchmarks.md has both cases).

Thread counts are tried from the configured count down: all, one fewer (a neighbour on one
core), half, and one. torch's thread count is the process's, so the count is set for the step and
put back after it (0.1 us each): code that runs between steps (an offline `LLM` user's own torch
code) sees the configured count. The thread count must not change results (a seeded request
samples the same tokens every time): in bf16 (the serving default, int4 included) the products
split their output rows, not their sums, over threads, and the logprobs are equal with 1 and 2
threads (tests/engine/test_thread_tuner.py); in float32 they are not (oneDNN's fp32 products
moved logprobs by 4e-6), so a float32 engine keeps a fixed count. `--threads N` (an explicit
count) turns the tuner off, as do tensor-parallel ranks (each sets its own), non-CPU devices and
LMSERVE_ADAPTIVE_THREADS=0.
Compiled decode graphs (`compile: true`) fix their team size when compiled, so the tuner measures
them but cannot change them.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("lmserve.engine")

EXPLORE_EVERY = 16  # one step in this many per size group tries another thread count, at first
MAX_EXPLORE_EVERY = 256  # ... and at least this often while explorations keep losing
DECAY = 0.25  # weight of the newest step time in a count's average
# Compute dtypes whose results were measured equal, logprob for logprob, with 1 and 2 threads
# (tests/engine/test_thread_tuner.py holds them to it).
INVARIANT_DTYPES = (torch.bfloat16,)
ENV_OFF = "LMSERVE_ADAPTIVE_THREADS"  # "0": keep the configured count (benchmarks compare both)


def candidate_counts(max_threads: int) -> list[int]:
    """The thread counts worth trying, most first: all, one fewer, half, one."""
    counts = []
    for n in (max_threads, max_threads - 1, max_threads // 2, 1):
        if n >= 1 and n not in counts:
            counts.append(n)
    return counts


class _Group:
    """Step-time averages of one step size, per thread count."""

    def __init__(self):
        self.average: dict[int, float] = {}
        self.steps = 0
        self.next_explore = 0  # index into the other counts, round robin
        self.interval = EXPLORE_EVERY  # steps between explorations (grows while they keep losing)
        # The other counts are first tried at once: a step size seen rarely (one-stream prefills)
        # would otherwise never leave the count it started on.
        self.until_explore = 1


class ThreadTuner:
    """One engine's thread choices (each engine measures its own model's steps)."""

    def __init__(self, max_threads: int):
        self.max_threads = max_threads
        self.counts = candidate_counts(max_threads)
        self.groups: dict[int, _Group] = {}
        self.warmed: set[int] = set()  # counts whose first step (new oneDNN primitives) was discarded
        self.chosen_log: dict[int, int] = {}  # group -> last count logged as its best

    @classmethod
    def for_engine(cls, device: torch.device, tensor_parallel_size: int, threads_fixed: bool,
                   dtype: torch.dtype = torch.bfloat16) -> ThreadTuner | None:
        """A tuner where it applies: one CPU process whose thread count the user left to us, in a
        compute dtype whose results do not depend on the thread count. float32 is left out: its
        products split their sums over threads (logprobs moved by 4e-6 between 1 and 2 threads),
        so a seeded sample could come out differently from one run of a request to the next."""
        if (device.type != "cpu" or tensor_parallel_size > 1 or threads_fixed or dtype not in INVARIANT_DTYPES
                or os.environ.get(ENV_OFF) == "0"):
            return None
        max_threads = torch.get_num_threads()
        return cls(max_threads) if max_threads > 1 else None

    @staticmethod
    def group_of(query_tokens: int) -> int:
        return max(query_tokens - 1, 0).bit_length()

    def choose(self, query_tokens: int) -> int:
        """Set (on the calling thread) and return the thread count for a step of this size."""
        group = self.groups.setdefault(self.group_of(query_tokens), _Group())
        if not group.average:
            # A step size not seen yet starts on the count the busiest size runs, and explores as
            # often as that size does now: soon where the counts measure close, late where the
            # others keep losing badly (trying every count at once ran each new prefill size
            # 2-threaded beside a busy core, many times slower).
            threads, group.until_explore = self._prevailing()
        else:
            threads = min(group.average, key=group.average.__getitem__)
            group.until_explore -= 1
            if group.until_explore <= 0:
                others = [n for n in self.counts if n != threads]
                untried = [n for n in others if n not in group.average]
                threads = untried[0] if untried else others[group.next_explore % len(others)]
                group.next_explore += 1
        if threads != self.max_threads:
            torch.set_num_threads(threads)
        return threads

    def _prevailing(self) -> tuple[int, int]:
        """The busiest step size's count, and the steps until a new size first explores."""
        measured = [g for g in self.groups.values() if g.average]
        if not measured:
            return self.max_threads, 1
        busiest = max(measured, key=lambda g: g.steps)
        first_explore = 1 if busiest.interval <= EXPLORE_EVERY else busiest.interval
        return min(busiest.average, key=busiest.average.__getitem__), first_explore

    def release(self, threads: int) -> None:
        """After the step: the configured count again."""
        if threads != self.max_threads:
            torch.set_num_threads(self.max_threads)

    def observe(self, query_tokens: int, threads: int, seconds: float) -> None:
        key = self.group_of(query_tokens)
        group = self.groups.setdefault(key, _Group())
        group.steps += 1
        if threads not in self.warmed:
            self.warmed.add(threads)  # the process's first step on this count (new oneDNN primitives)
            return
        best = min(group.average, key=group.average.__getitem__) if group.average else None
        if best is None or threads == best:
            # The running count's average moves slowly (noise).
            previous = group.average.get(threads)
            group.average[threads] = seconds if previous is None else previous + DECAY * (seconds - previous)
        else:
            # An exploration: its one measurement replaces the count's stale average, so a
            # neighbour that left is noticed at once (a lucky one is undone by the next few steps
            # at that count). One that wins keeps explorations frequent; one that loses makes them
            # rarer, the more so the worse it did, so what they cost stays a small share of the
            # steps however slow the other count is (2 threads beside a busy core ran steps 5-10x
            # slower: explored every 16th step, that alone cost 40% of the throughput).
            group.average[threads] = seconds
            ratio = seconds / max(group.average[best], 1e-9)
            if ratio < 1:
                group.interval = EXPLORE_EVERY
            else:
                group.interval = min(MAX_EXPLORE_EVERY, max(2 * group.interval, round(EXPLORE_EVERY * ratio)))
            group.until_explore = group.interval
        if len(group.average) == len(self.counts):
            best = min(group.average, key=group.average.__getitem__)
            if self.chosen_log.get(key) != best:
                self.chosen_log[key] = best
                log.debug("threads: %d for steps of up to %d tokens (step ms by count: %s)", best, 1 << key,
                          {n: round(t * 1e3, 2) for n, t in sorted(group.average.items())})

    def snapshot(self) -> dict[str, dict[int, float]]:
        """Average step ms per thread count, per step size (stats and tests)."""
        return {f"<={1 << key} tokens": {n: round(t * 1e3, 3) for n, t in sorted(g.average.items())}
                for key, g in sorted(self.groups.items())}
