"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, prefix caching.

Blocks hold `block_size` tokens of every layer's keys and values (the tensors live in the model
runner; this class only hands out block ids). A full, computed block is hashed, chained with the
hash of the block before it, so equal hashes mean equal whole prefixes: a later sequence with
the same prefix (a shared system prompt, another turn of the chat, a recomputed preempted
sequence) takes the cached block instead of recomputing it. Blocks nobody references but whose
content is still valid stay in an LRU pool and are evicted only when free blocks run out.

Matching is token-granular, as SGLang's radix cache is, not whole blocks only (vLLM's): where the
whole blocks end, a cached block that starts with the prompt's next tokens lends them too (each
cached block is also indexed by its first 1..block_size-1 tokens). The prompt then writes into
that block, so it gets a copy first (copy-on-write, as for a block shared by forked choices). A
repeated prompt, or a chat's next turn, then recomputes its last token instead of up to a block.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from lmserve.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # hash_block(parent, first j tokens), 0 < j < block_size, of each cached block -> the block;
        # and each cached block's keys there, to drop them when it is evicted.
        self.partial_to_block: dict[int, int] = {}
        self.partial_keys: dict[int, list[int]] = {}
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, LRU first
        # Prefix cache statistics, in tokens.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- capacity -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks `seq` needs to hold `num_new_tokens` more computed tokens (CoW included)."""
        total = seq.num_computed_tokens + num_new_tokens
        need = -(-total // self.block_size) - len(seq.block_table)
        if self._needs_copy_on_write(seq, num_new_tokens):
            need += 1
        return max(need, 0)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    # ---- allocation -----------------------------------------------------------------------

    def allocate_cached_prefix(self, seq: Sequence) -> int:
        """Attach the cached blocks matching the start of `seq` (which holds no blocks yet).
        Returns the number of tokens that no longer need computing. At least one token is
        always left to compute, since its logits are needed to sample."""
        assert not seq.block_table
        if not self.enable_prefix_caching or seq.request.scoring_prompt:
            return 0  # a prompt being scored needs its logits, which the cache does not hold
        tokens = seq.token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        parent = None
        hits = 0
        for i in range(max_blocks):
            h = hash_block(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self.hash_to_block.get(h)
            if block is None:
                break
            self._take(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
            hits += 1
        cached = hits * self.block_size
        rest = tokens[cached:len(tokens) - 1][:self.block_size - 1]
        for j in range(len(rest), 0, -1):  # the longest cached start of the next block
            block = self.partial_to_block.get(hash_block(parent, rest[:j]))
            if block is not None:
                self._take(block)
                seq.block_table.append(block)  # not its hash: this prompt's block differs past j
                cached += j
                break
        seq.num_computed_tokens = cached
        return cached

    def record_prefix_lookup(self, num_tokens: int, num_cached: int) -> None:
        """Count one admitted sequence's lookup (a retried admission counts once)."""
        self.prefix_queries += num_tokens
        self.prefix_hits += num_cached

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for `num_new_tokens` more tokens. Returns (src, dst) block copies to do
        before the forward pass: a shared partial block is copied before being written."""
        copies = []
        if self._needs_copy_on_write(seq, num_new_tokens):
            old = seq.block_table[-1]
            new = self._allocate()
            self._release(old)
            seq.block_table[-1] = new
            copies.append((old, new))
        total = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) * self.block_size < total:
            seq.block_table.append(self._allocate())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (the prompt's KV is computed once)."""
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        for block in child.block_table:
            self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self._release(block)
        seq.block_table = []
        seq.block_hashes = []

    def rollback(self, seq: Sequence) -> None:
        """Release the blocks past `seq`'s computed tokens: slots of rejected speculative tokens.
        Only blocks appended for this step's proposals lie there: nobody else holds them and
        nothing hashed them (a block is hashed once its tokens are computed and final), so they
        go straight back to the free list. Rejected slots inside a kept block are overwritten
        when their positions are computed again."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            assert self.ref_counts[block] == 1 and self.block_hash[block] is None, "rolled back a shared block"
            self._release(block)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of `seq` that became full and computed since the last call."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = hash_block(parent, seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            # Another sequence may have cached the same content first; keep that copy.
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
                tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
                keys = [hash_block(parent, tokens[:j]) for j in range(1, self.block_size)]
                for key in keys:
                    self.partial_to_block.setdefault(key, block)
                self.partial_keys[block] = keys

    def reset_prefix_cache(self) -> None:
        for block in list(self.evictable):
            self._evict(block)
            self.free_blocks.append(block)

    # ---- internals ------------------------------------------------------------------------

    def _needs_copy_on_write(self, seq: Sequence, num_new_tokens: int) -> bool:
        # The next token lands in the last block (it is partial) and someone else holds it too, or
        # it is a cached block lent in part (its content must stay what its hash says).
        if not (num_new_tokens > 0 and seq.block_table and seq.num_computed_tokens % self.block_size != 0
                and seq.num_computed_tokens < len(seq.block_table) * self.block_size):
            return False
        last = seq.block_table[-1]
        return self.ref_counts[last] > 1 or self.block_hash[last] is not None

    def _take(self, block: int) -> None:
        self.evictable.pop(block, None)  # present only while unreferenced
        self.ref_counts[block] += 1

    def _allocate(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        elif self.evictable:
            block = next(iter(self.evictable))
            self._evict(block)
        else:
            raise RuntimeError("KV cache out of blocks (the scheduler should have preempted)")
        self.ref_counts[block] = 1
        return block

    def _evict(self, block: int) -> None:
        self.evictable.pop(block)
        h = self.block_hash[block]
        if h is not None and self.hash_to_block.get(h) == block:
            del self.hash_to_block[h]
        for key in self.partial_keys.pop(block, ()):
            if self.partial_to_block.get(key) == block:
                del self.partial_to_block[key]
        self.block_hash[block] = None

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, "block freed twice"
        if self.ref_counts[block] == 0:
            if self.block_hash[block] is not None:
                self.evictable[block] = None  # most recently used last
            else:
                self.free_blocks.append(block)


def hash_block(parent: int | None, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))
