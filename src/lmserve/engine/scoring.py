"""How well a model predicts a given text (perplexity): the quality check for quantized weights
and other numerics changes, run on the engine's own forward path."""

from __future__ import annotations

import math

import torch

from lmserve.engine.batch import ModelInput


def perplexity(engine, token_ids: list[int]) -> float:
    """exp(mean negative log-likelihood of each token given the ones before it), in one prefill.

    Runs on an idle engine: the text's KV goes into blocks that are free and hold no cached
    prefix, so nothing a request or the prefix cache owns is touched.
    """
    if engine.has_unfinished():
        raise RuntimeError("perplexity needs an idle engine")
    bs = engine.block_manager.block_size
    needed = -(-len(token_ids) // bs)
    free = list(engine.block_manager.free_blocks)
    if len(token_ids) < 2 or needed > len(free) or len(token_ids) > engine.max_model_len:
        raise ValueError(f"a text of {len(token_ids)} tokens does not fit this engine's free cache or context")
    batch = ModelInput(list(token_ids), [len(token_ids)], [0], [free[:needed]], num_decodes=0,
                       logit_rows=list(range(len(token_ids) - 1)))
    logits = engine.executor.execute(batch).float()
    targets = torch.tensor(token_ids[1:], device=logits.device).unsqueeze(1)
    nll = -torch.log_softmax(logits, dim=-1).gather(1, targets).mean()
    return math.exp(float(nll))
