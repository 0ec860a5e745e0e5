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


# Per-key limits by tier, per model (requests/tokens per minute and per day; None = no limit).
# A key's own overrides and a deployment's `tier_limits` take precedence.
DEFAULT_TIERS: dict[str, dict[str, int | None]] = {
    "free": {"rpm": 1000, "rpd": None, "tpm": 50_000, "tpd": None},
    "pro": {"rpm": 10_000, "rpd": None, "tpm": 1_000_000, "tpd": None},
}
LIMIT_NAMES = ("rpm", "rpd", "tpm", "tpd")
UPSTREAM_KEYS = {"base_urls", "model", "api_key", "api_key_env", "connect_timeout", "read_timeout", "retries"}


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
    # Price per million tokens {"input": x, "output": y}; `tier_prices` overrides it per key tier.
    price: dict[str, float] = field(default_factory=dict)
    tier_prices: dict[str, dict[str, float]] = field(default_factory=dict)
    tier_limits: dict[str, dict[str, int | None]] = field(default_factory=dict)  # tier -> {rpm, rpd, tpm, tpd}
    # An OpenAI-compatible upstream serves this id instead of a local engine (see UPSTREAM_KEYS).
    upstream: dict[str, Any] | None = None


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 16
    generated_key: bool = False  # the key was made up at start (no config, no env)


def _default_data_dir() -> str:
    return os.environ.get("LMSERVE_DATA_DIR") or str(Path.home() / ".local" / "share" / "lmserve")


@dataclass
class PlatformSettings:
    """Accounts, keys, limits and usage (lmserve.platform)."""

    data_dir: str = field(default_factory=_default_data_dir)
    database_url: str | None = None  # default: a SQLite file in data_dir
    redis_url: str | None = None  # rate-limit counters shared by several API servers; default in-process
    redis_prefix: str = "lmserve:rl:"  # key prefix in Redis (deployments sharing one Redis keep apart)
    admin_keys: list[str] = field(default_factory=list)  # plus LMSERVE_ADMIN_KEYS
    tiers: dict[str, dict[str, int | None]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_TIERS.items()})

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{Path(self.data_dir).expanduser() / 'lmserve.db'}"


@dataclass
class DeploymentConfig:
    server: ServerSettings
    defaults: dict[str, Any]
    models: list[ModelDeployment]
    platform: PlatformSettings = field(default_factory=PlatformSettings)


# The keys a config may set are the dataclass fields (generated_key is the server's own note).
_SERVER_KEYS = set(ServerSettings.__dataclass_fields__) - {"generated_key"}
_MODEL_KEYS = set(ModelDeployment.__dataclass_fields__)


def load_config(path: str | None, cli_models: list[str] | None = None, host: str | None = None,
                port: int | None = None) -> DeploymentConfig:
    raw = _read(Path(path)) if path else {}
    where = path or "command line"
    unknown = set(raw) - {"server", "defaults", "models", "platform"}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(sorted(unknown))} "
                          "(expected server, defaults, models, platform)")
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
        # "ID=PATH" serves local weights under a catalog id; a bare path or id serves itself.
        model_id, sep, path = m.partition("=")
        models.append(ModelDeployment(id=model_id, path=path) if sep and path else ModelDeployment(id=m, path=m))
    if not models:
        models = [ModelDeployment(id=DEFAULT_MODEL_ID, path=DEFAULT_MODEL_ID)]
    ids = [m.id for m in models]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise ConfigError(f"{where}: model id(s) deployed twice: {', '.join(sorted(dupes))}")
    return DeploymentConfig(server, defaults, models, _platform(_section(raw, "platform", dict, where), where))


