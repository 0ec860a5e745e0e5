"""The fused-kernel switch (layers/fused.py): LMSERVE_FUSED_OPS=0, or a Triton that cannot load,
leaves every layer on its PyTorch ops (with one warning for the second), and the model then gives
the reference tokens. On CPU tensors the fused path is never taken; the kernels themselves are
held to the PyTorch ops in tests/layers/test_triton_ops.py (CPU, interpreted) and
tests/support/cuda_engine_checks.py."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from lmserve.layers import fused


@pytest.fixture
def fresh_switch():
    fused._triton_ops.cache_clear()  # read once per process: each case reads it anew
    yield
    fused._triton_ops.cache_clear()


def test_env_switch_turns_the_kernels_off(fresh_switch, monkeypatch):
    monkeypatch.setenv("LMSERVE_FUSED_OPS", "0")
    imported = []
    real_import = importlib.import_module
    monkeypatch.setattr(fused.importlib, "import_module", lambda name: imported.append(name) or real_import(name))
    assert fused._triton_ops() is None
    assert imported == [], "the kernels module was imported although switched off"
    assert not fused.use_fused(torch.zeros(2))


def test_triton_that_cannot_load_falls_back_with_one_warning(fresh_switch, monkeypatch, caplog):
    monkeypatch.delenv("LMSERVE_FUSED_OPS", raising=False)

    def no_triton(name):
        raise ImportError(f"No module named 'triton' (while importing {name})")

    monkeypatch.setattr(fused.importlib, "import_module", no_triton)
    with caplog.at_level(logging.WARNING, logger=fused.log.name):
        assert fused._triton_ops() is None
        assert fused._triton_ops() is None  # cached: asked once
    warnings = [r for r in caplog.records if "fused Triton kernels unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "ImportError" in warnings[0].getMessage()


def test_cpu_tensors_never_take_the_fused_path(fresh_switch, monkeypatch):
    monkeypatch.delenv("LMSERVE_FUSED_OPS", raising=False)
    assert not fused.use_fused(torch.zeros(4, 8))


def test_model_with_the_kernels_switched_off_gives_the_reference_tokens(fresh_switch, monkeypatch, smollm, hf_smollm):
    from lmserve import SamplingParams
    from tests.conftest import chat_ids

    monkeypatch.setenv("LMSERVE_FUSED_OPS", "0")
    ids = chat_ids(smollm, "Name three primary colors.")
    out = smollm.generate([ids], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    with torch.inference_mode():
        ref = hf_smollm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert len(ref) >= 4 and out.outputs[0].token_ids[:len(ref)] == ref  # transformers stops at EOS
