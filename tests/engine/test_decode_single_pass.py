"""Decode attention in one pass while every context is short (no split keys, no merge launch):
the Triton backend's choice of key splits, and the engine on the tiny Llama through the CUDA-graph
path's static buffers (no capture on CPU, under Triton's interpreter) in both modes, against the
reference backend."""

from __future__ import annotations

import torch

from lmserve.attention import triton_backend
from lmserve.attention.spec import KVCacheSpec, MLAKVCacheSpec
from lmserve.attention.triton_backend import SINGLE_PASS_MAX_KEYS, TritonPagedBackend
from lmserve.model_input import ModelInput


def _decode_batch(contexts: list[int], page: int = 16) -> ModelInput:
    tables = [list(range(-(-(c + 1) // page))) for c in contexts]
    return ModelInput([0] * len(contexts), [1] * len(contexts), contexts, tables, len(contexts),
                      list(range(len(contexts))))


def _splits(backend: TritonPagedBackend, contexts: list[int]) -> int:
    batch = _decode_batch(contexts)
    return backend.build_metadata(batch, torch.tensor(batch.positions), 16, torch.float32).num_splits


def test_one_pass_while_every_context_fits(monkeypatch):
    cpu = torch.device("cpu")
    backend = TritonPagedBackend([KVCacheSpec(8, 128)], cpu, num_sms=132)
    assert _splits(backend, [SINGLE_PASS_MAX_KEYS - 1]) == 1  # the step's own token makes it fit exactly
    assert _splits(backend, [3, SINGLE_PASS_MAX_KEYS]) == 16, "one long sequence: the batch splits"
    assert _splits(backend, [5000] * 4) == 8
    # MLA's kernel runs one program per sequence: it keeps its splits.
    assert _splits(TritonPagedBackend([MLAKVCacheSpec(512, 64)], cpu, num_sms=132), [100]) == 16
    monkeypatch.setenv("LMSERVE_DECODE_SINGLE_PASS_KEYS", "0")
    assert _splits(TritonPagedBackend([KVCacheSpec(8, 128)], cpu, num_sms=132), [10]) == 16


STEPS = 6


def test_engine_one_pass_and_split_decode_match_reference(tmp_path, monkeypatch):
    """The graphs' padded decode path with 4 key splits wherever the batch would split (on CPU
    the backend sees one multiprocessor and would never split), in one pass (the default: these
    contexts are short) and always split (LMSERVE_DECODE_SINGLE_PASS_KEYS=0): the same greedy
    tokens and logits as the reference backend, and each took the path it should."""
    from tests.support.family_checkpoints import assert_same_greedy_run, build_llama, serve_waves_greedy

    build_llama(tmp_path)
    _, reference = serve_waves_greedy(tmp_path, STEPS, attention_backend="reference")
    monkeypatch.setattr(triton_backend, "choose_num_splits", lambda *args: 4)
    used = []
    original = triton_backend.paged_attention
    monkeypatch.setattr(triton_backend, "paged_attention",
                        lambda *a: used.append((a[9], a[13])) or original(*a))  # (block_q, num_splits)
    for override, expected in ((None, {1}), ("0", {4})):
        if override is not None:
            monkeypatch.setenv("LMSERVE_DECODE_SINGLE_PASS_KEYS", override)
        used.clear()
        engine, got = serve_waves_greedy(tmp_path, STEPS, attention_backend="triton", cuda_graphs=True)
        assert engine.runner.graphs is not None and engine.runner.graphs.steps > 0
        assert {splits for block_q, splits in used if block_q == 1} == expected
        assert_same_greedy_run(reference, got, STEPS)
