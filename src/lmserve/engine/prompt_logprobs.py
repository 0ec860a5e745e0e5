"""Prompt logprobs: how likely the model found each prompt token, given the ones before it.

This is how text is scored (OpenAI's legacy `echo` + `logprobs`, vLLM's `prompt_logprobs`,
evaluation harnesses, perplexity). The numbers come out of the prefill the request runs anyway:
the row of prompt position q predicts token q + 1, so each prefill chunk scores the next chunk's
worth of prompt tokens. Nothing ever holds the `[prompt_len, vocab]` logits: per chunk, the LM head,
log-softmax, gather and top-k run over slices of `SLICE_ROWS` rows, and only the target's logprob
and the top k per row outlive a slice.

A request that asks for prompt logprobs reads nothing from the prefix cache until its scores are
complete (`Request.scoring_prompt`): a cached prefix has KV but no logits, and recomputing it is the
only way its positions get scores (vLLM does the same). It still writes its blocks to the cache.
A preempted request recomputes its prefill but scores only the positions it has not scored yet.

Scores are taken from the model's raw logits: temperature, penalties and other sampling settings
shape what is generated, not how the given text is scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmserve.outputs import TokenLogprob
from lmserve.staging import ints_to_device

if TYPE_CHECKING:
    from lmserve.engine.scheduler import ScheduledBatch
    from lmserve.engine.sequence import Request
    from lmserve.model_input import ModelInput

# Rows sent through the LM head at once when scoring: bounds the float32 logits a chunk of any
# length needs to SLICE_ROWS x vocab (a few of them: logits, log-softmax, top-k).
SLICE_ROWS = 128


@dataclass
class PromptScores:
    """Per scored row, on the CPU: the target token's logprob and the batch's top k."""

    logprobs: torch.Tensor  # [rows] float32
    ranks: torch.Tensor  # [rows] int64: 1 + how many tokens the model found likelier than the target
    top_ids: torch.Tensor  # [rows, k] int64
    top_logprobs: torch.Tensor  # [rows, k] float32


@dataclass
class ScorePlan:
    """Which rows of one step score which prompt tokens, and whose scores they are."""

    rows: list[int] = field(default_factory=list)  # flattened batch rows
    targets: list[int] = field(default_factory=list)  # the prompt token each row predicts
    top_k: int = 0  # the most alternatives any request in the step asked for
    spans: list[tuple[Request, int]] = field(default_factory=list)  # (request, rows of it), in row order


def plan_scores(batch: ScheduledBatch) -> ScorePlan | None:
    """The rows of this step that score prompt tokens (None: no request in it asks). Walks the
    sequences in the order `build_model_input` flattens them."""
    plan = ScorePlan()
    offset = 0
    for seq, n in [(s, 1) for s in batch.decodes] + batch.prefills:
        request = seq.request
        if seq.index == 0 and request.scoring_prompt:
            prompt = request.prompt_token_ids
            start = seq.num_computed_tokens
            # Position q's row scores token q + 1; tokens before len(prompt_logprobs) are done.
            first = max(start, len(request.prompt_logprobs) - 1)
            last = min(start + n, len(prompt) - 1)
            if last > first:
                plan.rows += range(offset + first - start, offset + last - start)
                plan.targets += prompt[first + 1:last + 1]
                plan.top_k = max(plan.top_k, request.params.prompt_logprobs)
                plan.spans.append((request, last - first))
        offset += n
    return plan if plan.spans else None


@torch.inference_mode()
def score_rows(model: torch.nn.Module, hidden: torch.Tensor, batch: ModelInput) -> PromptScores | None:
    """Log-softmax of the LM head's logits at `batch.score_rows`, gathered at `score_targets`,
    plus the top `score_top_k`; slice by slice, so memory stays bounded however long the chunk."""
    rows, targets = ints_to_device(hidden.device, batch.score_rows, batch.score_targets)
    k = batch.score_top_k
    logprobs, ranks, top_ids, top_logprobs = [], [], [], []
    for s in range(0, len(batch.score_rows), SLICE_ROWS):
        logits = model.compute_logits(hidden[rows[s:s + SLICE_ROWS]])
        if logits is None:
            continue  # a tensor-parallel worker: it took part in the gather, rank 0 scores
        logp = torch.log_softmax(logits.float(), dim=-1)
        own = logp.gather(1, targets[s:s + SLICE_ROWS].unsqueeze(1))
        logprobs.append(own.squeeze(1))
        ranks.append((logp > own).sum(dim=1) + 1)
        if k:
            values, ids = logp.topk(k, dim=-1)
            top_ids.append(ids)
            top_logprobs.append(values)
        del logp
    n = len(batch.score_rows)
    if not logprobs:
        return None  # a tensor-parallel worker's share
    return PromptScores(
        torch.cat(logprobs).cpu(), torch.cat(ranks).cpu(),
        torch.cat(top_ids).cpu() if k else torch.empty(n, 0, dtype=torch.int64),
        torch.cat(top_logprobs).cpu() if k else torch.empty(n, 0))


def execute(executor, batch: ScheduledBatch, model_input: ModelInput) -> torch.Tensor:
    """Run the step; when a request in it asks for prompt logprobs, also score its prompt rows and
    append them to the request. Returns the sampling logits, as `executor.execute` does."""
    plan = plan_scores(batch)
    if plan is None:
        return executor.execute(model_input)
    model_input.score_rows, model_input.score_targets, model_input.score_top_k = plan.rows, plan.targets, plan.top_k
    logits, scores = executor.execute_scored(model_input)
    record(plan, scores)
    return logits


def record(plan: ScorePlan, scores: PromptScores) -> None:
    logprobs = scores.logprobs.tolist()
    ranks = scores.ranks.tolist()
    top_ids = scores.top_ids.tolist()
    top_logprobs = scores.top_logprobs.tolist()
    row = 0
    for request, count in plan.spans:
        k = request.params.prompt_logprobs
        prompt = request.prompt_token_ids
        for _ in range(count):
            target = prompt[len(request.prompt_logprobs)]
            request.prompt_logprobs.append(
                TokenLogprob(target, logprobs[row], list(zip(top_ids[row][:k], top_logprobs[row][:k])), ranks[row]))
            row += 1


def take_finished(request: Request) -> list[TokenLogprob | None] | None:
    """The request's prompt logprobs once, in the first output after all are computed."""
    if request.prompt_logprobs is None or request.scoring_prompt or request.prompt_logprobs_emitted:
        return None
    request.prompt_logprobs_emitted = True
    return request.prompt_logprobs
