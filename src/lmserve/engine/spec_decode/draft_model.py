"""Draft-model proposals (vLLM's `{"model": PATH, "num_speculative_tokens": k}`): a smaller
checkpoint of the same tokenizer guesses the next k tokens greedily, and the target verifies them
in one forward (verify.py).

The draft is run by the same machinery as the target: weights from the process-wide cache
(weight_cache.py), its own `ModelRunner` (attention backend, paged KV cache sized from its own
config) and its own `BlockManager`, with as many blocks as the target's cache, so it can mirror
every token the target holds (the engine's KV budget is split in proportion to the two models'
bytes per block: kv_sizing.py). No prefix caching for the draft: it only ever serves proposals.

Work is batched across sequences: one draft forward catches every proposing sequence up with its
new real tokens (and proposes its first token), then one forward per further draft position, over
all sequences still proposing. The last proposal is never fed (its KV would be needed only if it
were accepted, and then the next step feeds it with the target's bonus token).

The draft's KV of a sequence: `num_computed_tokens` of its tokens are final and cached, and the
proposals fed after them (`fed`) are cached too. After verification, the fed proposals the target
kept extend the final part; positions past that are simply recomputed (overwritten) next time.
A sequence's draft blocks are freed when it finishes, is aborted or preempted (the scheduler's
`on_release`).

Exactness: the draft proposes one token per position (its argmax), a one-hot draft distribution,
for which the target's own draw accepted-when-equal is Leviathan et al.'s rule exactly (verify.py):
sampled requests keep the target's distribution, and a seeded one the same tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.model_runner import ModelRunner
from lmserve.engine.spec_decode.verify import accepted_prefix
from lmserve.engine.weight_cache import shared_tokenizer, shared_weights
from lmserve.model_input import ModelInput
from lmserve.models.loader import read_config, resolve_checkpoint

log = logging.getLogger("lmserve.engine")


def check_draft_supported(engine_config) -> None:
    """Before anything loads: the setups a draft model does not run in."""
    if engine_config.tensor_parallel_size > 1 or engine_config.nnodes > 1:
        # The draft would need its own sharding and the executor's broadcast of its steps.
        raise ValueError("speculative_config: a draft model is not supported with tensor_parallel_size > 1 "
                         "(use method 'ngram', or one device)")


def load_draft(spec_config, engine_config, target_config, target_tokenizer, dtype: torch.dtype,
               device: torch.device) -> DraftModel:
    """The draft of `spec_config.model`, or a one-line ValueError why it cannot serve this target."""
    check_draft_supported(engine_config)
    return DraftModel(spec_config.model, target_config, target_tokenizer, dtype, device,
                      engine_config.load_format, engine_config.max_num_batched_tokens)


class DraftMismatch(ValueError):
    """The draft's tokenizer is not the target's: its token ids would mean other text."""


def tokenizer_mismatch(target_tokenizer, target_config, draft_tokenizer, draft_config) -> str | None:
    """Why the draft's token ids would not mean the target's (None: same tokenizer)."""
    if (target_tokenizer is None) != (draft_tokenizer is None):
        return "one of the two checkpoints has a tokenizer and the other has none"
    if target_tokenizer is None:  # token ids only: the vocabularies must at least be the same size
        if draft_config.vocab_size != target_config.vocab_size:
            return f"vocabulary sizes differ ({draft_config.vocab_size} vs {target_config.vocab_size})"
        if draft_config.eos_token_ids != target_config.eos_token_ids:
            return f"end-of-sequence ids differ ({sorted(draft_config.eos_token_ids)} vs " \
                   f"{sorted(target_config.eos_token_ids)})"
        return None
    if len(draft_tokenizer) != len(target_tokenizer):
        return f"vocabulary sizes differ ({len(draft_tokenizer)} vs {len(target_tokenizer)})"
    if draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        return "the token strings differ"
    if set(draft_tokenizer.all_special_ids) != set(target_tokenizer.all_special_ids):
        return "the special tokens differ"
    if draft_tokenizer.eos_token_id != target_tokenizer.eos_token_id:
        return f"end-of-sequence tokens differ ({draft_tokenizer.eos_token} vs {target_tokenizer.eos_token})"
    return None


@dataclass(eq=False)
class DraftState:
    """What the draft's cache holds of one target sequence (duck-typed as a sequence for the
    draft's BlockManager: computed tokens and a block table, never hashed)."""

    num_computed_tokens: int = 0  # the sequence's first tokens, final, whose draft KV is cached
    fed: list[int] = field(default_factory=list)  # proposals cached after them, not yet verified
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)


