"""Deployment config: what one server deploys (models, engines), its API keys, limits, logging,
and the generation defaults for omitted request fields. YAML or TOML, plus command-line flags.

The schema is these pydantic models: unknown keys are errors, dtypes and log settings are enums,
ports and sizes have ranges, and every default is written here once. A bad file is reported at
start, every problem at once, each with the file and the key path (`models[1].engine.max_num_seqs`).
This module imports no torch, so a bad config fails before any model code loads.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
)

from lmserve.defaults import DEFAULT_MODEL_ID
from lmserve.engine.options import EngineConfig

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = Dtype.__args__
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
NonEmptyStr = Annotated[str, Field(min_length=1)]
Positive = Annotated[int, Field(ge=1)]


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


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _limits(raw: dict[str, Any]) -> dict[str, int | None]:
    """{rpm, rpd, tpm, tpd}: each a positive integer or null (no limit); only the keys given."""
    bad = set(raw) - set(LIMIT_NAMES)
    if bad:
        raise ValueError(f"unknown limit(s) {', '.join(sorted(bad))} (allowed: {', '.join(LIMIT_NAMES)})")
    for name, value in raw.items():
        if value is not None and not (_is_count(value) and value >= 1):
            raise ValueError(f"{name} must be a positive integer or null (no limit), got {value!r}")
    return dict(raw)


def _price(raw: dict[str, Any]) -> dict[str, float]:
    """{input, output}: prices per million tokens."""
    bad = set(raw) - {"input", "output"}
    if bad:
        raise ValueError(f"unknown key(s) {', '.join(sorted(bad))} (a price is {{input, output}} per million tokens)")
    for name, value in raw.items():
        if not (_is_number(value) and value >= 0):
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return {"input": float(raw.get("input", 0)), "output": float(raw.get("output", 0))}


def _upstream(raw: dict[str, Any]) -> dict[str, Any]:
    bad = set(raw) - UPSTREAM_KEYS
    if bad:
        raise ValueError(f"unknown key(s) {', '.join(sorted(bad))} (allowed: {', '.join(sorted(UPSTREAM_KEYS))})")
    urls = raw.get("base_urls")
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not urls or not all(
            isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
        raise ValueError("base_urls must be one or more http(s):// base URLs")
    for name in ("connect_timeout", "read_timeout"):
        value = raw.get(name, 1)
        if not (_is_number(value) and value > 0):
            raise ValueError(f"{name} must be a positive number of seconds")
    retries = raw.get("retries", 2)
    if not (_is_count(retries) and retries >= 0):
        raise ValueError("retries must be a non-negative integer")
    return {**raw, "base_urls": [u.rstrip("/") for u in urls]}


Limits = Annotated[dict[str, Any], AfterValidator(_limits)]
Price = Annotated[dict[str, Any], AfterValidator(_price)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class GenerationDefaults(_Section):
    """Values for request fields a client leaves out. These are the hosted platform's documented
    defaults (shared/API.md); the config's `defaults` section and each model's `defaults` override them."""

    max_tokens: Positive = 512
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.7
    top_k: Annotated[int, Field(ge=-1)] = 50
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.5
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    n: Positive = 1


PLATFORM_DEFAULTS: dict[str, Any] = GenerationDefaults().model_dump()

# The same fields, each optional with the same constraints: a partial override.
GenerationOverrides = create_model(
    "GenerationOverrides", __base__=_Section,
    **{name: (Annotated[f.annotation, *f.metadata] | None, None)
       for name, f in GenerationDefaults.model_fields.items()})

# generation_config.json keys a checkpoint may recommend, by our names.
_CHECKPOINT_GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                               "min_p": "min_p", "repetition_penalty": "repetition_penalty"}


class ModelDeployment(_Section):
    id: NonEmptyStr  # the name clients send as `model`
    path: NonEmptyStr | None = None  # checkpoint dir, .gguf file or hub id; default: the id
    dtype: Dtype = "auto"
    engine: EngineConfig = Field(default_factory=EngineConfig)  # engine/options.py
    chat_template: str | None = None  # a Jinja file replacing the checkpoint's template
    defaults: GenerationOverrides = Field(default_factory=GenerationOverrides)
    # "checkpoint": the model's generation_config.json recommends sampling values, which take
    # precedence over the platform defaults (a model's own `defaults` still win).
    generation_config: Literal["platform", "checkpoint"] = "platform"
    report_eos_as_stop: bool = False  # for clients that only know OpenAI's finish reasons
    owned_by: str = "lmserve"
    max_pending_requests: Positive = 1024  # requests in flight beyond this get 503 (queue full)
    structured_output_timeout_s: Annotated[float, Field(gt=0)] = 10.0  # a JSON schema that compiles longer is a 400
    # Price per million tokens {"input": x, "output": y}; `tier_prices` overrides it per key tier.
    price: Price = {}
    tier_prices: dict[str, Price] = {}
    batch_price: Price | None = None  # a batch API line's price; default: half of the tier's price
    tier_limits: dict[str, Limits] = {}  # tier -> {rpm, rpd, tpm, tpd}
    # An OpenAI-compatible upstream serves this id instead of a local engine (see UPSTREAM_KEYS).
    upstream: Annotated[dict[str, Any], AfterValidator(_upstream)] | None = None

    @property
    def source(self) -> str:
        return self.path or self.id

    def chat_template_text(self) -> str | None:
        return Path(self.chat_template).expanduser().read_text() if self.chat_template else None


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    api_keys: list[NonEmptyStr] = []
    max_body_bytes: Annotated[ByteSize, Field(ge=1024)] = ByteSize(4 * 1024 * 1024)
    max_n: Positive = 16
    cors_origins: list[NonEmptyStr] = []  # browser origins allowed to call the API ("*": any)
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    log_health_probes: bool = False  # /health, /ready, /live and /metrics in the request log
    stats_interval_s: Annotated[float, Field(ge=0.0)] = 10.0  # stats line while busy; 0: off
    threads: Positive | None = None  # torch intra-op threads on CPU; default: the physical cores
    # Connection hygiene (docs/operations.md): request heads larger than this are refused, and a
    # connection that has not sent a whole request head within header_timeout_s is closed.
    max_header_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024
    header_timeout_s: Annotated[float, Field(gt=0.0)] = 5.0
    # SIGTERM/SIGINT: requests in flight get this long to finish before they are ended. 25 s
    # leaves Kubernetes' default 30 s terminationGracePeriodSeconds room to end streams and write
    # (or spool) their ledger rows before its SIGKILL (docs/operations.md).
    shutdown_grace_s: Annotated[float, Field(ge=0.0)] = 25.0
    _generated_key: bool = PrivateAttr(False)

    @property
    def generated_key(self) -> bool:
        """The key was made up at start (no config, flag or env)."""
        return self._generated_key



def _default_data_dir() -> str:
    return os.environ.get("LMSERVE_DATA_DIR") or str(Path.home() / ".local" / "share" / "lmserve")


class PlatformSettings(_Section):
    """Accounts, keys, limits and usage (lmserve.platform)."""

    data_dir: NonEmptyStr = Field(default_factory=_default_data_dir)  # also --data-dir, LMSERVE_DATA_DIR
    database_url: NonEmptyStr | None = None  # default: a SQLite file in data_dir
    # rate-limit counters shared by several API servers; default in-process
    redis_url: Annotated[str, Field(pattern=r"^(redis|rediss|unix)://")] | None = None
    redis_prefix: NonEmptyStr = "lmserve:rl:"  # key prefix in Redis (deployments sharing one Redis keep apart)
    admin_keys: list[NonEmptyStr] = []  # plus LMSERVE_ADMIN_KEYS
    tiers: dict[str, Limits] = {}  # tier -> limits, over DEFAULT_TIERS
    # Bounded waits on the network dependencies (docs/operations.md, "Failure policy"): a frozen
    # Redis or database costs a request this long at most, then it is a 503 with Retry-After.
    redis_connect_timeout_s: Annotated[float, Field(gt=0.0)] = 0.5
    redis_timeout_s: Annotated[float, Field(gt=0.0)] = 0.5  # one command (a limiter admission)
    db_connect_timeout_s: Annotated[float, Field(gt=0.0)] = 3.0
    db_statement_timeout_s: Annotated[float, Field(gt=0.0)] = 10.0
    db_pool_timeout_s: Annotated[float, Field(gt=0.0)] = 5.0  # waiting for a pooled connection
    # How long a finished request waits for its ledger row to commit before the row goes to the
    # spool file instead (it may still commit: the trace id's unique constraint keeps it to one).
    ledger_wait_s: Annotated[float, Field(gt=0.0)] = 1.0
    # Redis unreachable: "deny" refuses metered requests (503 limiter_unavailable); "allow"
    # serves them without rate limits (a warning in the log and lmserve_limiter_bypassed_total).
    on_limiter_unavailable: Literal["deny", "allow"] = "deny"
    # The batch API (/v1/files, /v1/batches; README): uploads' directory (a volume several API
    # servers share, like the database; default <data_dir>/files) and limits as OpenAI's.
    files_dir: NonEmptyStr | None = None
    max_file_bytes: Annotated[ByteSize, Field(ge=1024)] = ByteSize(200 * 1000 * 1000)
    max_batch_lines: Positive = 50_000
    batch_concurrency: Positive = 64  # batch lines one server runs at once (the engine schedules them)
    batch_lease_s: Annotated[float, Field(gt=0.0)] = 60.0  # a dead server's claimed lines run again after this
    batch_poll_s: Annotated[float, Field(gt=0.0)] = 1.0  # how often an idle worker looks for work

    @property
    def files_path(self) -> Path:
        return Path(self.files_dir or Path(self.data_dir) / "files").expanduser()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{Path(self.data_dir).expanduser() / 'lmserve.db'}"


class DeploymentConfig(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    models: list[ModelDeployment] = []
    platform: PlatformSettings = Field(default_factory=PlatformSettings)

    def generation_defaults(self, model: ModelDeployment, checkpoint_values: dict[str, Any] | None = None
                            ) -> dict[str, Any]:
        """Defaults for one deployment: platform < config `defaults` < checkpoint (if chosen) < model's own."""
        out = self.defaults.model_dump()
        if model.generation_config == "checkpoint" and checkpoint_values:
            out.update({ours: checkpoint_values[theirs] for theirs, ours in _CHECKPOINT_GENERATION_KEYS.items()
                        if checkpoint_values.get(theirs) is not None})
            if checkpoint_values.get("max_new_tokens"):
                out["max_tokens"] = checkpoint_values["max_new_tokens"]
        out.update(model.defaults.model_dump(exclude_none=True))
        return out


# Flags that set model fields of every deployment (flag name -> where it goes); every flag named
# after an engine option (engine/options.py) sets that option of every deployment's engine.
_MODEL_FLAGS = {"dtype": ("dtype",), "chat_template": ("chat_template",),
                **{name: ("engine", name) for name in EngineConfig.model_fields}}
_SERVER_FLAGS = ("host", "port", "log_level", "log_format", "threads")


def load_config(path: str | None, cli_models: list[str] | None = None, host: str | None = None,
                port: int | None = None, **flags: Any) -> DeploymentConfig:
    """The file (if any) with the command-line flags applied on top, validated as a whole.

    flags: api_keys, cors_origins (lists, added to the file's), served_model_name, dtype,
    chat_template and any engine option (applied to every deployment), log_level, log_format,
    threads (server settings), data_dir (platform.data_dir)."""
    raw = _read(Path(path)) if path else {}
    where = path or "command line"
    flags.update(host=host, port=port)
    if isinstance(raw.get("server", {}), dict):
        server = raw.setdefault("server", {})
        for name in _SERVER_FLAGS:
            if flags.get(name) is not None:
                server[name] = flags[name]
        for name in ("api_keys", "cors_origins"):
            if flags.get(name):
                existing = server.get(name) or []
                server[name] = (existing if isinstance(existing, list) else [existing]) + list(flags[name])
    if flags.get("data_dir") and isinstance(raw.get("platform", {}), dict):
        raw.setdefault("platform", {})["data_dir"] = flags["data_dir"]
    models = raw.get("models")
    if models is None or isinstance(models, list):
        models = list(models or []) + [_cli_model(m) for m in cli_models or []]
        if not models:
            models = [{"id": DEFAULT_MODEL_ID}]
        raw["models"] = models
        for m in models:
            if not isinstance(m, dict):
                continue
            for flag, dest in _MODEL_FLAGS.items():
                if flags.get(flag) is not None:
                    target = m.setdefault(dest[0], {}) if len(dest) == 2 else m
                    if isinstance(target, dict):
                        target[dest[-1]] = flags[flag]
    # Every problem is reported at once, whichever section or check finds it: the checks that need
    # more than the schema run on the raw file too, so a schema error elsewhere does not hide them.
    problems: list[str] = []
    if isinstance(models, list):
        if flags.get("served_model_name") and len(models) != 1:
            problems.append(f"--served-model-name names one model, but {len(models)} are deployed "
                            "(give each its `id` in the config instead)")
        elif flags.get("served_model_name"):
            if isinstance(models[0], dict):
                models[0]["path"] = models[0].get("path") or models[0].get("id")
                models[0]["id"] = flags["served_model_name"]

        raw_models = [m if isinstance(m, dict) else {} for m in models]
        ids = [m.get("id") for m in raw_models if isinstance(m.get("id"), str)]
        for dupe in sorted({i for i in ids if ids.count(i) > 1}):
            problems.append(f"models: id {dupe!r} is deployed twice")
        for i, m in enumerate(raw_models):
            template = m.get("chat_template")
            if isinstance(template, str) and template and not Path(template).expanduser().is_file():
                problems.append(f"models[{i}].chat_template: no such file {template!r}")

    try:
        config = DeploymentConfig.model_validate(raw)
    except ValidationError as e:
        problems = [_describe(err) for err in e.errors()] + problems
    if problems:
        raise ConfigError(_report(where, problems))

    platform = config.platform
    env_admin = [k.strip() for k in os.environ.get("LMSERVE_ADMIN_KEYS", "").split(",") if k.strip()]
    platform.admin_keys = list(dict.fromkeys(platform.admin_keys + env_admin))
    platform.tiers = {**{k: dict(v) for k, v in DEFAULT_TIERS.items()},
                      **{tier: {**DEFAULT_TIERS.get(tier, dict.fromkeys(LIMIT_NAMES)), **limits}
                         for tier, limits in platform.tiers.items()}}

    env_keys = [k.strip() for k in os.environ.get("LMSERVE_API_KEYS", "").split(",") if k.strip()]
    config.server.api_keys = list(dict.fromkeys(config.server.api_keys + env_keys))
    if not config.server.api_keys:
        # Never an open server: with no key configured, make one and print it at start.
        config.server.api_keys = ["sk-" + secrets.token_urlsafe(24)]
        config.server._generated_key = True
    return config


def _cli_model(arg: str) -> dict[str, str]:
    """--model PATH_OR_ID serves itself; "ID=PATH" serves local weights under a catalog id."""
    model_id, sep, path = arg.partition("=")
    return {"id": model_id, "path": path} if sep and path else {"id": arg, "path": arg}


def _report(where: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    return f"{where}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def _describe(err: dict[str, Any]) -> str:
    """One pydantic error as `key.path: what is wrong (got value)`."""
    loc = ""
    for part in err["loc"]:
        if isinstance(part, int):
            loc += f"[{part}]"
        elif not (isinstance(part, str) and "[" in part):  # skip union/constraint branch labels
            loc += f".{part}" if loc else str(part)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, _, key = loc.rpartition(".")
        allowed = _allowed_keys(err["loc"][:-1])
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{loc}: unknown key{hint}"
    if kind == "missing":
        return f"{loc}: required"
    got = err.get("input")
    message = err["msg"].removeprefix("Value error, ")
    # A message that already shows the value (engine/options.py's choices) is not given it twice.
    shown = "" if isinstance(got, dict | list) or "; got " in message else f" (got {got!r})"
    return f"{loc or 'top level'}: {message}{shown}"


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys the section at `loc` accepts, for the message about an unknown one."""
    model: type[BaseModel] = DeploymentConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        inner = {"server": ServerSettings, "defaults": GenerationDefaults, "models": ModelDeployment,
                 "engine": EngineConfig, "platform": PlatformSettings}.get(part)
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


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
