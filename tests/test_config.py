"""Deployment config: a bad file or flag stops the server at start with a message naming it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmserve.config import PLATFORM_DEFAULTS, ConfigError, load_config
from lmserve.defaults import DEFAULT_MODEL_ID


def test_no_config_deploys_bundled_model_with_generated_key(monkeypatch):
    monkeypatch.delenv("LMSERVE_API_KEYS", raising=False)
    cfg = load_config(None)
    assert [m.id for m in cfg.models] == [DEFAULT_MODEL_ID]
    assert cfg.server.generated_key and cfg.server.api_keys[0].startswith("sk-")
    assert cfg.defaults.model_dump() == PLATFORM_DEFAULTS
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8000)


def test_env_keys_and_toml(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSERVE_API_KEYS", "k1, k2")
    f = tmp_path / "c.toml"
    f.write_text('[server]\napi_keys = ["k0"]\nport = 9000\n[defaults]\ntemperature = 0.2\n'
                 '[[models]]\nid = "a"\npath = "x.gguf"\nreport_eos_as_stop = true\nengine = {num_kv_blocks = 8}\n')
    cfg = load_config(str(f))
    assert cfg.server.api_keys == ["k0", "k1", "k2"] and not cfg.server.generated_key
    assert cfg.server.port == 9000 and cfg.defaults.temperature == 0.2
    assert cfg.models[0].report_eos_as_stop and cfg.models[0].engine.options() == {"num_kv_blocks": 8}


@pytest.mark.parametrize("text,match", [
    ("server: {bogus: 1}\n", r"server.bogus: unknown key \(allowed: host, port,"),
    ("models:\n  - {id: a, engine: {cache: 3}}\n", r"models\[0\].engine.cache: unknown key"),
    ("models:\n  - {path: a}\n", r"models\[0\].id: required"),
    ("models:\n  - {id: a}\n  - {id: a}\n", "deployed twice"),
    ("defaults: {temp: 1}\n", "defaults.temp: unknown key"),
    ("colour: blue\n", "colour: unknown key"),
    ("models:\n  - {id: a, dtype: fp16}\n", r"models\[0\].dtype: Input should be 'auto', 'float32'"),
    ("models:\n  - {id: a, engine: {max_num_seqs: lots}}\n", r"models\[0\].engine.max_num_seqs: .*'lots'"),
    ("server: {port: eighty}\n", r"server.port: .*'eighty'"),
    ("server: {port: 99999}\n", r"server.port: Input should be less than or equal to 65535"),
    ("models:\n  - {id: a, chat_template: /nonexistent.jinja}\n", r"models\[0\].chat_template: no such file"),
    ("models:\n  - {id: a, engine: {kv_cache_memory: lots}}\n", r"models\[0\].engine.kv_cache_memory"),
    ("models:\n  - {id: a, engine: {gpu_memory_utilization: 1.5}}\n",
     r"models\[0\].engine.gpu_memory_utilization: Input should be less than or equal to 1"),
    ("models:\n  - {id: a, engine: {gpu_memory_utilization: 0}}\n",
     r"models\[0\].engine.gpu_memory_utilization: Input should be greater than 0"),
    ("models:\n  - {id: a, engine: {cuda_graphs: sometimes}}\n", r"models\[0\].engine.cuda_graphs: .*boolean"),
    ("models:\n  - {id: a, engine: {attention_backend: flash}}\n",
     r"models\[0\].engine.attention_backend: .*auto.*reference.*triton"),
    ("server: [1, 2\n", "not valid YAML"),
    ("platform: {db: x}\n", r"platform.db: unknown key \(allowed: data_dir,"),
    ("platform: {redis_url: 'http://x'}\n", r"platform.redis_url: String should match pattern"),
    ("platform: {tiers: {free: {rpm: 0}}}\n", r"platform.tiers.free: rpm must be a positive integer"),
    ("platform: {tiers: {free: {rps: 3}}}\n", r"platform.tiers.free: unknown limit\(s\) rps"),
    ("models:\n  - {id: a, price: {input: -1}}\n", r"models\[0\].price: input must be a non-negative number"),
    ("models:\n  - {id: a, upstream: {base_urls: ftp://x}}\n", r"base_urls must be one or more http"),
    ("models:\n  - {id: a, upstream: {base_urls: 'http://x', timeout: 3}}\n",
     r"models\[0\].upstream: unknown key\(s\) timeout"),
    ("- just a list\n", "top level must be a mapping"),
])
def test_bad_config_is_named(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(str(f))


def test_platform_section(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSERVE_ADMIN_KEYS", "sk-adm-env")
    monkeypatch.setenv("LMSERVE_DATA_DIR", str(tmp_path / "data"))
    f = tmp_path / "p.yaml"
    f.write_text("platform:\n  admin_keys: [sk-adm]\n  tiers: {free: {rpm: 5}, gold: {tpm: 9}}\n"
                 "models:\n  - id: Vendor-A/x\n    upstream: {base_urls: ['http://h/v1/'], api_key_env: K}\n"
                 "    price: {input: 1, output: 2.5}\n    tier_limits: {free: {rpd: 3}}\n")
    cfg = load_config(str(f))
    assert cfg.platform.admin_keys == ["sk-adm", "sk-adm-env"]
    assert cfg.platform.db_url == f"sqlite:///{tmp_path / 'data' / 'lmserve.db'}"
    assert cfg.platform.tiers["free"]["rpm"] == 5 and cfg.platform.tiers["free"]["tpm"] == 50_000
    assert cfg.platform.tiers["gold"] == {"rpm": None, "rpd": None, "tpm": 9, "tpd": None}
    m = cfg.models[0]
    assert m.upstream["base_urls"] == ["http://h/v1"] and m.price == {"input": 1.0, "output": 2.5}
    assert m.tier_limits == {"free": {"rpd": 3}}


def test_platform_section_errors_are_named(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("platform: {redis_url: 'http://x', tiers: {free: {rpm: 0}}}\n"
                 "models:\n  - id: a\n    price: {input: -1}\n    upstream: {base_urls: ftp://x}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    text = str(e.value)
    for where in ("platform.redis_url", "platform.tiers.free", "models[0].price", "models[0].upstream"):
        assert where in text, text


def test_every_problem_at_once_with_file_and_key_path(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("server: {port: eighty, bogus: 1}\ndefaults: {temperature: 5}\n"
                 "models:\n  - {id: a, dtype: fp16, engine: {max_num_seqs: lots}}\n  - {path: b}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    lines = str(e.value).splitlines()
    assert lines[0] == f"{f}: 6 problems:"
    assert [line.split(":")[0].strip(" -") for line in lines[1:]] == [
        "server.port", "server.bogus", "defaults.temperature", "models[0].dtype", "models[0].engine.max_num_seqs",
        "models[1].id"]


def test_engine_option_choices_mirror_the_layers_that_take_them():
    from lmserve.engine.options import Quantization
    from lmserve.layers.quantization import QUANTIZATION_CHOICES

    assert Quantization.__args__ == QUANTIZATION_CHOICES
    from lmserve.engine.options import LoadFormat
    from lmserve.models.loader import LOAD_FORMATS

    assert LoadFormat.__args__ == LOAD_FORMATS
    from lmserve.attention.selector import ATTENTION_BACKENDS
    from lmserve.distributed.group import BACKENDS
    from lmserve.engine.options import AttentionBackend, DistributedBackend

    assert (AttentionBackend.__args__, DistributedBackend.__args__) == (ATTENTION_BACKENDS, BACKENDS)
    from lmserve.attention.kv_cache_dtype import KV_CACHE_DTYPES
    from lmserve.engine.options import KVCacheDtype

    assert KVCacheDtype.__args__ == KV_CACHE_DTYPES


def test_one_engine_option_model_behind_the_file_the_flags_and_llm_kwargs(tmp_path):
    from lmserve.engine.options import EngineConfig

    f = tmp_path / "c.yaml"
    f.write_text("models:\n  - {id: a, engine: {max_num_seqs: 0}}\n")
    for load in (lambda: load_config(str(f)), lambda: load_config(None, max_num_seqs=0)):
        with pytest.raises(ConfigError, match=r"models\[0\].engine.max_num_seqs: Input should be greater"):
            load()
    with pytest.raises(ValueError, match="max_num_seqs: Input should be greater than or equal to 1"):
        EngineConfig.from_options(max_num_seqs=0)
    with pytest.raises(TypeError, match="unknown engine option"):
        EngineConfig.from_options(max_num_seq=4)
    # A choice is named the same way from every door, its value shown once.
    f.write_text("models:\n  - {id: a, engine: {quantization: int3}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert str(e.value).endswith("models[0].engine.quantization: quantization must be one of none, int8, int4, fp8; "
                                 "got 'int3'")
    # Sizes read alike; left out (or null) is the engine's default and not passed on as a choice.
    assert EngineConfig.from_options(kv_cache_memory="512MiB").kv_cache_memory == 512 << 20
    f.write_text("models:\n  - {id: a, engine: {max_num_seqs: null, quantization: null}}\n")
    engine = load_config(str(f)).models[0].engine
    assert engine == EngineConfig() and engine.options() == {} and engine.max_num_seqs == 256


def test_flags_override_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("LMSERVE_API_KEYS", raising=False)
    f = tmp_path / "c.yaml"
    f.write_text("server: {api_keys: [k0]}\n"
                 "models:\n  - {id: a, path: a.gguf, engine: {max_num_seqs: 8, compile: true, cuda_graphs: true,"
                 " gpu_memory_utilization: 0.5}}\n")
    cfg = load_config(str(f), None, "0.0.0.0", 9001, api_keys=["k1"], served_model_name="mine",
                      kv_cache_memory="512MiB", max_num_seqs=4, max_model_len=1024, dtype="float32",
                      quantization="int8", quantized_max_rows=2, threads=3, compile=False,
                      gpu_memory_utilization=0.8, cuda_graphs=False)
    assert (cfg.server.host, cfg.server.port, cfg.server.api_keys) == ("0.0.0.0", 9001, ["k0", "k1"])
    assert cfg.server.threads == 3
    m = cfg.models[0]
    assert (m.id, m.source, m.dtype) == ("mine", "a.gguf", "float32")
    assert m.engine.options() == {"kv_cache_memory": 512 << 20, "max_num_seqs": 4, "max_model_len": 1024,
                                  "quantization": "int8", "quantized_max_rows": 2,
                                  "compile": False, "gpu_memory_utilization": 0.8, "cuda_graphs": False}
    # Unset flags leave the file's values.
    kept = load_config(str(f), None).models[0].engine.options()
    assert (kept["gpu_memory_utilization"], kept["cuda_graphs"]) == (0.5, True)
    with pytest.raises(ConfigError, match="threads"):
        load_config(None, threads=0)
    assert load_config(None, ["cat/id=w.gguf"]).models[0].source == "w.gguf"
    with pytest.raises(ConfigError, match="--served-model-name names one model"):
        load_config(None, ["a.gguf", "b.gguf"], served_model_name="x")


def test_generation_defaults_per_deployment(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("defaults: {temperature: 0.3}\nmodels:\n  - {id: a, defaults: {top_p: 0.9}}\n"
                 "  - {id: b, generation_config: checkpoint, defaults: {top_k: 5}}\n")
    cfg = load_config(str(f))
    a, b = cfg.models
    assert cfg.generation_defaults(a) == {**PLATFORM_DEFAULTS, "temperature": 0.3, "top_p": 0.9}
    # checkpoint values beat the config's defaults; the model's own defaults beat both
    ckpt = {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "max_new_tokens": 100, "do_sample": True}
    assert cfg.generation_defaults(b, ckpt) == {**PLATFORM_DEFAULTS, "temperature": 0.6, "top_p": 0.95,
                                                "top_k": 5, "max_tokens": 100}
    assert cfg.generation_defaults(a, ckpt)["temperature"] == 0.3  # platform source ignores the checkpoint


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))


def test_cli_fails_fast_on_unknown_flag_and_bad_config(tmp_path):
    run = [sys.executable, "-m", "lmserve", "serve"]
    bad_flag = subprocess.run(run + ["--colour"], capture_output=True, text=True, timeout=60)
    assert bad_flag.returncode == 2 and "unrecognized arguments: --colour" in bad_flag.stderr
    f = tmp_path / "bad.yaml"
    f.write_text("server: {bogus: 1}\n")
    bad_cfg = subprocess.run(run + ["--config", str(f)], capture_output=True, text=True, timeout=60)
    assert bad_cfg.returncode == 2 and "server.bogus: unknown key" in bad_cfg.stderr
    bad_port = subprocess.run(run + ["--port", "99999"], capture_output=True, text=True, timeout=60)
    assert bad_port.returncode == 2 and "must be in 1..65535" in bad_port.stderr
    bad_size = subprocess.run(run + ["--kv-cache-memory", "lots"], capture_output=True, text=True, timeout=60)
    assert bad_size.returncode == 2 and "not a size: 'lots'" in bad_size.stderr
    bad_fraction = subprocess.run(run + ["--gpu-memory-utilization", "1.5"], capture_output=True, text=True,
                                  timeout=60)
    assert bad_fraction.returncode == 2 and "must be a fraction in (0, 1], got 1.5" in bad_fraction.stderr
    import os
    import socket

    with socket.socket() as sock:  # the port is bound before the model loads: a free one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    missing = subprocess.run(run + ["--model", str(tmp_path / "nothing.gguf"), "--port", str(port)],
                             capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, LMSERVE_DATA_DIR=str(tmp_path)))
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr


def test_sample_config_in_the_repo_is_valid():
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "lmserve.yaml"
    cfg = load_config(str(sample))
    assert [m.id for m in cfg.models] == [DEFAULT_MODEL_ID, "Pro/" + DEFAULT_MODEL_ID]
    assert cfg.server.max_body_bytes == 4 << 20 and cfg.models[0].engine.options()["kv_cache_memory"] == 1 << 30