class DraftModel:
    """The proposer: `propose_all([(seq, k), ...])` -> greedy draft tokens; `release(seq)`."""

    def __init__(self, path: str, target_config, target_tokenizer, dtype: torch.dtype, device: torch.device,
                 load_format: str = "auto", max_tokens_per_step: int = 8192):
        checkpoint = resolve_checkpoint(path)
        self.config = read_config(checkpoint)
        problem = tokenizer_mismatch(target_tokenizer, target_config, shared_tokenizer(checkpoint), self.config)
        if problem is not None:
            raise DraftMismatch(f"speculative_config: the draft model {path!r} does not share the target's "
                                f"tokenizer: {problem}")
        self.model = shared_weights(checkpoint, self.config, dtype, device, "none", None, load_format)
        self.dtype, self.device = dtype, device
        # Token ids past the target's vocabulary (a draft with a padded embedding) are never proposed.
        self.vocab = min(self.config.vocab_size, target_config.vocab_size)
        self.max_len = self.config.context_length
        self.max_tokens_per_step = max_tokens_per_step
        self.runner: ModelRunner | None = None
        self.block_manager: BlockManager | None = None
        self.states: dict[int, DraftState] = {}

    def kv_bytes_per_block(self, block_size: int) -> int:
        return ModelRunner.kv_bytes_per_block(self.model, block_size, self.dtype)

    def init_cache(self, num_blocks: int, block_size: int, attention_backend: str = "auto",
                   cpu_graphs: bool = False) -> None:
        # The draft's one-token proposal steps are decode steps: CPU graphs replay them as the target's.
        self.runner = ModelRunner(self.model, self.config, num_blocks, block_size, self.dtype, self.device,
                                  attention_backend=attention_backend, use_cpu_graphs=cpu_graphs)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)

    def release(self, seq) -> None:
        state = self.states.pop(seq.seq_id, None)
        if state is not None:
            self.block_manager.free(state)

    def propose_all(self, wanted: list) -> list[list[int]]:
        proposals: list[list[int]] = [[] for _ in wanted]
        # First forward: each sequence's tokens the draft has not cached (at least its last one),
        # then the first proposal from its last row. A sequence whose catch-up does not fit the
        # step's token budget only advances its cache this step (a chunked prefill of the draft).
        budget = self.max_tokens_per_step
        first: list[tuple[int, DraftState, list[int], int]] = []  # (index in wanted, state, tokens, k)
        for i, (seq, k) in enumerate(wanted):
            state = self.states.setdefault(seq.seq_id, DraftState())
            # The fed proposals the target kept are final now; anything after them is recomputed.
            state.num_computed_tokens += accepted_prefix(state.fed, seq.token_ids[state.num_computed_tokens:])
            state.fed = []
            pending = seq.token_ids[state.num_computed_tokens:]
            k = min(k, self.max_len - seq.num_tokens)
            take = min(len(pending), budget)
            if take < len(pending):
                k, pending = 0, pending[:take]
            # Slots for the new tokens and the k - 1 proposals fed after them.
            if not pending or not self.block_manager.can_append(state, len(pending) + max(k - 1, 0)):
                continue
            self.block_manager.append_slots(state, len(pending) + max(k - 1, 0))
            budget -= len(pending)
            first.append((i, state, pending, k))
        if not first:
            return proposals
        first.sort(key=lambda e: len(e[2]) != 1)  # one-token queries first: the decode path's share
        proposing = [(i, state, k) for i, state, _, k in first if k > 0]
        tokens = self._forward([(state, pending) for _, state, pending, _ in first],
                               [len(pending) > 0 and k > 0 for _, _, pending, k in first])
        for _, state, pending, _ in first:
            state.num_computed_tokens += len(pending)
        for (i, _, _), token in zip(proposing, tokens):
            proposals[i].append(token)
        # Then one forward per further position, over the sequences that want that many.
        for j in range(1, max((k for _, _, k in proposing), default=0)):
            step = [(i, state) for i, state, k in proposing if k > j]
            tokens = self._forward([(state, [proposals[i][-1]]) for i, state in step], [True] * len(step))
            for (i, state), token in zip(step, tokens):
                state.fed.append(proposals[i][-1])
                proposals[i].append(token)
        return proposals

    def _forward(self, queries: list[tuple[DraftState, list[int]]], sampled: list[bool]) -> list[int]:
        """One draft forward: `queries` (one-token ones first) written after each state's cached
        tokens and fed proposals; the greedy next token after the last row of each `sampled` one."""
        token_ids, query_lens, context_lens, tables, rows = [], [], [], [], []
        for (state, tokens), wants in zip(queries, sampled):
            token_ids += tokens
            query_lens.append(len(tokens))
            context_lens.append(state.num_computed_tokens + len(state.fed))
            tables.append(list(state.block_table))
            if wants:
                rows.append(len(token_ids) - 1)
        num_decodes = next((n for n, q in enumerate(query_lens) if q != 1), len(query_lens))
        logits = self.runner.execute(ModelInput(token_ids, query_lens, context_lens, tables, num_decodes, rows))
        return logits[:, :self.vocab].argmax(dim=-1).tolist()

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks
