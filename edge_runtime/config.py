"""Daemon configuration: typed frozen dataclasses loaded once from a TOML file
plus overrides (command-line flags win over the file), validated at start-up
with errors that name the dotted key.

    [model]    bundle, profile, check_memory, allow_cpu_fallback, bundle_sha256, prompt_cache,
               prompt_lookup, copy_weights
    [mqtt]     broker, device_id, fleet_group, username, password_file,
               tls_ca, tls_cert, tls_key, protocol, keepalive, session_expiry_s
    [limits]   max_payload_bytes, max_prompt_chars, max_tokens, queue_depth,
               default_deadline_ms, max_deadline_ms
    [service]  state_dir, log_content, log_level
    [policy]   file (the operator's safety policy, see edge_runtime/policy.py)

See docs/config.example.toml. Relative paths in the file are relative to the
file's directory; relative paths given as overrides are relative to the current
directory. The MQTT password is never part of the configuration: only the path
of a file holding it (`mqtt.password_file`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from .errors import ConfigError
from .log_output import LOG_LEVELS
from .mqtt_connection import BrokerAddress, TlsFiles, check_tls_files, parse_broker_url, read_password_file
from .native_paths import text_path
from .profiles import is_profile_path
from .protocol import FLEET_LEVEL, Topics, validate_name
from .types import PROMPT_CACHE_SCOPES
from .typed_toml import InvalidField, at_least, between, from_mapping, matches, parse_toml

# Keys holding paths: made absolute against the config file's directory.
PATH_KEYS = (("model", "bundle"), ("mqtt", "password_file"), ("mqtt", "tls_ca"),
             ("mqtt", "tls_cert"), ("mqtt", "tls_key"), ("service", "state_dir"), ("policy", "file"))


@dataclass(frozen=True)
class ModelConfig:
    bundle: Path  # the bundle directory (required)
    profile: str | None = None  # device profile name or TOML file; None: the bundle's own
    # Refuse to start when weights + KV cache at the context limit + overhead exceed the
    # profile's memory budget (memory_fit.py). false: start anyway (the estimate is conservative).
    check_memory: bool = True
    # A GPU profile whose GPU provider is missing: true runs on the CPU provider (said in the
    # log and the status), false refuses to start; unset: the profile's allow_cpu_fallback.
    allow_cpu_fallback: bool | None = None
    # The SHA-256 of the bundle's bundle.json (`edge-runtime verify` prints it): pins the
    # exact bundle, manifest included (bundle.json lists every other file's SHA-256).
    bundle_sha256: Optional[Annotated[str, matches(r"[0-9a-f]{64}", "64 lowercase hex digits")]] = None
    # Whose previous request a request may reuse the keys and values of, for the start its prompt
    # shares with it (a chat's next turn): types.PROMPT_CACHE_SCOPES.
    prompt_cache: Literal[PROMPT_CACHE_SCOPES] = "client"
    # Requests draft tokens from their own context and verify them in one run (prompt_lookup.py):
    # fewer decode steps where the answer repeats the context; greedy the same tokens, sampled the
    # same distribution.
    prompt_lookup: bool = True
    # Copy the weights into the daemon's own memory at load instead of mapping the bundle's
    # weights file (onnxruntime's default): a weights file rewritten or cut short under the
    # running daemon (an in-place `cp`) then changes nothing, where mapped it changes the answers
    # or kills the daemon with SIGBUS. It can cost memory: a weight used in place from the mapped
    # file (page cache) is then a copy in the daemon's own memory.
    copy_weights: bool = False


@dataclass(frozen=True)
class MqttConfig:
    broker: str  # mqtt://HOST:PORT or mqtts://HOST:PORT (required)
    device_id: str  # one topic level: edge/<device_id>/v1/... (required)
    fleet_group: str | None = None  # also take requests from $share/<group>/edge/fleet/v1/generate
    username: str | None = None
    password_file: Path | None = None  # first line is the password
    tls_ca: Path | None = None  # mqtts: CA bundle (default: the system's)
    tls_cert: Path | None = None  # mqtts: client certificate (with tls_key)
    tls_key: Path | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive: Annotated[int, between(5, 3600)] = 30
    session_expiry_s: Annotated[int, between(1, 2**32 - 1)] = 86400

    def __post_init__(self) -> None:
        try:
            address = parse_broker_url(self.broker)
        except ValueError as exc:
            raise InvalidField("broker", str(exc)) from None
        try:
            validate_name(self.device_id, "device_id")
        except ValueError as exc:
            raise InvalidField("device_id", str(exc)) from None
        if self.device_id == FLEET_LEVEL:
            raise InvalidField("device_id", f"{FLEET_LEVEL!r} is reserved for the fleet topics")
        if self.fleet_group is not None:
            try:
                validate_name(self.fleet_group, "fleet_group")
            except ValueError as exc:
                raise InvalidField("fleet_group", str(exc)) from None
        if self.password_file is not None and self.username is None:
            raise InvalidField("password_file", "needs mqtt.username")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidField("tls_cert" if self.tls_cert is None else "tls_key",
                               "tls_cert and tls_key go together")
        if not address.tls:
            for name in ("tls_ca", "tls_cert", "tls_key"):
                if getattr(self, name) is not None:
                    raise InvalidField(name, f"is set but broker {self.broker!r} is not mqtts://")

    @property
    def address(self) -> BrokerAddress:
        return parse_broker_url(self.broker)

    @property
    def client_id(self) -> str:
        """The daemon's fixed client id (its persistent session)."""
        return f"edge-runtime-{self.device_id}"

    @property
    def topics(self) -> Topics:
        return Topics(self.device_id)

    @property
    def tls(self) -> TlsFiles:
        def s(p: Path | None) -> str | None:
            return str(p) if p is not None else None
        return TlsFiles(ca=s(self.tls_ca), cert=s(self.tls_cert), key=s(self.tls_key))

    def read_password(self) -> str | None:
        return read_password_file(self.password_file) if self.password_file is not None else None


