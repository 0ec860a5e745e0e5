"""Scheduling priorities (vLLM's priority policy) on the real Scheduler and BlockManager, no model:
interactive requests (priority 0) are admitted before waiting batch ones (priority > 0), take
seats and blocks from running batch sequences when short, and batch sequences are admitted only
up to their share of the KV cache. Equal priorities keep the plain first-come order."""

from __future__ import annotations

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.sequence import Request, SeqStatus, Sequence
from lmserve.sampling_params import SamplingParams

BLOCK = 4


def _seq(seq_id: int, prompt_len: int, priority: int = 0) -> Sequence:
    tokens = [seq_id * 1000 + i for i in range(prompt_len)]  # no shared prefixes
    req = Request(f"r{seq_id}", list(tokens), SamplingParams(priority=priority), 0.0, seed=seq_id)
    seq = Sequence(seq_id, req, 0, list(tokens), sampling_key=seq_id, detok=None)
    req.seqs.append(seq)
    return seq


def _ids(seqs) -> list[int]:
    return [s.seq_id for s in seqs]


def test_waiting_interactive_requests_go_before_batch_ones():
    sched = Scheduler(BlockManager(64, BLOCK), max_num_seqs=2, max_num_batched_tokens=64)
    for s in (_seq(1, 8, 10), _seq(2, 8, 10), _seq(3, 8, 0), _seq(4, 8, 0)):
        sched.add(s)
    assert _ids(sched.waiting) == [3, 4, 1, 2]  # stable within a priority
    batch = sched.schedule()
    assert _ids(s for s, _ in batch.prefills) == [3, 4]


def test_an_interactive_request_preempts_batch_work_for_a_seat_and_blocks():
    bm = BlockManager(8, BLOCK)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    b1, b2 = _seq(1, 12, 10), _seq(2, 12, 10)  # 3 blocks each
    sched.add(b1)
    sched.add(b2)
    sched.schedule()
    assert _ids(sched.running) == [1, 2]
    urgent = _seq(3, 12, 0)
    sched.add(urgent)
    batch = sched.schedule()
    assert _ids(batch.preempted) == [2]  # the least urgent, youngest: one is enough
    assert urgent.status is SeqStatus.RUNNING and sorted(_ids(sched.running)) == [1, 3]
    assert _ids(sched.waiting) == [2]
    assert sched.num_preemptions == 1


def test_batch_sequences_get_at_most_their_share_of_the_cache():
    bm = BlockManager(16, BLOCK)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=256, background_kv_share=0.5)
    lines = [_seq(i, 12, 10) for i in range(1, 5)]  # 3 blocks each: two fit in 8 blocks, not three
    for s in lines:
        sched.add(s)
    sched.schedule()
    assert _ids(sched.running) == [1, 2] and _ids(sched.waiting) == [3, 4]
    sched.add(_seq(9, 12, 0))  # interactive work still finds the other half
    sched.schedule()
    assert 9 in _ids(sched.running)


def test_equal_priorities_keep_first_come_order_and_youngest_preemption():
    bm = BlockManager(6, BLOCK)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = _seq(1, 8), _seq(2, 8)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    for s in (a, b):  # prefilled (as the engine records it), then 8 more tokens: 2 more blocks each, 4 + 4 > 6
        s.num_computed_tokens = s.num_tokens
        s.token_ids += [7] * 8
    batch = sched.schedule()
    assert _ids(batch.preempted) == [2] and _ids(sched.waiting) == [2]
