"""The step's work for the model runner as plain data (lmserve/model_input.py's `ModelInput`).

The scheduler works with live `Sequence` objects (tokenizer state, grammar matcher, request);
the runner gets only lists of ints, so a model worker in another process (tensor parallelism)
can receive a step, and the runner never sees anything request-shaped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmserve.model_input import ModelInput

if TYPE_CHECKING:
    from lmserve.engine.scheduler import ScheduledBatch


def build_model_input(batch: ScheduledBatch, logit_seq_ids: list[int],
                      spec_lens: dict[int, int] | None = None) -> ModelInput:
    """Flatten a scheduled batch. `logit_seq_ids` lists the sequences to sample, in order (an id
    may repeat: the n choices of one prompt sample from one row). A sequence verifying s
    proposed tokens (`spec_lens`, speculative decoding) runs them after its last token and gets
    s + 1 logit rows, one per position, where its id appears."""
    spec_lens = spec_lens or {}
    token_ids: list[int] = []
    query_lens: list[int] = []
    context_lens: list[int] = []
    block_tables: list[list[int]] = []
    last_row: dict[int, int] = {}
    for seq, n in [(s, 1) for s in batch.decodes] + batch.prefills:
        start = seq.num_computed_tokens
        token_ids += seq.token_ids[start:start + n]
        if start + n > seq.num_tokens:  # the proposed tokens follow the real ones
            token_ids += seq.spec_token_ids[:start + n - seq.num_tokens]
        query_lens.append(n)
        context_lens.append(start)
        block_tables.append(list(seq.block_table))
        last_row[seq.seq_id] = len(token_ids) - 1
    rows = [r for i in logit_seq_ids for r in range(last_row[i] - spec_lens.get(i, 0), last_row[i] + 1)]
    return ModelInput(token_ids, query_lens, context_lens, block_tables, len(batch.decodes), rows,
                      list(batch.block_copies))
