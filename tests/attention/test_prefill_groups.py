"""Prefill chunks of similar size attended in one call (attention/reference.py, PrefillGroup): the
same outputs as attending them one by one, and as attention computed exactly, for steps that mix
decode tokens, fresh prompts, chunks over a cached context and a sliding window."""

from __future__ import annotations

import pytest
import torch

from lmserve.attention import Attention
from lmserve.attention.reference import PrefillGroup, ReferenceBackend, ReferenceMetadata
from lmserve.model_input import ModelInput

PAGE = 4
# (context already cached, new tokens) per sequence; the first two decode. 5-7 new tokens attending
# 14-16 form one size class, the fresh prompts of 3-4 tokens another, 13 tokens over 2 are alone.
SEQUENCES = [(6, 1), (17, 1), (9, 5), (8, 7), (10, 6), (0, 3), (0, 4), (2, 13)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2 ** -7, atol=2 ** -7)}


def _step(dtype, window, per_chunk: bool, monkeypatch):
    g = torch.Generator().manual_seed(0)
    hq, hkv, d = 6, 2, 16
    layer = Attention(hq, hkv, d, d ** -0.5, sliding_window=window)
    free = torch.randperm(60, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-(c + n) // PAGE))] for c, n in SEQUENCES]
    contexts, lengths = [c for c, _ in SEQUENCES], [n for _, n in SEQUENCES]
    batch = ModelInput([0] * sum(lengths), lengths, contexts, tables, 2, list(range(len(SEQUENCES))))
    cache = tuple(torch.randn(60, PAGE, hkv, d, generator=g).to(dtype) for _ in range(2))
    tokens = sum(lengths)
    q, k, v = (torch.randn(tokens, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    backend = ReferenceBackend()
    meta = backend.build_metadata(batch, torch.tensor(batch.positions), PAGE, dtype)
    if per_chunk:
        monkeypatch.setattr(ReferenceMetadata, "prefill_plan", lambda self: list(range(len(self.prefills))))
    out = backend.forward(layer, q, k, v, cache, meta)
    return out, meta, (q, k, v, cache, tables, layer)


def _exact(q, k, v, cache, tables, layer):
    """Every token's attention in float64 over its sequence's cached context and its chunk so far."""
    out, row = [], 0
    hq, hkv = q.shape[1], k.shape[1]
    for (context, n), table in zip(SEQUENCES, tables):
        keys = torch.cat([cache[0][b] for b in table]).double()[:context]
        vals = torch.cat([cache[1][b] for b in table]).double()[:context]
        keys = torch.cat((keys, k[row:row + n].double())).repeat_interleave(hq // hkv, 1)
        vals = torch.cat((vals, v[row:row + n].double())).repeat_interleave(hq // hkv, 1)
        for i in range(n):
            pos = context + i
            first = 0 if layer.sliding_window is None else max(0, pos - layer.sliding_window + 1)
            scores = torch.einsum("hd,shd->hs", q[row + i].double(), keys[first:pos + 1]) * layer.scale
            out.append(torch.einsum("hs,shd->hd", scores.softmax(-1), vals[first:pos + 1]))
        row += n
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_grouped_prefill_matches_chunk_by_chunk_and_exact_attention(dtype, window, monkeypatch):
    grouped, meta, case = _step(dtype, window, False, monkeypatch)
    plan = meta.prefill_plan()
    groups = [item for item in plan if isinstance(item, PrefillGroup)]
    assert [g.chunks for g in groups] == [[0, 1, 2], [3, 4]] and 5 in plan, "two groups and one chunk alone"
    one_by_one, _, _ = _step(dtype, window, True, monkeypatch)
    torch.testing.assert_close(grouped.float(), one_by_one.float(), **TOL[dtype])
    torch.testing.assert_close(grouped.double(), _exact(*case), **TOL[dtype])