def _platform(raw: dict, where: str) -> PlatformSettings:
    bad = set(raw) - set(PlatformSettings.__dataclass_fields__)
    if bad:
        raise ConfigError(f"{where}: unknown platform key(s) {', '.join(sorted(bad))}")
    settings = PlatformSettings(**{k: v for k, v in raw.items() if k != "tiers"})
    for name in ("data_dir", "database_url", "redis_url", "redis_prefix"):
        value = getattr(settings, name)
        if value is not None and not (isinstance(value, str) and value):
            raise ConfigError(f"{where}: platform.{name} must be a non-empty string")
    if settings.redis_url and not settings.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{where}: platform.redis_url must be a redis:// URL")
    if not isinstance(settings.admin_keys, list) or not all(isinstance(k, str) and k for k in settings.admin_keys):
        raise ConfigError(f"{where}: platform.admin_keys must be a list of non-empty strings")
    env_admin = [k.strip() for k in os.environ.get("LMSERVE_ADMIN_KEYS", "").split(",") if k.strip()]
    settings.admin_keys = list(dict.fromkeys(settings.admin_keys + env_admin))
    tiers = raw.get("tiers", {})
    if not isinstance(tiers, dict):
        raise ConfigError(f"{where}: platform.tiers must be a mapping of tier name -> limits")
    for tier, limits in tiers.items():
        settings.tiers[tier] = {**DEFAULT_TIERS.get(tier, dict.fromkeys(LIMIT_NAMES)),
                                **_limits(limits, f"{where}: platform.tiers.{tier}")}
    return settings


def _limits(raw: Any, where: str) -> dict[str, int | None]:
    if not isinstance(raw, dict) or set(raw) - set(LIMIT_NAMES):
        raise ConfigError(f"{where} must be a mapping with keys among {', '.join(LIMIT_NAMES)}")
    for name, value in raw.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{where}.{name} must be a positive integer or null (no limit)")
    return dict(raw)


def _price(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict) or set(raw) - {"input", "output"}:
        raise ConfigError(f"{where} must be a mapping {{input: <per million tokens>, output: <per million tokens>}}")
    for name, value in raw.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}.{name} must be a non-negative number")
    return {"input": float(raw.get("input", 0)), "output": float(raw.get("output", 0))}


def _upstream(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or set(raw) - UPSTREAM_KEYS:
        raise ConfigError(f"{where} must be a mapping with keys among {', '.join(sorted(UPSTREAM_KEYS))}")
    urls = raw.get("base_urls")
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not urls or not all(
            isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
        raise ConfigError(f"{where}.base_urls must be one or more http(s):// base URLs")
    for name in ("connect_timeout", "read_timeout"):
        value = raw.get(name, 1)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{where}.{name} must be a positive number of seconds")
    retries = raw.get("retries", 2)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ConfigError(f"{where}.retries must be a non-negative integer")
    return {**raw, "base_urls": [u.rstrip("/") for u in urls]}


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
    at = f"{where}: models[{i}]"
    price = _price(m["price"], f"{at}.price") if "price" in m else {}
    if not isinstance(m.get("tier_prices", {}), dict) or not isinstance(m.get("tier_limits", {}), dict):
        raise ConfigError(f"{at}: tier_prices and tier_limits must be mappings of tier name -> settings")
    tier_prices = {t: _price(v, f"{at}.tier_prices.{t}") for t, v in m.get("tier_prices", {}).items()}
    tier_limits = {t: _limits(v, f"{at}.tier_limits.{t}") for t, v in m.get("tier_limits", {}).items()}
    upstream = _upstream(m["upstream"], f"{at}.upstream") if m.get("upstream") is not None else None
    return ModelDeployment(id=m["id"], path=m.get("path", m["id"]), dtype=m.get("dtype", "auto"), engine=engine,
                           report_eos_as_stop=bool(m.get("report_eos_as_stop", False)),
                           owned_by=m.get("owned_by", "lmserve"), max_pending_requests=pending,
                           structured_output_timeout_s=float(compile_timeout), price=price,
                           tier_prices=tier_prices, tier_limits=tier_limits, upstream=upstream)
