"""The CPU paged decode kernel (attention/cpu_decode_kernel.py) against the gather + SDPA path it
replaces (attention/reference.py, gather_decode_attention) and against the attention computed in
float64 from the same cache rows: random caches, shuffled block tables, GQA and MHA, a sliding
window, a softcap, sequences of very different lengths in one batch, positions on both sides of
block boundaries. float32 agrees to 1e-5; bf16 to within two bf16 roundings of the output (the
gather path rounds the softmax probabilities to bf16 before the value product, the kernel rounds
only its fp32 result)."""

from __future__ import annotations

import pytest
import torch

from lmserve.attention import Attention, cpu_decode_kernel
from lmserve.attention.kv_cache_dtype import FP8_KV_DTYPE
from lmserve.attention.reference import ReferenceBackend, _decode_groups, gather_decode_attention
from lmserve.model_input import ModelInput

pytestmark = pytest.mark.skipif(not cpu_decode_kernel.available(),
                                reason=f"kernel unavailable: {cpu_decode_kernel.unavailable_reason()}")

PAGE = 16
# Tokens attended per sequence: one token, a full block, one past it, two blocks and one past them,
# and long ones (the decode groups bucket these widths apart).
LENGTHS = [1, 16, 17, 32, 33, 100, 300, 7]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2 ** -7, atol=2 ** -7)}


