"""Batched sampling: penalties, temperature, top-k, top-p, min-p, seeds, logprobs.

Randomness is counter-based: every draw is a hash of (the choice's stream key, its output
position[, the token id]), so a seeded request gets the same tokens whatever else is in the
batch, after preemption and recompute too, and the whole batch is sampled with tensor ops,
without a Python loop over rows or a generator object per request. Two exact ways to draw, by
what a row needs:
- temperature only: one uniform per row against the cumulative probabilities (inverse CDF);
- top-k / top-p / min-p: the candidates are cut first (a top-k of the logits, widened only when
  the nucleus is not inside it; never a sort of the vocabulary in the usual case), then an
  exponential race over them (argmax p / E with E ~ Exp(1) per token, exact for p).
Tokens a mask removed (probability 0) can never be drawn either way.

On an accelerator the step waits for the device once, when it reads the sampled ids (and the
logprobs, in the same transfer): the CPU's data-dependent shortcuts (a Python `if` on a tensor)
would each be one more wait, so there the same draws are made without them (`sync_free`), and
every small tensor built from Python values is sent from pinned host memory without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.engine.sequence import Sequence
from lmserve.outputs import TokenLogprob
from lmserve.staging import host_to_device

_MASK32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (lowbias32) on int64 tensors holding values < 2**32.
    int64 products wrap, and only the low 32 bits are kept, so the result is exact."""
    return _mix32_(x & _MASK32)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    # In place: the noise is [B, V] int64, and every fresh tensor of that size costs an mmap and
    # page faults, more than the arithmetic itself.
    x &= _MASK32
    x ^= x >> 16
    x *= 0x7FEB352D
    x &= _MASK32
    x ^= x >> 15
    x *= 0x846CA68B
    x &= _MASK32
    x ^= x >> 16
    return x


def mix32_int(x: int) -> int:
    """The same hash on a Python int (for stream keys computed once per sequence)."""
    return int(mix32(torch.tensor([x & _MASK32], dtype=torch.int64))[0])


def stream_key(seed: int, choice_index: int) -> int:
    seed_part = mix32_int(seed & _MASK32) ^ mix32_int((seed >> 32) + 0x632BE5AB)
    return mix32_int(seed_part ^ mix32_int(choice_index + 0x3C6EF372))


def exponential_noise(keys: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """keys, steps: [B]; token_ids: [B, K] or [K] -> Exp(1) draws, float32, one per (row, token).

    The log is taken in float64: a uniform near 1 rounded to float32 first would become exactly
    1.0, its exponential 0, and p / 0 a NaN (for a masked token, p = 0) or inf that wins the race
    (about one token in 2**24, i.e. every few hundred steps over a 49k vocabulary)."""
    row = mix32(keys ^ mix32(steps * 0x9E3779B9)).unsqueeze(1)
    x = _mix32_(row ^ mix32(token_ids + 0x85EBCA6B))
    x += row
    u = _mix32_(x).double()
    u += 0.5
    u /= 4294967296.0  # in (0, 1): never 0 or 1 in float64
    return u.log_().neg_().float()  # >= 1.2e-10, so p / E is never NaN


def sync_free(device: torch.device) -> bool:
    """Whether sampling on `device` must avoid reading tensors back mid-step. CPU tensors are
    already on the host, so the CPU keeps its data-dependent shortcuts; elsewhere every read
    would stall the host until the device has finished all the work queued before it."""
    return device.type != "cpu"


def _index(rows: list[int], device: torch.device) -> list[int] | torch.Tensor:
    """Row indices for advanced indexing: a list on CPU (as fast as it gets there), a device
    tensor elsewhere (a list index is copied to the device synchronously)."""
    return rows if device.type == "cpu" else host_to_device(rows, torch.int64, device)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for [B, V], same indices (first maximum; NaN counts as the maximum).

    torch's CPU argmax over a row is a scalar loop (about 2 ms for 32 x 49152 floats), while amax
    is vectorized: take each chunk's maximum, the first best chunk, then the first maximum inside
    it, about 10x faster at batch 32.
    """
    b, v = x.shape
    c = next((c for c in (256, 128, 512, 64) if v % c == 0 and v // c >= 2), None)
    if c is None or x.device.type != "cpu":
        return x.argmax(dim=-1)
    chunks = x.reshape(b, v // c, c)
    best = chunks.amax(dim=-1).argmax(dim=-1)
    return best * c + chunks[torch.arange(b, device=x.device), best].argmax(dim=-1)


def _plain_greedy(seq: Sequence) -> bool:
    """Greedy with nothing that edits the logits (penalties, held end tokens, a grammar) or reads
    them (logprobs)."""
    p = seq.params
    return (p.greedy and not p.logprobs and not p.has_penalties and seq.grammar is None
            and seq.num_output_tokens >= p.min_tokens)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    grammar = None  # the engine's GrammarBackend, once a request asked for structured output
    eos_token_ids: list[int] = []  # the model's end tokens (set by the engine)

    def __init__(self, sync_free: bool | None = None):
        # None: by the logits' device (`sync_free(device)`); tests force either path on CPU.
        self.sync_free = sync_free

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: [B, V], row i belongs to seqs[i] (a sequence may appear more than once when
        its n choices are sampled from one prefill)."""
        if logits.dtype != torch.float32 and all(_plain_greedy(s) for s in seqs):
            # Nothing edits or reports the logits: bf16/fp16 -> float32 is exact and keeps their order,
            # so the argmax of the logits as they are, without a float32 copy of [B, vocab].
            return SamplerOutput(argmax_rows(logits).tolist(), [None] * len(seqs))
        owned = logits.dtype != torch.float32  # .float() below makes a copy this call may edit
        logits = logits.float()
        b, vocab = logits.shape
        device = logits.device
        params = [s.params for s in seqs]
        no_sync = self.sync_free if self.sync_free is not None else sync_free(device)

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs]
        raw_logprobs = None
        if logprob_rows:
            raw_logprobs = torch.log_softmax(logits if len(logprob_rows) == b else logits[_index(logprob_rows, device)],
                                             dim=-1)

        if any(p.has_penalties for p in params):
            logits = self._apply_penalties(logits if owned else logits.clone(), seqs, vocab)
        young = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
        if young:
            logits = self._hold_end_tokens(logits, seqs, young, vocab)
        grammar_rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if grammar_rows:
            self.grammar.apply(logits, [seqs[i].grammar for i in grammar_rows], grammar_rows)

        greedy = [i for i, p in enumerate(params) if p.greedy]
        rand = [i for i, p in enumerate(params) if not p.greedy]
        # A batch of one kind (the usual case) skips copying its rows out of the [B, V] logits.
        if not rand:
            tokens = argmax_rows(logits)
        elif not greedy:
            tokens = self._sample_random(logits, seqs, no_sync)
        else:
            tokens = torch.empty(b, dtype=torch.int64, device=device)
            greedy_idx, rand_idx = _index(greedy, device), _index(rand, device)
            tokens[greedy_idx] = argmax_rows(logits[greedy_idx])
            tokens[rand_idx] = self._sample_random(logits[rand_idx], [seqs[i] for i in rand], no_sync)

        logprobs: list[TokenLogprob | None] = [None] * b
        if not logprob_rows:
            return SamplerOutput(tokens.tolist(), logprobs)
        # Everything the host needs in one transfer (one wait for the device): the ids, the chosen
        # logprobs and the top ones, as float64, which holds token ids and float32 values exactly.
        max_top = max(params[i].top_logprobs for i in logprob_rows)
        chosen = raw_logprobs.gather(1, (tokens if len(logprob_rows) == b
                                         else tokens[_index(logprob_rows, device)]).unsqueeze(1))
        parts = [tokens.double(), chosen.double().flatten()]
        if max_top:
            top_vals, top_ids = raw_logprobs.topk(max_top, dim=-1)
            parts += [top_vals.double().flatten(), top_ids.double().flatten()]
        host = torch.cat(parts).tolist()
        token_list = [int(t) for t in host[:b]]
        n = len(logprob_rows)
        chosen_list = host[b:b + n]
        vals_at, ids_at = b + n, b + n + n * max_top
        for j, i in enumerate(logprob_rows):
            k = params[i].top_logprobs
            row = j * max_top
            top = [(int(host[ids_at + row + c]), host[vals_at + row + c]) for c in range(k)]
            logprobs[i] = TokenLogprob(token_list[i], chosen_list[j], top)
        return SamplerOutput(token_list, logprobs)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence], vocab: int) -> torch.Tensor:
        """Penalties touch only the tokens a sequence has seen, in place: one scatter over
        (row, token) pairs instead of [B, V] count tensors (at batch 32 over a 49k vocabulary the
        dense version cost more than the rest of the sampler)."""
        flat = logits.view(-1)
        device = logits.device
        params = [s.params for s in seqs]
        # Frequency and presence: per output occurrence, l - freq * count - presence.
        ids, counts = _seen(seqs, vocab, lambda p: p.frequency_penalty != 0.0 or p.presence_penalty != 0.0,
                            lambda s: s.output_token_ids, device)
        if ids is not None:
            rows = ids // vocab
            freq = host_to_device([p.frequency_penalty for p in params], torch.float32, device)[rows]
            pres = host_to_device([p.presence_penalty for p in params], torch.float32, device)[rows]
            flat[ids] = flat[ids] - freq * counts - pres
        # Repetition (transformers' rule over prompt and output): divide positive logits,
        # multiply negative ones.
        ids, _ = _seen(seqs, vocab, lambda p: p.repetition_penalty != 1.0, lambda s: s.token_ids, device)
        if ids is not None:
            rep = host_to_device([p.repetition_penalty for p in params], torch.float32, device)[ids // vocab]
            vals = flat[ids]
            flat[ids] = torch.where(vals > 0, vals / rep, vals * rep)
        return logits

    def _hold_end_tokens(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int],
                         vocab: int) -> torch.Tensor:
        """min_tokens: a sequence that has not reached it cannot pick an end token (EOS unless
        ignore_eos, or one of its stop_token_ids)."""
        logits = logits.clone()
        flat = []  # row * vocab + token, so every row is masked by one indexed write
        for i in rows:
            params = seqs[i].params
            flat += [i * vocab + t for t in (*([] if params.ignore_eos else self.eos_token_ids),
                                             *params.stop_token_ids) if 0 <= t < vocab]
        if flat:
            # index_fill_, not `x[idx] = -inf`: an indexed write of a Python number copies it to
            # the device from pageable memory, which waits for the device (a second sync a step).
            logits.view(-1).index_fill_(0, host_to_device(flat, torch.int64, logits.device), float("-inf"))
        return logits

    @staticmethod
    def _sample_random(logits: torch.Tensor, seqs: list[Sequence], no_sync: bool = False) -> torch.Tensor:
        device = logits.device
        params = [s.params for s in seqs]
        temps = host_to_device([p.temperature for p in params], torch.float32, device).unsqueeze(1)
        keys = host_to_device([s.sampling_key for s in seqs], torch.int64, device)
        steps = host_to_device([s.num_output_tokens for s in seqs], torch.int64, device)
        truncated = [i for i, p in enumerate(params) if p.top_k or p.top_p < 1.0 or p.min_p > 0.0]
        if not truncated:
            return sample_inverse_cdf(torch.softmax(logits / temps, dim=-1), row_uniforms(keys, steps), no_sync)
        if len(truncated) == len(seqs):
            return _sample_truncated(logits, temps, params, keys, steps, no_sync)
        # A mixed batch: the rows without truncation sample from the whole vocabulary.
        kept = set(truncated)
        plain = _index([i for i in range(len(seqs)) if i not in kept], device)
        cut = _index(truncated, device)
        tokens = torch.empty(len(seqs), dtype=torch.int64, device=device)
        tokens[plain] = sample_inverse_cdf(torch.softmax(logits[plain] / temps[plain], dim=-1),
                                           row_uniforms(keys[plain], steps[plain]), no_sync)
        tokens[cut] = _sample_truncated(logits[cut], temps[cut], [params[i] for i in truncated],
                                        keys[cut], steps[cut], no_sync)
        return tokens


