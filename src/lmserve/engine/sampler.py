"""Batched sampling: penalties, temperature, top-k, top-p, min-p, seeds, logprobs.

Randomness is counter-based: the draw for a token is a hash of (the choice's stream key, its
output position, the token id), turned into an exponential race (argmax p / E with E ~ Exp(1),
which samples exactly from p). So a seeded request gets the same tokens whatever else is in the
batch, after preemption and recompute too, and the whole batch is sampled with tensor ops,
without a Python loop over rows or a generator object per request. Tokens a mask removed
(probability 0) can never win.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.engine.sequence import Sequence
from lmserve.outputs import TokenLogprob

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


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    grammar = None  # the engine's GrammarBackend, once a request asked for structured output
    eos_token_ids: list[int] = []  # the model's end tokens (set by the engine)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: [B, V], row i belongs to seqs[i] (a sequence may appear more than once when
        its n choices are sampled from one prefill)."""
        logits = logits.float()
        b, vocab = logits.shape
        device = logits.device
        params = [s.params for s in seqs]

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs]
        raw_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None

        if any(p.has_penalties for p in params):
            logits = self._apply_penalties(logits, seqs, vocab)
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
            tokens = self._sample_random(logits, seqs)
        else:
            tokens = torch.empty(b, dtype=torch.int64, device=device)
            tokens[greedy] = argmax_rows(logits[greedy])
            tokens[rand] = self._sample_random(logits[rand], [seqs[i] for i in rand])

        token_list = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * b
        if logprob_rows:
            max_top = max(params[i].top_logprobs for i in logprob_rows)
            chosen = raw_logprobs.gather(1, tokens[logprob_rows].unsqueeze(1)).squeeze(1).tolist()
            if max_top:
                top_vals, top_ids = raw_logprobs.topk(max_top, dim=-1)
                top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
            for j, i in enumerate(logprob_rows):
                k = params[i].top_logprobs
                top = list(zip(top_ids[j][:k], top_vals[j][:k])) if k else []
                logprobs[i] = TokenLogprob(token_list[i], chosen[j], top)
        return SamplerOutput(token_list, logprobs)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence], vocab: int) -> torch.Tensor:
        device = logits.device
        params = [s.params for s in seqs]
        outputs = [s.output_token_ids for s in seqs]
        width = max((len(o) for o in outputs), default=0)
        if width:
            # Pad with an extra "vocab" column that is dropped after counting.
            padded = torch.full((len(seqs), width), vocab, dtype=torch.int64, device=device)
            for i, o in enumerate(outputs):
                if o:
                    padded[i, :len(o)] = torch.tensor(o, dtype=torch.int64)
            counts = torch.zeros(len(seqs), vocab + 1, device=device).scatter_add_(
                1, padded, torch.ones_like(padded, dtype=torch.float32))[:, :vocab]
            freq = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
            pres = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
            logits = logits - freq * counts - pres * (counts > 0).float()
        if any(p.repetition_penalty != 1.0 for p in params):
            # transformers' rule over prompt and output: divide positive logits, multiply negative.
            seen = torch.zeros(len(seqs), vocab + 1, dtype=torch.bool, device=device)
            for i, s in enumerate(seqs):
                if params[i].repetition_penalty != 1.0:
                    seen[i, torch.tensor(s.token_ids, dtype=torch.int64, device=device)] = True
            seen = seen[:, :vocab]
            rep = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
            penalized = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalized, logits)
        return logits

    def _hold_end_tokens(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int],
                         vocab: int) -> torch.Tensor:
        """min_tokens: a sequence that has not reached it cannot pick an end token (EOS unless
        ignore_eos, or one of its stop_token_ids)."""
        logits = logits.clone()
        for i in rows:
            params = seqs[i].params
            ends = [t for t in (*([] if params.ignore_eos else self.eos_token_ids), *params.stop_token_ids)
                    if 0 <= t < vocab]
            if ends:
                logits[i, ends] = float("-inf")
        return logits

    @staticmethod
    def _sample_random(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device = logits.device
        params = [s.params for s in seqs]
        vocab = logits.shape[1]
        temps = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
        logits = logits / temps
        keys = torch.tensor([s.sampling_key for s in seqs], dtype=torch.int64, device=device)
        steps = torch.tensor([s.num_output_tokens for s in seqs], dtype=torch.int64, device=device)

        top_ks = [p.top_k for p in params]
        truncate = any(top_ks) or any(p.top_p < 1.0 or p.min_p > 0.0 for p in params)
        if not truncate:
            probs = torch.softmax(logits, dim=-1)
            exp_noise = exponential_noise(keys, steps, torch.arange(vocab, device=device))
            return argmax_rows(probs.div_(exp_noise))

        # Work on the candidates only: the top max(k) when every row has a top_k, else all, sorted.
        k_max = max(top_ks) if all(top_ks) else vocab
        if k_max < vocab:
            vals, ids = logits.topk(k_max, dim=-1)
        else:
            vals, ids = logits.sort(dim=-1, descending=True)
        col = torch.arange(vals.shape[1], device=device)
        if any(top_ks):
            k = torch.tensor([kk if kk else vals.shape[1] for kk in top_ks], device=device).unsqueeze(1)
            vals = vals.masked_fill(col >= k, float("-inf"))
        probs = torch.softmax(vals, dim=-1)
        top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
        min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
        # Nucleus: drop a token once the mass before it already reaches top_p (the best one stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop |= probs < min_p * probs[:, :1]
        vals = vals.masked_fill(drop, float("-inf"))
        probs = torch.softmax(vals, dim=-1)
        exp_noise = exponential_noise(keys, steps, ids)
        choice = argmax_rows(probs.div_(exp_noise)).unsqueeze(1)
        return ids.gather(1, choice).squeeze(1)
