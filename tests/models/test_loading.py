"""Checkpoint loading fails clearly, naming the file and the problem."""

from __future__ import annotations

import json

import pytest
import torch

from lmserve.device import choose_dtype
from lmserve.engine.llm_engine import LLMEngine
from lmserve.models.loader import CheckpointError
from tests.support.family_checkpoints import FAMILIES


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


def _dummy_run(path, **options):
    """Greedy tokens of two prompts and every logits row the sampler saw."""
    from lmserve import SamplingParams

    engine = LLMEngine(str(path), dtype="float32", load_format="dummy", num_kv_blocks=32, block_size=4, **options)
    rows = []
    sampler = engine.sampler
    engine.sampler = lambda logits, seqs: (rows.append(logits.clone()), sampler(logits, seqs))[1]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.add_request("a", [5, 6, 7, 8, 9, 10, 11], params)
    engine.add_request("b", [3, 4], params)
    tokens = {"a": [], "b": []}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].token_ids
    return engine, tokens, torch.cat(rows)


def test_dummy_load_format_builds_from_config_json_alone(tmp_path):
    """vLLM's `load_format="dummy"`: no weight file, no tokenizer; random weights, the same on
    every load, drawn so the logits are finite and spread; token-id prompts only."""
    import gc

    from lmserve.errors import InvalidParameter
    from lmserve.models.loader import load_model, read_config, resolve_checkpoint

    _tiny_config(tmp_path, tie_word_embeddings=False)
    engine, tokens, logits = _dummy_run(tmp_path)
    assert engine.tokenizer is None and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert torch.isfinite(logits).all() and logits.std() > 0.01
    assert len(tokens["a"]) == len(tokens["b"]) == 6 and len(set(tokens["a"] + tokens["b"])) > 2
    with pytest.raises(InvalidParameter, match="no tokenizer"):
        engine.add_request("text", "hello", None)
    del engine
    gc.collect()  # the next engine loads afresh (engines of one checkpoint share live weights)
    again, tokens_again, logits_again = _dummy_run(tmp_path)
    assert tokens_again == tokens and torch.equal(logits_again, logits)
    # The same draw every time, and nothing like an unset buffer: norms at 1, biases at 0.
    ckpt = resolve_checkpoint(str(tmp_path))
    first, second = (load_model(ckpt, read_config(ckpt), torch.float32, torch.device("cpu"), load_format="dummy")
                     for _ in range(2))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert (first.norm.weight == 1).all() and abs(float(first.lm_head.weight.std()) - 0.02) < 0.002
    del again

    # Quantized layers are built from the drawn weights as from loaded ones.
    quantized, q_tokens, q_logits = _dummy_run(tmp_path, quantization="int8")
    assert torch.isfinite(q_logits).all() and len(q_tokens["a"]) == 6
    with pytest.raises(ValueError, match="load_format must be one of auto, dummy; got 'random'"):
        LLMEngine(str(tmp_path), load_format="random")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name in ("llama", "gemma2", "qwen2-moe", "deepseek-v2",
                                                                     "telechat2", "chatglm", "qwen2-yarn")],
                         ids=lambda f: f.name)
def test_parameters_are_created_in_the_compute_dtype(family, tmp_path):
    """A bf16 load never holds a float32 copy of the weights (an 8B model would need 32 GB for a
    moment): every parameter is registered in bf16. The model is the one a float32 build cast to
    bf16 gives, buffers included (the rope tables are computed in float32 either way), and
    torch's process-wide default dtype is back to float32 afterwards."""
    from lmserve.models.loader import load_model, read_config, resolve_checkpoint
    from lmserve.models.registry import get_model_class

    built = family.build(tmp_path)
    path = built[1] if isinstance(built, tuple) else tmp_path
    ckpt = resolve_checkpoint(str(path))
    config = read_config(ckpt)
    registered = []
    hook = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, param: registered.append((name, param.dtype)))
    try:
        model = load_model(ckpt, config, torch.bfloat16, torch.device("cpu"))
    finally:
        hook.remove()
    assert torch.get_default_dtype() == torch.float32
    floating = [(name, dt) for name, dt in registered if dt.is_floating_point]
    assert floating and all(dt == torch.bfloat16 for _, dt in floating), floating
    reference = get_model_class(config.architecture)(config, torch.bfloat16).to(torch.bfloat16)
    for name, buffer in reference.named_buffers():
        assert torch.equal(buffer, model.get_buffer(name)), name


def test_truncated_gguf_is_named_as_such(tmp_path):
    """A cut-off GGUF (an interrupted download), whether it ends inside the metadata or inside the
    tensor data, is reported as truncated, not as a reshape error from deep inside the reader."""
    from tests.support.family_checkpoints import build_qwen2_gguf

    build_qwen2_gguf(tmp_path)
    whole = next(tmp_path.rglob("*.gguf")).read_bytes()
    for cut in (100, 5000, len(whole) // 2, len(whole) - 10):
        part = tmp_path / f"cut-{cut}.gguf"
        part.write_bytes(whole[:cut])
        with pytest.raises(CheckpointError, match=rf"cut-{cut}\.gguf: truncated GGUF file: .* the file has {cut:,}"):
            LLMEngine(str(part))