def _seen(seqs: list[Sequence], vocab: int, wanted, tokens_of,
          device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The distinct (row, token) pairs of the rows `wanted` selects, as flat indices
    row * vocab + token into [B, V] logits, with how often each occurs (float); (None, None)
    when there are none. Token ids past the LM head (special tokens of a prompt) are skipped."""
    parts = []
    for i, s in enumerate(seqs):
        if wanted(s.params):
            toks = torch.tensor(tokens_of(s), dtype=torch.int64)
            parts.append(toks[toks < vocab] + i * vocab)
    flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    if not len(flat):
        return None, None
    ids, counts = torch.unique(flat, return_counts=True)
    if device.type == "cpu":
        return ids, counts.float()
    both = host_to_device(torch.stack([ids, counts]), torch.int64, device)  # one copy, not two
    return both[0], both[1].float()


def row_uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One draw in (0, 1) per row, float64, from (stream key, output position)."""
    x = mix32(mix32(keys ^ mix32(steps * 0x9E3779B9)) + 0x27D4EB2F)
    return (x.double() + 0.5) / 4294967296.0


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor, no_sync: bool = False) -> torch.Tensor:
    """Exact sampling from each row of probs [B, V] with one uniform per row: the first token
    whose cumulative probability passes u * total. A token of probability 0 adds nothing to the
    running sum, so it can never be the first to pass (the earlier token with the same sum
    passes before it). One cumulative sum over the vocabulary costs ~20x less than drawing a
    race variable per token, which is what a temperature-only request would otherwise need."""
    cdf = probs.cumsum(dim=-1)
    target = (uniforms * cdf[:, -1].double()).float().unsqueeze(1)
    chosen = torch.searchsorted(cdf, target, right=True).squeeze(1)
    past = chosen >= probs.shape[1]
    if no_sync:  # the same fallback for every row, kept only where the target ran past the end
        last = (probs > 0).cumsum(dim=-1, dtype=torch.int32).argmax(dim=-1)
        return torch.where(past, last, chosen)
    if bool(past.any()):  # rounding put the target at a row's very end: its last possible token
        rows = past.nonzero().squeeze(1)
        chosen[rows] = (probs[rows] > 0).cumsum(dim=-1).argmax(dim=-1)
    return chosen


