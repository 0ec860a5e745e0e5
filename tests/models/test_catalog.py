"""The model catalog: every id of the platform, its family, and the start-up check that a
catalog id is served by weights of its family."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from lmserve.models.catalog import CATALOG, check_weights, lookup
from lmserve.models.registry import supported_architectures


def test_catalog_has_every_platform_id():
    assert len(CATALOG) == 42
    assert len([i for i in CATALOG if i.startswith("Pro/")]) == 11
    vendor = [e for e in CATALOG.values() if e.upstream]
    assert {e.id for e in vendor} == {"Vendor-A/Qwen/Qwen2-72B-Instruct", "Vendor-A/Qwen/Qwen2.5-72B-Instruct"}
    pro = lookup("Pro/THUDM/glm-4-9b-chat")
    assert pro.weights_id == "THUDM/glm-4-9b-chat" and pro.tier == "pro" and pro.family == "chatglm"
    assert lookup("Qwen/Qwen2.5-72B-Instruct-128K").context_length == 131072


def test_every_family_of_the_catalog_that_is_built_is_registered():
    families = {a for e in CATALOG.values() for a in e.architectures}
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma2ForCausalLM"):
        assert arch in families and arch in supported_architectures()


def test_weights_of_another_family_are_refused():
    check_weights("google/gemma-2-9b-it", "Gemma2ForCausalLM")
    check_weights("my-own-model", "LlamaForCausalLM")  # not a catalog id: anything goes
    with pytest.raises(ValueError, match="gemma2 model .*Qwen2ForCausalLM"):
        check_weights("google/gemma-2-9b-it", "Qwen2ForCausalLM")


def test_serve_refuses_a_catalog_id_on_the_wrong_weights_before_loading(tmp_path):
    cfg = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # no weights: the check comes first
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "lmserve", "serve", "--host", "127.0.0.1", "--port", str(port),
                           "--model", f"google/gemma-2-9b-it={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "gemma2 model" in proc.stderr and "Qwen2ForCausalLM" in proc.stderr, proc.stderr
