"""Continuous batching: which sequences run this step, and how many tokens each.

Every step has a token budget. Running sequences go first (a decode is one token, an unfinished
chunked prefill takes what the budget leaves), then waiting sequences are admitted while blocks,
budget and the running-sequence cap allow. Decodes and prefill chunks of different requests
share one flattened batch. When the cache runs out of blocks, the most recently admitted
sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed later (mostly from the prefix cache).

No prefill chunk takes more than `long_prefill_token_threshold` tokens of a step (as vLLM's
long-prefill threshold): a long prompt is prefilled over several steps, and in each one the
decodes of running requests go on and waiting prompts get the rest of the budget, so a short
request's first token does not wait for a long prompt's whole prefill.

Priorities (vLLM's `--scheduling-policy priority`: a lower value is more urgent, 0 the default;
batch API lines run at BATCH_PRIORITY): the waiting queue and the running set are kept in
priority order (arrival order within one priority), so the least urgent sequence is the one
preempted, a waiting request more urgent than running ones may preempt them to be admitted, and
the less urgent ("background", priority > 0) sequences are admitted only while they hold at
most `background_kv_share` of the cache's blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    """Decodes first, then prefill chunks: (sequence, number of new tokens) in batch order."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_token_threshold: int = 0, background_kv_share: float = 1.0):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Most tokens one prefill may take per step (0: no cap beyond the step's budget).
        self.prefill_cap = long_prefill_token_threshold or max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self.background_block_cap = int(block_manager.num_blocks * background_kv_share)
        # Told of every sequence that finishes, is aborted or preempted (a draft model's proposer
        # frees that sequence's draft KV blocks: spec_decode/draft_model.py).
        self.on_release = None

    def add(self, seq: Sequence) -> None:
        """Queue behind every waiting sequence as urgent or more (all of them, at equal priorities)."""
        if self.waiting and self.waiting[-1].params.priority > seq.params.priority:
            self._requeue(seq, front=False)
        else:
            self.waiting.append(seq)

    def _requeue(self, seq: Sequence, front: bool) -> None:
        """Insert at the front (a preempted sequence) or the back of its priority class."""
        p = seq.params.priority
        at = next((i for i, w in enumerate(self.waiting)
                   if (w.params.priority >= p if front else w.params.priority > p)), len(self.waiting))
        self.waiting.insert(at, seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked choice that shares its parent's computed blocks joins the running set."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
        if self.on_release is not None:
            self.on_release(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        # Most urgent first (stable: admission order within a priority), so the victim below, the
        # last one, is the least urgent and never already in this step's batch.
        self.running.sort(key=lambda s: s.params.priority)
        self._make_room_for_urgent(budget, batch)
        evicted_for_urgent = len(batch.preempted)

        # 1. Running sequences, oldest first; preempt the youngest when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            # A decoding sequence with proposed tokens (speculative decoding) verifies them in
            # the same step; speculation never preempts anyone: without room it just decodes.
            n = min(seq.num_tokens - seq.num_computed_tokens + len(seq.spec_token_ids), budget, self.prefill_cap)
            if seq.spec_token_ids and not self.bm.can_append(seq, n):
                seq.spec_token_ids = []
                n = min(seq.num_tokens - seq.num_computed_tokens, budget, self.prefill_cap)
            while not self.bm.can_append(seq, n):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break  # seq preempted itself: nothing younger is left to run
            self._take(seq, n, batch)
            scheduled.add(seq.seq_id)
            budget -= n
            i += 1

        # 2. Admit waiting sequences, unless this step had to preempt (no room to grow).
        seats = sum(self._seats(s) for s in self.running)
        background = sum(len(s.block_table) for s in self.running if s.params.priority > 0)
        while self.waiting and budget > 0 and len(batch.preempted) == evicted_for_urgent:
            seq = self.waiting[0]
            if seats + self._seats(seq) > self.max_num_seqs or seq in batch.preempted:
                break
            if not seq.block_table:
                self.bm.allocate_cached_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget, self.prefill_cap)
            need = self.bm.blocks_needed(seq, n)
            if need > self.bm.num_free_blocks or (
                    seq.params.priority > 0 and background + len(seq.block_table) + need > self.background_block_cap):
                self.bm.free(seq)
                seq.num_computed_tokens = 0
                break
            self.bm.record_prefix_lookup(seq.num_tokens, seq.num_computed_tokens)
            if seq.index == 0:
                seq.request.num_cached_tokens = seq.num_computed_tokens
            self.waiting.popleft()
            seats += self._seats(seq)
            if seq.params.priority > 0:
                background += len(seq.block_table) + need
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self._take(seq, n, batch)
            budget -= n
        return batch

    def _make_room_for_urgent(self, budget: int, batch: ScheduledBatch) -> None:
        """The first waiting sequence, more urgent than the least urgent running ones, gets their
        seats and blocks (they are preempted) when it would not fit otherwise."""
        if not self.waiting or not self.running:
            return
        head = self.waiting[0]
        n = min(head.num_tokens - head.num_computed_tokens, budget, self.prefill_cap)
        seats = sum(self._seats(s) for s in self.running)
        while self.running and self.running[-1].params.priority > head.params.priority and (
                seats + self._seats(head) > self.max_num_seqs
                or self.bm.blocks_needed(head, n) > self.bm.num_free_blocks):
            victim = self.running[-1]
            seats -= self._seats(victim)
            self._preempt(victim, batch)

    @staticmethod
    def _seats(seq: Sequence) -> int:
        """Running slots a sequence takes, counting the siblings it will fork."""
        return seq.params.n if seq.forks_pending else 1

    def _take(self, seq: Sequence, n: int, batch: ScheduledBatch) -> None:
        batch.block_copies += self.bm.append_slots(seq, n)
        if n == 1:  # one new token attends to the cache: the batched decode path serves it
            batch.decodes.append(seq)
        else:
            batch.prefills.append((seq, n))

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Recompute preemption: drop the KV, requeue at the front with prompt + output so far."""
        self.running.remove(seq)
        self.bm.free(seq)
        if self.on_release is not None:
            self.on_release(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.status = SeqStatus.WAITING
        self._requeue(seq, front=True)
        batch.preempted.append(seq)
        self.num_preemptions += 1
        # The victim is never in the batch yet: running sequences are taken oldest first and
        # the victim is the youngest, at worst the one being scheduled right now.
