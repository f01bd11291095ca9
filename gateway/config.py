"""enginegate.yaml: the one config file, validated by pydantic.

Loading is three steps, each failing with the file name and the key path at fault:
YAML → `${VAR}` / `${VAR:-default}` interpolation → pydantic validation. `plan_workers` then
places every replica (backends.placement) and reports its errors the same way.
"""

import os
import re
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from backends.base import Slot
from backends.cluster import ClusterSpec
from backends.placement import PlacementError, available_cores, count_gpus, plan
from backends.spec import ModelSpec
from gateway.keys import unknown_models

_VAR = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")
_SECRET_KEYS = ("api_key", "api_keys", "admin_keys", "metrics_token")


class ConfigError(Exception):
    """A config file that cannot be used; str() is one `file: key.path: problem` per line."""

    def __init__(self, file: str, problems: list[str]) -> None:
        self.file = file
        self.problems = problems
        super().__init__("\n".join(f"{file}: {p}" for p in problems))


class ApiKeyEntry(BaseModel):
    """A key in the config file with a name, and optionally limits (see gateway/keys.py)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9@._-]+$")
    key: str
    owner: str | None = None
    models: list[str] | None = Field(None, min_length=1, description="names and globs")
    rpm: int | None = Field(None, gt=0, description="requests per minute")
    tpm: int | None = Field(None, gt=0, description="prompt + completion tokens per minute")
    max_concurrent: int | None = Field(None, gt=0)
    tokens_per_day: int | None = Field(None, gt=0)
    tokens_per_month: int | None = Field(None, gt=0)
    priority: Literal["low", "normal", "high"] = "normal"
    expires: date | None = None
    enabled: bool = True

    @field_validator("key")
    @classmethod
    def _not_empty(cls, key: str) -> str:
        if not key.strip():
            raise ValueError("the key is empty (is the variable it comes from set?)")
        return key


def _entry_kind(value: Any) -> str:
    return "mapping" if isinstance(value, dict | ApiKeyEntry) else "string"


# A string or a mapping; the discriminator keeps pydantic from reporting both branches' errors.
KeyEntry = Annotated[
    Annotated[str, Tag("string")] | Annotated[ApiKeyEntry, Tag("mapping")],
    Discriminator(_entry_kind),
]
_TAGS = {"string", "mapping"}


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[KeyEntry] = Field(
        default_factory=list,
        description="Bearer tokens for /v1/*: strings, or mappings with a name",
    )
    queueing: Literal["fair", "fifo"] = Field(
        "fair", description="a saturated model's line: weighted fair across keys, or FIFO"
    )
    database: str = Field(
        "sqlite", description="where keys and usage live: sqlite (state_dir) or postgresql://..."
    )
    allow_unauthenticated: bool = False
    admin_keys: list[str] = Field(default_factory=list, description="Bearer tokens for /admin, /ui")
    metrics_token: str | None = Field(None, description="Bearer token for /metrics; none: open")
    state_dir: Path = Path("~/.local/state/enginegate")
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    connect_timeout: float = Field(10, gt=0)
    read_timeout: float = Field(600, gt=0, description="max seconds between upstream bytes")
    drain_timeout: float = Field(
        30, ge=0, description="seconds requests get to finish on stop, in all; 0: do not wait"
    )
    send_timeout: float = Field(
        60, gt=0, description="seconds a client may keep a response waiting by not reading it"
    )
    header_timeout: float = Field(
        10, gt=0, description="seconds a connection has to send a request's headers"
    )
    keepalive_timeout: float = Field(5, gt=0, description="seconds an idle connection stays open")
    max_connections: int = Field(
        4096, ge=16, description="open client connections; idle ones are closed first past it"
    )
    stop_grace: float = Field(30, ge=0, description="seconds an engine gets to stop")
    access_log: bool = False

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _no_empty_keys(cls, keys: list[Any]) -> list[Any]:
        if any(isinstance(key, str) and not key.strip() for key in keys):
            raise ValueError("an API key is empty (is the variable it comes from set?)")
        return keys

    @field_validator("database")
    @classmethod
    def _known_database(cls, database: str) -> str:
        if database != "sqlite" and not database.startswith(("postgresql://", "postgres://")):
            raise ValueError("expected sqlite or a postgresql://user@host/db URL")
        return database

    @property
    def api_key_secrets(self) -> list[str]:
        return [key if isinstance(key, str) else key.key for key in self.api_keys]

    def key_names(self) -> list[str]:
        """Each config key's name: its own, or key-N (N: its place in the list) for a string."""
        return [
            f"key-{i}" if isinstance(key, str) else key.name for i, key in enumerate(self.api_keys)
        ]

    @field_validator("metrics_token")
    @classmethod
    def _empty_token_is_none(cls, token: str | None) -> str | None:
        return token if token and token.strip() else None  # `${TOKEN:-}` left unset: open

    @field_validator("state_dir")
    @classmethod
    def _expand(cls, path: Path) -> Path:
        return path.expanduser()

    @model_validator(mode="after")
    def _keys_or_explicitly_open(self) -> "GatewayConfig":
        if not self.api_keys and not self.allow_unauthenticated:
            raise ValueError(
                'api_keys is empty: add a key (e.g. "${ENGINEGATE_API_KEY}") '
                "or set allow_unauthenticated: true"
            )
        if set(self.admin_keys) & set(self.api_key_secrets):
            raise ValueError("admin_keys and api_keys share a key; an admin key must be its own")
        names = self.key_names()
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"api_keys: two keys are named {twice[0]}; names must differ")
        if len(set(self.api_key_secrets)) != len(self.api_keys):
            raise ValueError("api_keys: the same key is listed twice")
        return self


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gateway: GatewayConfig
    models: list[ModelSpec] = Field(min_length=1)
    cluster: ClusterSpec | None = Field(None, description="a Ray cluster to place the engines on")
    # Environment variables the file read secrets from: engines are started without them.
    _secret_env: frozenset[str] = PrivateAttr(default=frozenset())
    _path: Path | None = PrivateAttr(default=None)  # the file it was read from

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def secret_env(self) -> frozenset[str]:
        return self._secret_env


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> Config:
    """Read, interpolate and validate a config file, or raise ConfigError."""
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(file, [f"cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(file, [f"not valid YAML: {_yaml_problem(exc)}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(file, ["expected a mapping with `gateway:` and `models:` at the top"])
    problems: list[str] = []
    read: set[tuple[str, str]] = set()  # (variable, the key path it was read into)
    environ = environ if environ is not None else dict(os.environ)
    data = _interpolate(data, environ, "", problems, read)
    if problems:
        raise ConfigError(file, problems)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(file, [_describe(error) for error in exc.errors()]) from None
    problems = _allow_list_problems(config)
    if problems:
        raise ConfigError(file, problems)
    secrets = {name for name, path in read if _is_secret(path)}
    config._secret_env = frozenset(secrets)
    config._path = Path(path).resolve()
    return config


def _allow_list_problems(config: Config) -> list[str]:
    known = {m.name for m in config.models} | {a for m in config.models for a in m.aliases}
    problems = []
    for i, key in enumerate(config.gateway.api_keys):
        if isinstance(key, ApiKeyEntry):
            for pattern in unknown_models(tuple(key.models or ()) or None, known):
                problems.append(
                    f"gateway.api_keys[{i}].models: `{pattern}` names no configured model "
                    f"(models: {', '.join(sorted(known))})"
                )
    return problems


def _is_secret(path: str) -> bool:
    return any(re.search(rf"(^|\.){key}(\[|$)", path) for key in _SECRET_KEYS)


def plan_workers(
    config: Config, file: str, gpu_count: int | None = None, cpu_cores: list[int] | None = None
) -> list[Slot]:
    """Place every replica, or raise ConfigError naming the key at fault."""
    needs_gpus = any(m.needs_gpus for m in config.models)
    if gpu_count is None:
        gpu_count = count_gpus() if needs_gpus else 0
    try:
        return plan(config.models, gpu_count, cpu_cores or available_cores())
    except PlacementError as exc:
        raise ConfigError(file, [str(exc)]) from None


def key_path(loc: tuple[int | str, ...]) -> str:
    """('models', 1, 'tp') → 'models[1].tp'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(error: Any) -> str:
    path = key_path(tuple(p for p in error["loc"] if p not in _TAGS)) or "(top level)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if error["type"] == "missing":
        return f"{path}: required, missing"
    value = error.get("input")
    if any(secret in path for secret in _SECRET_KEYS) or isinstance(value, dict | list):
        return f"{path}: {message}"
    return f"{path}: {message} (got {value!r})"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, without PyYAML's quote of the line: that line may hold an API key."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return type(exc).__name__
    mark = exc.problem_mark
    context = f"{exc.context}: " if exc.context else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {context}{exc.problem}"


def _interpolate(
    node: Any, environ: dict[str, str], path: str, problems: list[str], read: set[tuple[str, str]]
) -> Any:
    if isinstance(node, dict):
        return {
            k: _interpolate(v, environ, f"{path}.{k}" if path else str(k), problems, read)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [
            _interpolate(v, environ, f"{path}[{i}]", problems, read) for i, v in enumerate(node)
        ]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        if match.group(1) == "$":
            return "$"  # `$$` is a literal dollar
        name, default = match.group(2), match.group(3)
        read.add((name, path))
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        problems.append(
            f"{path}: ${{{name}}} is not set (write ${{{name}:-default}} for a default)"
        )
        return ""

    return _VAR.sub(substitute, node)