# Candidate widths tried for nucleus / min-p rows before sorting the whole vocabulary: a real
# model's top 64 tokens almost always hold the top_p mass; the full sort is ~100x dearer.
_CANDIDATE_WIDTHS = (64, 1024)


def _sample_truncated(logits: torch.Tensor, temps: torch.Tensor, params: list, keys: torch.Tensor,
                      steps: torch.Tensor, no_sync: bool = False) -> torch.Tensor:
    """top-k, then top-p over what is left (renormalized, as transformers' warpers), then min-p,
    then the exponential race over the kept candidates only. A temperature does not reorder a
    row, so the candidates are cut from the raw logits and only they are divided by it.

    The winner does not depend on how many candidates were cut (the race's noise is a function
    of the token id, its weights need no sum over the row), which is what lets `no_sync` skip
    the check whether a width was enough: a batch of top_k rows takes the width the check would
    accept first, any other batch the whole vocabulary (one sort, cheap on a GPU)."""
    device = logits.device
    vocab = logits.shape[1]
    top_ks = [p.top_k for p in params]
    k = host_to_device([kk or vocab for kk in top_ks], torch.int64, device).unsqueeze(1)
    top_p = host_to_device([p.top_p for p in params], torch.float32, device).unsqueeze(1)
    min_p = host_to_device([p.min_p for p in params], torch.float32, device).unsqueeze(1)
    has_k = k < vocab
    # Rows without top_k measure top_p against the whole vocabulary's probabilities.
    log_total = None if all(top_ks) else (logits / temps).logsumexp(dim=-1, keepdim=True)

    def candidates(width: int):
        vals, ids = logits.topk(width, dim=-1) if width < vocab else logits.sort(dim=-1, descending=True)
        vals = vals / temps
        col = torch.arange(vals.shape[1], device=device)
        vals = vals.masked_fill(col >= k, float("-inf"))
        probs = torch.softmax(vals, dim=-1)
        if log_total is not None:
            probs = torch.where(has_k, probs, (vals - log_total).exp())
        return vals, ids, probs

    k_max = max(top_ks)  # every width holds each top_k row's k candidates
    widths = (*(w for w in _CANDIDATE_WIDTHS if w > k_max), vocab)
    if no_sync:
        widths = widths[:1] if all(top_ks) else (vocab,)
    for width in widths:
        vals, ids, probs = candidates(min(max(width, k_max), vocab))
        if vals.shape[1] == vocab or no_sync:
            break
        # Wide enough when every row's kept set must lie inside: top_k rows always; otherwise
        # the candidates already hold the top_p mass, or their last one is below min_p's cut.
        enough = has_k | ((top_p < 1.0) & (probs.sum(dim=-1, keepdim=True) >= top_p))
        enough |= (min_p > 0.0) & (probs[:, -1:] < min_p * probs[:, :1])
        if bool(enough.all()):
            break
    # Nucleus: drop a token once the mass before it already reaches top_p (the best one stays).
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
    drop |= probs < min_p * probs[:, :1]
    # The race needs weights only up to a per-row factor: exp(v - best) of the kept candidates,
    # with no sum over the row, so the draw does not depend on how wide the candidate set was.
    weights = (vals - vals[:, :1]).exp().masked_fill_(drop, 0.0)
    choice = argmax_rows(weights.div_(exponential_noise(keys, steps, ids))).unsqueeze(1)
    return ids.gather(1, choice).squeeze(1)
