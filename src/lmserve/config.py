"""Deployment config: what one server deploys (models, engines), its API keys, limits, and the
platform defaults for omitted request fields. YAML or TOML; every mistake fails at start with a
message naming the file and the key."""

from __future__ import annotations

import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmserve.engine.llm_engine import EngineConfig
from lmserve.models.loader import DEFAULT_MODEL_ID

# The hosted platform's documented defaults (shared/API.md); a config may override them.
PLATFORM_DEFAULTS: dict[str, Any] = {
    "max_tokens": 512,
    "temperature": 0.7,
    "top_p": 0.7,
    "top_k": 50,
    "min_p": 0.0,
    "frequency_penalty": 0.5,
    "presence_penalty": 0.0,
    "n": 1,
}


class ConfigError(ValueError):
    pass


@dataclass
class ModelDeployment:
    id: str
    path: str
    dtype: str = "auto"
    engine: dict[str, Any] = field(default_factory=dict)
    report_eos_as_stop: bool = False  # for clients that only know OpenAI's finish reasons
    owned_by: str = "lmserve"
    max_pending_requests: int = 1024  # requests in flight beyond this get 503 (queue full)
    structured_output_timeout_s: float = 10.0  # a JSON schema that compiles longer is a 400


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 16
    generated_key: bool = False  # the key was made up at start (no config, no env)


@dataclass
class DeploymentConfig:
    server: ServerSettings
    defaults: dict[str, Any]
    models: list[ModelDeployment]


# The keys a config may set are the dataclass fields (generated_key is the server's own note).
_SERVER_KEYS = set(ServerSettings.__dataclass_fields__) - {"generated_key"}
_MODEL_KEYS = set(ModelDeployment.__dataclass_fields__)


def load_config(path: str | None, cli_models: list[str] | None = None, host: str | None = None,
                port: int | None = None) -> DeploymentConfig:
    raw = _read(Path(path)) if path else {}
    where = path or "command line"
    unknown = set(raw) - {"server", "defaults", "models"}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(sorted(unknown))} "
                          "(expected server, defaults, models)")
    server_raw = _section(raw, "server", dict, where)
    bad = set(server_raw) - _SERVER_KEYS
    if bad:
        raise ConfigError(f"{where}: unknown server key(s) {', '.join(sorted(bad))}")
    server = ServerSettings(**server_raw)
    if host:
        server.host = host
    if port:
        server.port = port
    if not isinstance(server.api_keys, list) or not all(isinstance(k, str) and k for k in server.api_keys):
        raise ConfigError(f"{where}: server.api_keys must be a list of non-empty strings")
    env_keys = [k.strip() for k in os.environ.get("LMSERVE_API_KEYS", "").split(",") if k.strip()]
    server.api_keys = list(dict.fromkeys(server.api_keys + env_keys))
    if not server.api_keys:
        # Never an open server: with no key configured, make one and print it at start.
        server.api_keys = ["sk-" + secrets.token_urlsafe(24)]
        server.generated_key = True

    defaults = dict(PLATFORM_DEFAULTS)
    user_defaults = _section(raw, "defaults", dict, where)
    bad = set(user_defaults) - set(PLATFORM_DEFAULTS)
    if bad:
        raise ConfigError(f"{where}: unknown defaults key(s) {', '.join(sorted(bad))} "
                          f"(allowed: {', '.join(PLATFORM_DEFAULTS)})")
    defaults.update(user_defaults)

    models = [_model(m, where, i) for i, m in enumerate(_section(raw, "models", list, where))]
    for m in cli_models or []:
        models.append(ModelDeployment(id=m, path=m))
    if not models:
        models = [ModelDeployment(id=DEFAULT_MODEL_ID, path=DEFAULT_MODEL_ID)]
    ids = [m.id for m in models]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise ConfigError(f"{where}: model id(s) deployed twice: {', '.join(sorted(dupes))}")
    return DeploymentConfig(server, defaults, models)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _section(raw: dict, name: str, kind: type, where: str):
    value = raw.get(name, kind())
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: `{name}` must be a {'mapping' if kind is dict else 'list'}")
    return value


def _model(m: Any, where: str, i: int) -> ModelDeployment:
    if not isinstance(m, dict) or "id" not in m:
        raise ConfigError(f"{where}: models[{i}] must be a mapping with at least an `id`")
    bad = set(m) - _MODEL_KEYS
    if bad:
        raise ConfigError(f"{where}: models[{i}] has unknown key(s) {', '.join(sorted(bad))}")
    engine = m.get("engine") or {}
    bad = set(engine) - set(EngineConfig.__dataclass_fields__)
    if bad:
        raise ConfigError(f"{where}: models[{i}].engine has unknown key(s) {', '.join(sorted(bad))} "
                          f"(allowed: {', '.join(EngineConfig.__dataclass_fields__)})")
    pending = m.get("max_pending_requests", 1024)
    if not isinstance(pending, int) or isinstance(pending, bool) or pending < 1:
        raise ConfigError(f"{where}: models[{i}].max_pending_requests must be a positive integer")
    compile_timeout = m.get("structured_output_timeout_s", 10.0)
    if not isinstance(compile_timeout, int | float) or isinstance(compile_timeout, bool) or compile_timeout <= 0:
        raise ConfigError(f"{where}: models[{i}].structured_output_timeout_s must be a positive number of seconds")
    return ModelDeployment(id=m["id"], path=m.get("path", m["id"]), dtype=m.get("dtype", "auto"), engine=engine,
                           report_eos_as_stop=bool(m.get("report_eos_as_stop", False)),
                           owned_by=m.get("owned_by", "lmserve"), max_pending_requests=pending,
                           structured_output_timeout_s=float(compile_timeout))
