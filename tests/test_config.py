"""Deployment config: a bad file or flag stops the server at start with a message naming it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmserve.config import PLATFORM_DEFAULTS, ConfigError, load_config
from lmserve.models.loader import DEFAULT_MODEL_ID


def test_no_config_deploys_bundled_model_with_generated_key(monkeypatch):
    monkeypatch.delenv("LMSERVE_API_KEYS", raising=False)
    cfg = load_config(None)
    assert [m.id for m in cfg.models] == [DEFAULT_MODEL_ID]
    assert cfg.server.generated_key and cfg.server.api_keys[0].startswith("sk-")
    assert cfg.defaults == PLATFORM_DEFAULTS
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8000)


def test_env_keys_and_toml(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSERVE_API_KEYS", "k1, k2")
    f = tmp_path / "c.toml"
    f.write_text('[server]\napi_keys = ["k0"]\nport = 9000\n[defaults]\ntemperature = 0.2\n'
                 '[[models]]\nid = "a"\npath = "x.gguf"\nreport_eos_as_stop = true\nengine = {num_kv_blocks = 8}\n')
    cfg = load_config(str(f))
    assert cfg.server.api_keys == ["k0", "k1", "k2"] and not cfg.server.generated_key
    assert cfg.server.port == 9000 and cfg.defaults["temperature"] == 0.2
    assert cfg.models[0].report_eos_as_stop and cfg.models[0].engine == {"num_kv_blocks": 8}


@pytest.mark.parametrize("text,match", [
    ("server: {bogus: 1}\n", "unknown server key"),
    ("models:\n  - {id: a, engine: {cache: 3}}\n", r"models\[0\].engine has unknown key"),
    ("models:\n  - {path: a}\n", r"models\[0\] must be a mapping with at least an `id`"),
    ("models:\n  - {id: a}\n  - {id: a}\n", "deployed twice"),
    ("defaults: {temp: 1}\n", "unknown defaults key"),
    ("colour: blue\n", "unknown section"),
    ("server: [1, 2\n", "not valid YAML"),
    ("platform: {db: x}\n", "unknown platform key"),
    ("platform: {redis_url: 'http://x'}\n", r"redis_url must be a redis:// URL"),
    ("platform: {tiers: {free: {rpm: 0}}}\n", r"tiers.free.rpm must be a positive integer"),
    ("platform: {tiers: {free: {rps: 3}}}\n", r"tiers.free must be a mapping with keys among"),
    ("models:\n  - {id: a, price: {input: -1}}\n", r"price.input must be a non-negative number"),
    ("models:\n  - {id: a, upstream: {base_urls: ftp://x}}\n", r"base_urls must be one or more http"),
    ("models:\n  - {id: a, upstream: {base_urls: 'http://x', timeout: 3}}\n", r"upstream must be a mapping with"),
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
    assert bad_cfg.returncode == 2 and "unknown server key(s) bogus" in bad_cfg.stderr
    missing = subprocess.run(run + ["--model", str(tmp_path / "nothing.gguf")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr
