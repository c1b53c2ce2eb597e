"""Server configuration: a dataclass read from a TOML file, overridden by command-line flags."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurestore.toml_file import read_toml
from server.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS


class ConfigError(Exception):
    """A configuration file or flag is wrong; the message names the key and the file."""


@dataclass
class ServerConfig:
    """Everything `featureserve serve` needs; defaults are the embedded single-machine setup."""

    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = Path("data")
    model_repo: Path = Path("models")
    metrics_port: int = 0
    max_message_bytes: int = 64 * 1024 * 1024
    grace_seconds: float = 10.0
    log_level: str = "INFO"
    log_format: str = "json"
    event_loop: str = DEFAULT_EVENT_LOOP
    max_concurrent_rpcs: int = 0
    lmdb_map_bytes: int = 1 << 30
    lmdb_max_dbs: int = 4096
    max_entities_per_request: int = 100_000
    max_rows_per_write: int = 100_000
    max_clock_skew_seconds: int = 300
    warm_store_seconds: float = 30.0
    watch_model_repo: bool = True
    model_poll_interval_s: float = 1.0
    model_control_mode: str = "poll"
    """Triton's --model-control-mode: "poll" follows the folder (watch_model_repo,
    model_poll_interval_s) and takes RepositoryModelLoad/Unload; "explicit" loads
    startup_models, then changes only on those RPCs; "none" loads every model once, for good.
    Under --workers N, explicit and none keep one model state for the group
    (server/model_control.py): a load or unload changes every worker, and a worker started again
    serves what the group loaded, never files changed since."""
    startup_models: list[str] = field(default_factory=list)
    """Triton's --load-model: the models explicit mode loads at start-up; ["*"] = every one."""
    history_retention_seconds: int = 0
    """History rows older than this are compacted away (featurestore.history_retention);
    0 keeps them all."""
    history_compaction_interval_seconds: float = 3600.0
    response_cache_bytes: int = 0
    """Bytes of model outputs the response cache holds for the models whose config.toml sets
    response_cache = true (Triton's --cache-config local,size=...); 0 = no cache."""
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    config_dir: Path | None = None
    """The --config file's folder: relative [tls] paths are read from there."""

    @property
    def address(self) -> str:
        """host:port to bind."""
        return host_port(self.host, self.port)


def host_port(host: str, port: int) -> str:
    """host:port as gRPC and its clients read it: an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


MODEL_CONTROL_MODES = ("poll", "explicit", "none")
POLL, EXPLICIT, NONE = MODEL_CONTROL_MODES
ALL_MODELS = "*"
NAME_MAX_BYTES = 255
"""The longest folder name Linux file systems take (NAME_MAX)."""

_PATH_KEYS = {"data_dir", "model_repo"}
_SECTIONS = ("auth", "tls", "audit", "trace")
_NOT_KEYS = ("extra", "config_dir")  # set from the file's sections and place, not as keys
_CHOICES = {
    "event_loop": tuple(EVENT_LOOPS),
    "log_format": ("json", "text"),
    "model_control_mode": MODEL_CONTROL_MODES,
}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_PORT_KEYS = {"port": "0 picks a free port", "metrics_port": "0 turns /metrics off"}
_BETWEEN = {
    "lmdb_max_dbs": (3, 32768, "1 database for the registry plus 2 per view version"),
    "max_message_bytes": (1, 2**31 - 1, "gRPC's largest message"),
    "history_retention_seconds": (0, 100 * 365 * 86400, "0 keeps all; at most 100 years"),
    "response_cache_bytes": (0, 2**40, "0 = no response cache; at most 1 TiB"),
}
"""Inclusive bounds. gRPC's message limits are C ints. LMDB sizes every transaction (each
lookup opens one) by max_dbs: measured here, ~0.5 µs per 1000 slots per read transaction
(2 µs at 4096, 17 µs at 32768)."""
_AT_LEAST = {
    "lmdb_map_bytes": 1,
    "max_entities_per_request": 1,
    "max_rows_per_write": 1,
    "grace_seconds": 0,
    "max_concurrent_rpcs": 0,
    "max_clock_skew_seconds": 0,
    "warm_store_seconds": 0,
    "model_poll_interval_s": 0.05,
    "history_compaction_interval_seconds": 1.0,
}
"""Lower bounds: below them a server would start and then refuse or mishandle every request
(or, for model_poll_interval_s, keep a core busy polling the model repository)."""


def _check_range(name: str, value: Any, source: str) -> None:
    """Refuse a port outside 0-65535 or a limit outside its bounds, naming the key."""
    if name in _PORT_KEYS and not 0 <= value <= 65535:
        raise ConfigError(f"{source}: key '{name}' is {value}; use 0-65535 ({_PORT_KEYS[name]})")
    if name in _BETWEEN:
        low, high, meaning = _BETWEEN[name]
        if not low <= value <= high:
            raise ConfigError(f"{source}: key '{name}' is {value}; use {low}-{high} ({meaning})")
    low = _AT_LEAST.get(name)
    if low is not None and value < low:
        raise ConfigError(f"{source}: key '{name}' is {value}; it must be at least {low}")


def model_name_problem(name: str) -> str:
    """Why `name` is not the name of one folder directly in a model repository ("" when it is),
    so that no model name ever reaches a file outside the repository."""
    if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES:
        return f"a folder name has at most {NAME_MAX_BYTES} bytes (UTF-8)"
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        return (
            "give the name of a folder directly in the model repository, which is not empty, "
            "'.' or '..' and has no '/'"
        )
    return ""


def _startup_models(value: Any, source: str) -> list[str]:
    """startup_models as a list of model names, or ["*"] alone (Triton refuses --load-model=*
    beside other names too)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{source}: key 'startup_models' must be a list of model names, such as "
            '["ranker", "fraud"], or ["*"] for every model'
        )
    if ALL_MODELS in value and len(value) > 1:
        raise ConfigError(
            f'{source}: key \'startup_models\' lists "*" beside other names; give ["*"] alone '
            "to load every model, or the names alone"
        )
    for name in value:
        problem = model_name_problem(name) if name != ALL_MODELS else ""
        if problem:
            raise ConfigError(
                f"{source}: key 'startup_models' lists {name[:80]!r}, which is not a model "
                f"name: {problem}"
            )
    return list(dict.fromkeys(value))


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a TOML or flag value to the field's type, naming the key on failure."""
    template = ServerConfig.__dataclass_fields__[name].default
    if name in _PATH_KEYS:
        return Path(value)
    if name == "startup_models":
        return _startup_models(value, source)
    expected = type(template)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(
            f"{source}: key '{name}' must be {expected.__name__}, got {type(value).__name__}"
        )
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{source}: key '{name}' is {value}; use a finite number")
    if name == "host" and value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    choices = _CHOICES.get(name)
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{source}: key '{name}' is {value!r}; use one of {', '.join(map(repr, choices))}"
        )
    if name == "log_level" and value.upper() not in _LOG_LEVELS:
        raise ConfigError(
            f"{source}: key 'log_level' is {value!r}; use one of {', '.join(_LOG_LEVELS)}"
        )
    _check_range(name, value, source)
    return value


def load_config(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    section_overrides: dict[str, dict[str, Any]] | None = None,
) -> ServerConfig:
    """Read `path` (a TOML file whose top-level keys are ServerConfig fields) and apply overrides
    (section_overrides: keys of a section's table, such as the --trace-* flags' [trace] keys;
    the section's parser checks them at start-up).

    Unknown keys are an error naming the key and the file, so a typo never silently
    falls back to a default.
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    extra: dict[str, dict[str, Any]] = {}
    if path is not None:
        source = str(path)
        raw = read_toml(
            Path(path), "config file", "give --config a readable TOML file", ConfigError
        )
        server_keys = raw.pop("server", {})
        if not isinstance(server_keys, dict):
            raise ConfigError(f"{source}: [server] must be a table")
        for section in _SECTIONS:
            if section in raw:
                extra[section] = raw.pop(section)
                if not isinstance(extra[section], dict):
                    raise ConfigError(f"{source}: [{section}] must be a table, not a value")
        raw.update(server_keys)
        for key, value in raw.items():
            if key not in ServerConfig.__dataclass_fields__ or key in _NOT_KEYS:
                raise ConfigError(f"{source}: unknown key '{key}'")
            values[key] = _coerce(key, value, source)
            origins[key] = source
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, "command line")
            origins[key] = "command line"
    config = dataclasses.replace(ServerConfig(), **values)
    if config.metrics_port != 0 and config.metrics_port == config.port:
        raise ConfigError(
            f"{origins['metrics_port']}: key 'metrics_port' is {config.metrics_port}, the same as "
            "'port'; give /metrics another port, or 0 to turn it off"
        )
    if config.startup_models and config.model_control_mode != EXPLICIT:
        raise ConfigError(
            f"{origins['startup_models']}: key 'startup_models' is given while "
            f"'model_control_mode' is {config.model_control_mode!r}"
            f"{' (the default)' if 'model_control_mode' not in origins else ''}: only explicit "
            "mode loads a chosen set at start-up (poll and none load every model); set "
            'model_control_mode = "explicit" (--model-control-mode explicit) or drop '
            "startup_models (--load-model)"
        )
    for section, keys in (section_overrides or {}).items():
        given = {key: value for key, value in keys.items() if value is not None}
        if given:
            extra[section] = {**extra.get(section, {}), **given}
    config.extra = extra
    config.config_dir = Path(path).parent if path is not None else None
    return config
