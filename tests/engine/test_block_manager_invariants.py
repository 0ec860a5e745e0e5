"""The KV block manager and the scheduler against a shadow model of the cache, under random
workloads (hypothesis): every slot a step writes is recorded in a model of the block contents, so
after any sequence of admissions, decodes, forks, frees and preemptions each live sequence's
computed tokens must read back exactly as its own tokens (copy-on-write, the prefix cache and
eviction all included), and the reference counts and free lists must account for every block."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmserve import SamplingParams
from lmserve.engine.block_manager import BlockManager, hash_block
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.sequence import Request, SeqStatus, Sequence

BS = 4


class ShadowCache:
    """What each KV slot holds: the token whose keys/values were written there (None: garbage)."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots = [[None] * bm.block_size for _ in range(bm.num_blocks)]

    def copy(self, copies):
        for src, dst in copies:
            self.slots[dst] = list(self.slots[src])

    def write(self, seq: Sequence, start: int, n: int):
        for pos in range(start, start + n):
            block = seq.block_table[pos // self.bm.block_size]
            self.slots[block][pos % self.bm.block_size] = seq.token_ids[pos]

    def read(self, seq: Sequence) -> list:
        bs = self.bm.block_size
        return [self.slots[seq.block_table[p // bs]][p % bs] for p in range(seq.num_computed_tokens)]


def check_invariants(bm: BlockManager, live: list[Sequence], shadow: ShadowCache) -> None:
    refs = [0] * bm.num_blocks
    for s in live:
        assert len(set(s.block_table)) == len(s.block_table), "a sequence holds one block twice"
        for b in s.block_table:
            refs[b] += 1
    assert refs == bm.ref_counts, "reference counts differ from the block tables that hold them"
    free, evictable = list(bm.free_blocks), list(bm.evictable)
    assert len(set(free)) == len(free)
    held = {b for b in range(bm.num_blocks) if refs[b]}
    assert not (set(free) & set(evictable)) and not (held & (set(free) | set(evictable)))
    assert held | set(free) | set(evictable) == set(range(bm.num_blocks)), "a block is lost"
    assert bm.num_free_blocks == bm.num_blocks - len(held)
    for b in free:
        assert bm.block_hash[b] is None, "a free block still claims cached content"
    for b in evictable:
        assert bm.block_hash[b] is not None
    for h, b in bm.hash_to_block.items():
        assert bm.block_hash[b] == h
    for s in live:
        assert len(s.block_table) * bm.block_size >= s.num_computed_tokens
        assert shadow.read(s) == s.token_ids[:s.num_computed_tokens], "a sequence reads KV that is not its own"
        parent = None
        for i, h in enumerate(s.block_hashes):  # the hash chain covers whole computed blocks only
            assert (i + 1) * bm.block_size <= s.num_computed_tokens
            parent = hash_block(parent, s.token_ids[i * bm.block_size:(i + 1) * bm.block_size])
            assert h == parent
    for b in bm.hash_to_block.values():  # a cached block's content is what its hash says
        assert None not in shadow.slots[b]
    for key, b in bm.partial_to_block.items():  # and every start of it it is indexed by
        assert bm.block_hash[b] is not None and key in bm.partial_keys[b]


def _seq(seq_id: int, tokens: list[int], n: int = 1) -> Sequence:
    req = Request(f"r{seq_id}", list(tokens), SamplingParams(n=n), 0.0, seed=seq_id)
    return Sequence(seq_id, req, 0, list(tokens), sampling_key=seq_id, detok=None)


# Prompts from a small alphabet over few lengths share prefixes often (prefix-cache hits).
prompts = st.lists(st.integers(0, 2), min_size=1, max_size=11)
ops = st.lists(st.one_of(
    st.tuples(st.just("add"), prompts),
    st.tuples(st.just("decode"), st.integers(0, 50), st.integers(0, 2)),
    st.tuples(st.just("fork"), st.integers(0, 50)),
    st.tuples(st.just("free"), st.integers(0, 50)),
    st.tuples(st.just("reset"), st.none()),
), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, num_blocks=st.integers(3, 12), caching=st.booleans())
def test_block_manager_random_workload_keeps_every_sequence_reading_its_own_kv(ops, num_blocks, caching):
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=caching)
    shadow = ShadowCache(bm)
    live: list[Sequence] = []
    next_id = 0
    for op in ops:
        kind = op[0]
        if kind == "add":
            seq = _seq(next_id, op[1])
            next_id += 1
            cached = bm.allocate_cached_prefix(seq)
            assert cached < seq.num_tokens
            # A cached prefix is content some sequence computed: it must read back as this prompt.
            assert shadow.read(seq) == seq.token_ids[:cached]
            n = seq.num_tokens - cached
            if not bm.can_append(seq, n):
                bm.free(seq)  # the scheduler's "no room": give the cached blocks back
            else:
                shadow.copy(bm.append_slots(seq, n))
                shadow.write(seq, cached, n)
                seq.num_computed_tokens += n
                bm.cache_full_blocks(seq)
                live.append(seq)
        elif kind == "decode" and live:
            seq = live[op[1] % len(live)]
            seq.token_ids.append(op[2])
            if bm.can_append(seq, 1):
                shadow.copy(bm.append_slots(seq, 1))
                # Copy-on-write: the block this token goes to is this sequence's alone.
                assert bm.ref_counts[seq.block_table[seq.num_computed_tokens // BS]] == 1
                shadow.write(seq, seq.num_computed_tokens, 1)
                seq.num_computed_tokens += 1
                bm.cache_full_blocks(seq)
            else:  # preempted: all blocks go back, the tokens stay for a recompute
                bm.free(seq)
                live.remove(seq)
        elif kind == "fork" and live:
            parent = live[op[1] % len(live)]
            child = _seq(next_id, parent.token_ids)
            next_id += 1
            child.num_computed_tokens = parent.num_computed_tokens
            bm.fork(parent, child)
            live.append(child)
        elif kind == "free" and live:
            bm.free(live.pop(op[1] % len(live)))
        elif kind == "reset":
            bm.reset_prefix_cache()
        check_invariants(bm, live, shadow)
    for seq in live:
        bm.free(seq)
    check_invariants(bm, [], shadow)
    assert bm.num_free_blocks == num_blocks


def test_evictable_blocks_go_least_recently_released_first():
    bm = BlockManager(6, BS)
    seqs = [_seq(i, [10 * i + j for j in range(BS + 1)]) for i in range(3)]
    for s in seqs:  # each computes one full block (cached) and starts a second
        bm.append_slots(s, s.num_tokens)
        s.num_computed_tokens = s.num_tokens
        bm.cache_full_blocks(s)
    full = [s.block_table[0] for s in seqs]
    for i in (1, 0):
        bm.free(seqs[i])
    # Free: the partial blocks of seqs 1 and 0; evictable: 1's full block, then 0's.
    assert list(bm.evictable) == [full[1], full[0]]
    taken = [bm._allocate() for _ in range(3)]
    assert taken[2] == full[1], "the least recently released cached block is evicted first"
    assert full[0] in bm.evictable and bm.block_hash[full[1]] is None
    # The survivor is still a prefix-cache hit.
    again = _seq(9, seqs[0].token_ids)
    assert bm.allocate_cached_prefix(again) == BS and again.block_table == [full[0]]


def test_copy_on_write_copies_a_shared_partial_block_once():
    bm = BlockManager(8, BS)
    parent = _seq(0, [1, 2, 3, 4, 5, 6])  # one full block and a partial one
    bm.append_slots(parent, 6)
    parent.num_computed_tokens = 6
    child = _seq(1, parent.token_ids)
    child.num_computed_tokens = 6
    bm.fork(parent, child)
    shared = parent.block_table[1]
    assert bm.ref_counts[shared] == 2 and bm.blocks_needed(parent, 1) == 1
    copies = bm.append_slots(parent, 1)
    assert copies == [(shared, parent.block_table[1])] and parent.block_table[1] != shared
    assert bm.ref_counts[shared] == 1
    assert bm.append_slots(child, 1) == [], "the last holder writes in place"
    assert child.block_table[1] == shared
    assert child.block_table[0] == parent.block_table[0] and bm.ref_counts[parent.block_table[0]] == 2


def test_a_cached_block_lends_its_first_tokens_and_is_copied_before_it_is_written():
    bm = BlockManager(8, BS)
    first = _seq(0, [1, 2, 3, 4, 5, 6, 7, 8, 9])  # two full blocks (cached) and a partial one
    bm.append_slots(first, first.num_tokens)
    first.num_computed_tokens = first.num_tokens
    bm.cache_full_blocks(first)
    full = first.block_table[:2]
    bm.free(first)
    # A prompt that parts from it two tokens into the second block gets those two as well.
    second = _seq(1, [1, 2, 3, 4, 5, 6, 0, 0])
    assert bm.allocate_cached_prefix(second) == 6 and second.block_table == full
    assert bm.blocks_needed(second, 2) == 1, "the lent block is copied, not written"
    assert bm.append_slots(second, 2) == [(full[1], second.block_table[1])] and second.block_table[1] != full[1]
    assert bm.block_hash[full[1]] is not None and full[1] in bm.evictable, "the lender stays cached, as it was"
    # A repeated prompt computes only its last token (its logits are needed).
    again = _seq(2, [1, 2, 3, 4, 5, 6, 7])
    assert bm.allocate_cached_prefix(again) == 6 and again.block_table == full
    # Eviction drops a block's partial keys with it.
    bm.free(second)
    bm.free(again)
    bm.reset_prefix_cache()
    assert not bm.partial_to_block and not bm.partial_keys
    assert bm.allocate_cached_prefix(_seq(3, [1, 2, 3, 4, 5, 6, 7])) == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(st.tuples(prompts, st.integers(1, 24), st.integers(1, 3)), min_size=1, max_size=8),
       num_blocks=st.integers(6, 14), max_num_seqs=st.integers(3, 6), budget=st.integers(4, 24),
       cap=st.integers(0, 6))
def test_scheduler_random_workload_finishes_everything_within_its_limits(requests, num_blocks, max_num_seqs,
                                                                         budget, cap):
    """The engine's loop without a model: every step stays within the token budget, the prefill
    cap and the running-seat limit, every scheduled sequence reads its own KV, preempted ones
    hold no blocks and wait at the front, and every request finishes with all blocks back."""
    bm = BlockManager(num_blocks, BS)
    sched = Scheduler(bm, max_num_seqs, budget, cap)
    shadow = ShadowCache(bm)
    targets: dict[int, int] = {}
    all_seqs: list[Sequence] = []
    for i, (prompt, out_len, n) in enumerate(requests):
        n = min(n, max_num_seqs)
        if n * -(-(len(prompt) + out_len) // BS) > num_blocks:
            continue  # could never fit, however the others are preempted
        seq = _seq(i, prompt, n)
        seq.request.seqs.append(seq)
        targets[seq.seq_id] = len(prompt) + out_len
        all_seqs.append(seq)
        sched.add(seq)
    next_id = 1000
    for _ in range(2000):
        if not sched.has_work:
            break
        batch = sched.schedule()
        work = [(s, 1) for s in batch.decodes] + batch.prefills
        assert sum(n for _, n in work) <= budget
        assert all(n <= (cap or budget) for _, n in batch.prefills)
        assert sum(Scheduler._seats(s) for s in sched.running) <= max_num_seqs
        for victim in batch.preempted:
            assert not victim.block_table and victim.num_computed_tokens == 0 and victim in sched.waiting
        assert not batch.empty or batch.preempted or not sched.running, "a step with work scheduled nothing"
        shadow.copy(batch.block_copies)
        for seq, n in work:
            shadow.write(seq, seq.num_computed_tokens, n)
            seq.num_computed_tokens += n
            bm.cache_full_blocks(seq)
        sampled: list[Sequence] = []
        for seq, _ in work:
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # mid-prefill: nothing sampled
            sampled.append(seq)
            if seq.forks_pending:  # as the engine: the other choices fork from this prefill
                for k in range(1, seq.params.n):
                    child = Sequence(next_id, seq.request, k, list(seq.token_ids), sampling_key=k, detok=None)
                    next_id += 1
                    seq.request.seqs.append(child)
                    child.num_computed_tokens = seq.num_computed_tokens
                    bm.fork(seq, child)
                    sched.add_running(child)
                    targets[child.seq_id] = targets[seq.seq_id]
                    all_seqs.append(child)
                    sampled.append(child)
        for s in sampled:
            s.token_ids.append((s.seq_id + s.num_tokens) % 3)  # each choice its own tokens
            if s.num_tokens >= targets[s.seq_id]:
                s.status = SeqStatus.FINISHED
                sched.remove(s)
        live = [s for s in all_seqs if s.block_table]
        check_invariants(bm, live, shadow)
    assert not sched.has_work, "the scheduler stopped making progress"
    assert all(s.status is SeqStatus.FINISHED for s in all_seqs)
    assert bm.num_free_blocks == num_blocks