def _case(hq: int, hkv: int, d: int, dtype: torch.dtype, lengths=LENGTHS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // PAGE) for n in lengths]
    blocks = sum(need) + 3
    free = torch.randperm(blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(n)] for n in need]
    k_cache, v_cache = (torch.randn(blocks, PAGE, hkv, d, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(len(lengths), hq, d, generator=g).to(dtype)
    return q, (k_cache, v_cache), tables


def _exact(q, kv_cache, tables, lengths, scale, window=None, softcap=None):
    """float64 attention of each sequence over its visible cache rows, written out."""
    k_cache, v_cache = kv_cache
    hq, hkv = q.shape[1], k_cache.shape[2]
    out = []
    for b, (table, n) in enumerate(zip(tables, lengths)):
        t = torch.arange(max(0, n - window) if window else 0, n)
        slots = torch.tensor(table)[t // PAGE] * PAGE + t % PAGE
        k = k_cache.flatten(0, 1)[slots].double().repeat_interleave(hq // hkv, dim=1)  # [S, Hq, D]
        v = v_cache.flatten(0, 1)[slots].double().repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("hd,shd->hs", q[b].double(), k) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        out.append(torch.einsum("hs,shd->hd", s.softmax(-1), v))
    return torch.stack(out)


def _kernel(q, kv_cache, tables, lengths, scale, window=None, softcap=None):
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return cpu_decode_kernel.paged_decode(q, *kv_cache, padded, torch.tensor(lengths), window, scale, softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hkv", "d", "window", "softcap"), [
    (9, 3, 64, None, None),  # SmolLM2's GQA
    (4, 4, 32, None, None),  # MHA
    (32, 8, 128, None, None),
    (8, 4, 64, 20, None),  # sliding window: starts inside a block for the longer sequences
    (8, 4, 64, None, 30.0),  # Gemma-2's softcap
    (8, 4, 64, 40, 50.0),
    (4, 2, 24, 8, 5.0),  # the tiny Gemma-2 of the family tests: a head of 24 values (masked loads)
    (6, 2, 16, None, None),
    (4, 1, 80, None, None),  # MQA, 80 values per head
])
def test_kernel_matches_the_gather_path_and_exact_attention(dtype, hq, hkv, d, window, softcap):
    q, kv_cache, tables = _case(hq, hkv, d, dtype)
    scale = d ** -0.5
    layer = Attention(hq, hkv, d, scale, sliding_window=window, softcap=softcap)
    positions = torch.tensor(LENGTHS) - 1
    groups = _decode_groups(tables, positions, dtype, PAGE)
    assert len(groups) > 1, "the lengths span several decode groups"
    gathered = gather_decode_attention(q, kv_cache, groups, layer)
    got = _kernel(q, kv_cache, tables, LENGTHS, scale, window, softcap)
    assert got.dtype == dtype and got.shape == q.shape
    # In bf16 the gather path's softcap works on bf16 scores (rounded after the product, the scale
    # and the tanh): further from exact than the kernel, so compared more loosely.
    loose = dtype == torch.bfloat16 and softcap is not None
    torch.testing.assert_close(got.float(), gathered.float(), **(dict(rtol=2 ** -5, atol=2 ** -5) if loose
                                                                 else TOL[dtype]))
    exact = _exact(q, kv_cache, tables, LENGTHS, scale, window, softcap)
    # The kernel's only bf16 rounding is its output's: within half a bf16 unit (2^-9 relative) of exact.
    torch.testing.assert_close(got.double(), exact, **(TOL[torch.float32] if dtype == torch.float32
                                                      else dict(rtol=2 ** -8, atol=2 ** -9)))


def _decode_step(backend_q, kv_cache, tables, dtype, layer):
    """One decode step through ReferenceBackend.forward: the new rows written, then attention."""
    hkv, d = kv_cache[0].shape[2:]
    g = torch.Generator().manual_seed(1)
    contexts = [n - 1 for n in LENGTHS]
    batch = ModelInput([0] * len(tables), [1] * len(tables), contexts, tables, len(tables), list(range(len(tables))))
    k, v = (torch.randn(len(tables), hkv, d, generator=g).to(dtype) for _ in range(2))
    backend = ReferenceBackend()
    meta = backend.build_metadata(batch, torch.tensor(contexts), PAGE, dtype)
    return backend.forward(layer, backend_q, k, v, kv_cache, meta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_step_with_the_kernel_disabled_gives_the_same_output(dtype, monkeypatch):
    """The kernel's step (the new keys and values written by paged_decode_write, then attended) against
    write_kv_cache's index_copy_ and the gather path: the same output and the same caches after."""
    q, kv_cache, tables = _case(9, 3, 64, dtype, seed=2)
    layer = Attention(9, 3, 64, 64 ** -0.5)
    fast_cache, slow_cache = (tuple(c.clone() for c in kv_cache) for _ in range(2))
    fast = _decode_step(q, fast_cache, tables, dtype, layer)
    # what LMSERVE_CPU_ATTENTION=torch does
    monkeypatch.setattr(cpu_decode_kernel._KERNEL, "_reason", "disabled by the test")
    assert not cpu_decode_kernel.covers(q, kv_cache[0])
    slow = _decode_step(q, slow_cache, tables, dtype, layer)
    torch.testing.assert_close(fast.float(), slow.float(), **TOL[dtype])
    assert all(torch.equal(a, b) for a, b in zip(fast_cache, slow_cache))
    assert not all(torch.equal(a, b) for a, b in zip(fast_cache, kv_cache)), "the step wrote its keys and values"


def test_switch_and_layers_the_kernel_leaves_to_the_gather_path(monkeypatch):
    monkeypatch.setenv(cpu_decode_kernel.ENV, "torch")
    assert cpu_decode_kernel._KERNEL._load() == "LMSERVE_CPU_ATTENTION=torch"
    q = torch.randn(2, 4, 64)
    cache = torch.zeros(4, PAGE, 2, 64)
    assert cpu_decode_kernel.covers(q, cache)
    assert not cpu_decode_kernel.covers(q, cache.to(FP8_KV_DTYPE)), "an fp8 cache is dequantized by the gather"
    assert not cpu_decode_kernel.covers(torch.randn(2, 4, 288), torch.zeros(4, PAGE, 2, 288)), "head size 288"
    assert not cpu_decode_kernel.covers(torch.randn(2, 34, 64), torch.zeros(4, PAGE, 2, 64)), "17 per kv head"


def test_bad_inputs_are_refused_with_the_reason():
    q, kv_cache, tables = _case(4, 2, 64, torch.float32, lengths=[20, 5])
    bad = [list(t) for t in tables]
    bad[0][1] = 10_000
    with pytest.raises(RuntimeError, match="sequence 0 block 1 is 10000, outside the cache"):
        _kernel(q, kv_cache, bad, [20, 5], 0.125)
    with pytest.raises(RuntimeError, match="sequence 1 has length 40"):
        _kernel(q, kv_cache, tables, [20, 40], 0.125)
    with pytest.raises(RuntimeError, match="share one dtype"):
        _kernel(q.bfloat16(), kv_cache, tables, [20, 5], 0.125)
    k, v = torch.zeros(2, 2, 64), torch.zeros(2, 2, 64)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    with pytest.raises(RuntimeError, match="slot 100000 is outside the cache"):
        cpu_decode_kernel.paged_decode_write(q, k, v, *kv_cache, torch.tensor([3, 100_000]), padded,
                                             torch.tensor([20, 5]), None, 0.125, None)