@dataclass(frozen=True)
class LimitsConfig:
    max_payload_bytes: Annotated[int, at_least(256)] = 256 * 1024
    max_prompt_chars: Annotated[int, at_least(1)] = 64 * 1024
    max_tokens: Annotated[int, at_least(1)] = 2048
    queue_depth: Annotated[int, between(1, 10_000)] = 8
    default_deadline_ms: Annotated[int, at_least(1)] = 120_000
    max_deadline_ms: Annotated[int, at_least(1)] = 600_000

    def __post_init__(self) -> None:
        if self.default_deadline_ms > self.max_deadline_ms:
            raise InvalidField("default_deadline_ms",
                               f"{self.default_deadline_ms} exceeds max_deadline_ms {self.max_deadline_ms}")


@dataclass(frozen=True)
class ServiceSection:
    # None: $STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/edge-runtime, else
    # ~/.local/state/edge-runtime. Holds the reply store (which contains generated text).
    state_dir: Path | None = None
    log_content: bool = False  # log prompts and generated text (off: ids, counts, timings only)
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        level = self.log_level.upper()
        if level not in LOG_LEVELS:
            raise InvalidField("log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        object.__setattr__(self, "log_level", level)

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else default_state_dir()

    @property
    def log_level_number(self) -> int:
        return logging.getLevelName(self.log_level)


@dataclass(frozen=True)
class PolicySection:
    file: Path | None = None  # a policy TOML (rules, per-client limits, classifier, audit); None: no policy


@dataclass(frozen=True)
class ServiceConfig:
    model: ModelConfig
    mqtt: MqttConfig
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    service: ServiceSection = field(default_factory=ServiceSection)
    policy: PolicySection = field(default_factory=PolicySection)


SERVICE_STATE_DIR = Path("/var/lib/edge-runtime")  # the installed unit's StateDirectory=edge-runtime


def default_state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$STATE_DIRECTORY (set by systemd's StateDirectory=), else the XDG state dir; ConfigError
    where there is none (no $HOME and a user without a home)."""
    state = environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0])
    xdg = environ.get("XDG_STATE_HOME")
    # a relative one is invalid and ignored (the XDG Base Directory spec): it would put the reply
    # store wherever the daemon was started from
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "edge-runtime"
    try:
        home = Path.home()
    except RuntimeError:  # no $HOME, and a user id the user database lacks (`docker run --user 12345`)
        raise ConfigError(f"service.state_dir: no default state directory: $HOME is unset and user id {os.getuid()} "
                          "has no home in the user database; set [service] state_dir (serve --state-dir), or "
                          "$HOME or $XDG_STATE_HOME") from None
    return home / ".local" / "state" / "edge-runtime"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any], prefix: str = "") -> None:
    for key, value in overrides.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if value is None:
            continue
        if isinstance(value, Mapping):
            _apply_overrides(data, value, dotted)
        else:
            _set_dotted(data, dotted, str(value) if isinstance(value, Path) else value)


def _resolve_file_paths(data: dict[str, Any], base: Path) -> None:
    for section, key in PATH_KEYS:
        table = data.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str) and table[key].strip():
            path = Path(text_path(table[key])).expanduser()
            table[key] = str(path if path.is_absolute() else base / path)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("profile"), str) and is_profile_path(model["profile"]):
        path = Path(text_path(model["profile"])).expanduser()  # a TOML file, not a packaged profile's name
        model["profile"] = str(path if path.is_absolute() else base / path)


def load_config(path: Path | str | None, overrides: Mapping[str, Any] | None = None, *,
                check_files: bool = True) -> ServiceConfig:
    """Load `path` (TOML; None: flags only), apply `overrides`, validate.

    `overrides` holds dotted keys (``{"mqtt.broker": "mqtt://h:1883"}``) or nested
    tables (``{"mqtt": {"broker": ...}}``); None values are ignored, so argparse
    results can be passed as they are. With `check_files`, the files the config
    names (bundle directory, password file, TLS files) must exist and the state
    directory must be creatable and writable. Raises `ConfigError` naming the key.
    """
    data: dict[str, Any] = {}
    sources = []
    if path is not None:
        path = Path(path)
        sources.append(str(path))
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read file: {exc.strerror or exc}") from exc
        data = parse_toml(raw, source=str(path))
        _resolve_file_paths(data, path.resolve().parent)
    if overrides:
        before = repr(data)
        _apply_overrides(data, overrides)
        if repr(data) != before:
            sources.append("command line")
    source = " + ".join(sources) or "command line"
    for section, key in (*PATH_KEYS, ("model", "profile")):  # "" would quietly be the current folder
        table = data.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str) and not table[key].strip():
            raise ConfigError(f"{source}: {section}.{key}: an empty path (leave the key out for its default)")
    config = from_mapping(ServiceConfig, data, source=source)
    if check_files:
        check_config_files(config, source=source)
    return config


def check_config_files(config: ServiceConfig, *, source: str = "config") -> None:
    """Start-up checks that touch the filesystem (ConfigError naming the key)."""
    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: {message}")

    if not config.model.bundle.is_dir():
        raise fail("model.bundle", f"{config.model.bundle} is not a directory")
    for key in ("password_file", "tls_ca", "tls_cert", "tls_key"):
        p = getattr(config.mqtt, key)
        if p is not None:
            if not p.is_file():
                raise fail(f"mqtt.{key}", f"{p} is not a readable file")
            try:
                with open(p, "rb"):
                    pass
            except OSError as exc:
                raise fail(f"mqtt.{key}", f"cannot read {p}: {exc.strerror or exc}") from None
    if config.mqtt.password_file is not None:  # before the (slow) bundle load, not at the first connect
        try:
            config.mqtt.read_password()
        except ValueError as exc:
            raise fail("mqtt.password_file", str(exc)) from None
    if config.mqtt.address.tls:  # what paho loads at connect: a file that holds no certificate fails here
        try:
            check_tls_files(config.mqtt.tls, names=("mqtt.tls_ca", "mqtt.tls_cert", "mqtt.tls_key"))
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    if config.policy.file is not None and not config.policy.file.is_file():
        raise fail("policy.file", f"{config.policy.file} is not a readable file")
    state_dir = config.service.resolved_state_dir
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise fail("service.state_dir", f"cannot create {state_dir}: {exc.strerror or exc}") from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise fail("service.state_dir", f"{state_dir} is not writable")
