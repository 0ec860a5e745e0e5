"""Every attention backend behind the one interface (attention/backend.py): the capability the
runner reads instead of the backend's class, the one KV-spec base every layer kind's spec shares,
and the compiled decode's backend against the reference on a real decode batch (its custom op
runs eagerly here, the same op the compiled graph calls)."""

from __future__ import annotations

import pytest
import torch

from lmserve.attention import Attention, AttentionBackend, KVCacheSpec, KVSpec, MLAKVCacheSpec
from lmserve.attention.compiled_decode_backend import CompiledDecodeBackend
from lmserve.attention.reference import ReferenceBackend
from lmserve.attention.selector import get_attention_backend
from lmserve.model_input import ModelInput

PAGE = 4


def test_every_backend_implements_the_interface_and_declares_its_capability():
    pytest.importorskip("triton")
    from lmserve.attention.triton_backend import TritonPagedBackend

    cpu = torch.device("cpu")
    specs = [KVCacheSpec(2, 16), MLAKVCacheSpec(16, 8)]
    triton = get_attention_backend(cpu, specs, "triton")
    backends = [get_attention_backend(cpu, specs, "reference"), triton, CompiledDecodeBackend()]
    assert [type(b) for b in backends] == [ReferenceBackend, TritonPagedBackend, CompiledDecodeBackend]
    assert all(isinstance(b, AttentionBackend) for b in backends)
    assert [b.supports_cuda_graphs for b in backends] == [False, True, False]
    assert all(isinstance(s, KVSpec) for s in specs)
    assert [s.num_kv_heads for s in specs] == [2, 1]  # an MLA latent is one "KV head" for every query head
    assert triton.num_kv_heads == 2 and triton.mla


def test_compiled_decode_backend_matches_the_reference_on_a_decode_batch():
    g = torch.Generator().manual_seed(0)
    layer = Attention(6, 2, 16, 16**-0.5)
    contexts = [3, 9, 17]  # tables of 1, 3 and 5 pages: padded to one width
    free = torch.randperm(40, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-(c + 1) // PAGE))] for c in contexts]
    batch = ModelInput([0] * len(contexts), [1] * len(contexts), contexts, tables, len(contexts),
                       list(range(len(contexts))))
    cache = [torch.randn(40, PAGE, 2, 16, generator=g) for _ in range(2)]
    q, k, v = (torch.randn(len(contexts), h, 16, generator=g) for h in (6, 2, 2))
    positions = torch.tensor(batch.positions)
    outs, caches = [], []
    for backend in (ReferenceBackend(), CompiledDecodeBackend()):
        kv = tuple(c.clone() for c in cache)
        meta = backend.build_metadata(batch, positions, PAGE, torch.float32)
        outs.append(backend.forward(layer, q, k, v, kv, meta))
        caches.append(kv)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for ref, got in zip(*caches):
        assert torch.equal(ref, got), "both backends write the same slots"
    with pytest.raises(ValueError, match="decode-only"):
        CompiledDecodeBackend().build_metadata(ModelInput([0, 0], [2], [0], [[1]], 0, [1]), torch.tensor([0, 1]),
                                               PAGE, torch.float32)
