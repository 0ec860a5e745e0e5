"""How well a model predicts a given text (perplexity): the quality check for quantized weights
and other numerics changes, run on the engine's own forward path. `perplexity` scores one short
text in one prefill on an idle engine; `llama_perplexity` scores a file of any length the way
llama.cpp's `llama-perplexity` does, through the engine's prompt logprobs (`lmserve perplexity`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmserve.model_input import ModelInput
from lmserve.sampling_params import SamplingParams


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


@dataclass
class ChunkedPerplexity:
    """llama.cpp's perplexity result: PPL over every scored token, its standard error, and the
    running estimate after each chunk (what `llama-perplexity` prints as [1]..,[2]..)."""

    ppl: float
    stderr: float
    tokens_scored: int
    ctx: int
    running: list[float]


def llama_perplexity(llm, token_ids: list[int], ctx: int, bos_id: int | None, max_chunks: int | None = None,
                     group: int = 8, on_chunk=None) -> ChunkedPerplexity:
    """Perplexity by `llama-perplexity`'s protocol, so the two numbers compare: the text's tokens in
    chunks of `ctx` (the tail that fills no whole chunk is dropped), the first token of each chunk
    replaced by BOS when the tokenizer adds one (`bos_id`), each chunk run on its own from an empty
    context, and only its second half scored (tokens ctx/2 + 1 .. ctx - 1: each has at least ctx/2
    tokens of context). The standard error is the NLL's standard error through exp, as llama.cpp
    reports it. The engine scores the chunks as prompt logprobs, `group` chunks batched at a time;
    `on_chunk(index, running_ppl)` follows the progress."""
    if ctx < 4:
        raise ValueError("ctx must be at least 4")
    if len(token_ids) < 2 * ctx:
        raise ValueError(f"the text has {len(token_ids)} tokens; a context of {ctx} needs at least {2 * ctx} "
                         "(as llama-perplexity requires)")
    n_chunks = len(token_ids) // ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    first = ctx // 2
    nll = nll2 = 0.0
    count = 0
    running = []
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    for g in range(0, n_chunks, group):
        chunks = []
        for i in range(g, min(g + group, n_chunks)):
            chunk = token_ids[i * ctx:(i + 1) * ctx]
            chunks.append(chunk if bos_id is None else [bos_id, *chunk[1:]])
        for out in llm.generate(chunks, params):
            for entry in out.prompt_logprobs[first + 1:]:
                nll += -entry.logprob
                nll2 += entry.logprob * entry.logprob
                count += 1
            running.append(math.exp(nll / count))
            if on_chunk is not None:
                on_chunk(len(running), running[-1])
    mean = nll / count
    var = nll2 / count - mean * mean
    stderr = math.sqrt(var / (count - 1)) * math.exp(mean) if var > 0 and count > 1 else 0.0
    return ChunkedPerplexity(math.exp(mean), stderr, count, ctx, running)


def tokenizer_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of a text (then llama.cpp's protocol does
    too), else None."""
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    if len(with_special) == len(plain) + 1 and with_special[1:] == plain:
        return with_special[0]
    return None
