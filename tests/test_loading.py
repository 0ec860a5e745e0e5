"""Checkpoint loading fails clearly, naming the file and the problem."""

from __future__ import annotations

import json

import pytest
import torch

from lmserve.device import choose_dtype
from lmserve.engine.llm_engine import LLMEngine
from lmserve.models.loader import CheckpointError


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        LLMEngine(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        LLMEngine(str(tmp_path))


def test_malformed_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="broken.gguf"):
        LLMEngine(str(bad))


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"1234")
    with pytest.raises(CheckpointError, match="not a GGUF"):
        LLMEngine(str(f))


def _tiny_config(tmp_path, **extra):
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64,
           "max_position_embeddings": 128, **extra}
    (tmp_path / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import save_file

    _tiny_config(tmp_path)
    save_file({"model.embed_tokens.weight": torch.zeros(64, 32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors for: .*layers.0"):
        LLMEngine(str(tmp_path))


def test_corrupt_safetensors_is_named(tmp_path):
    _tiny_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLMEngine(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    _tiny_config(tmp_path, architectures=["MambaForCausalLM"])
    with pytest.raises(CheckpointError, match="MambaForCausalLM"):
        LLMEngine(str(tmp_path))


def test_dtype_choice():
    assert choose_dtype("float32", torch.device("cpu")) == torch.float32
    assert choose_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        choose_dtype("int8", torch.device("cpu"))


def test_default_cpu_threads_are_the_physical_cores_this_process_may_use():
    import os
    import subprocess
    import sys

    from lmserve.device import physical_cores

    cores = physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    # Against lscpu's own view of the same CPUs: distinct (socket, core) pairs.
    allowed = os.sched_getaffinity(0)
    rows = [line.split(",") for line in subprocess.run(["lscpu", "-p=CPU,CORE,SOCKET"], capture_output=True,
                                                       text=True, check=True).stdout.splitlines()
            if not line.startswith("#")]
    assert cores == len({(core, socket) for cpu, core, socket in rows if int(cpu) in allowed})
    # Set in a fresh process, as the server does before its engines start.
    code = "import torch; from lmserve.device import set_cpu_threads; n = set_cpu_threads(None); " \
           "print(n, torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(cores)] * 2
