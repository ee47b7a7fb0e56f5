"""The flags of `edge-runtime serve`, and the config keys they set: each flag overrides its
key of the --config file (`config.load_config`), and a missing key's error names the flag
that gives it."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from .config import ServiceConfig
from .errors import ConfigError


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `edge-runtime serve` (they override the --config file)."""
    parser.add_argument("--config", help="TOML config file (see docs/config.example.toml)")
    parser.add_argument("--bundle", help="bundle directory ([model] bundle)")
    parser.add_argument("--profile", help="device profile ([model] profile; default: the bundle's)")
    parser.add_argument("--allow-cpu-fallback", action="store_true", default=None,
                        help="run a GPU profile on the CPU provider when its GPU provider is missing, instead of "
                             "refusing to start ([model] allow_cpu_fallback; default: the profile's)")
    parser.add_argument("--copy-weights", action="store_true", default=None,
                        help="copy the weights into the daemon's memory at load instead of mapping the bundle's "
                             "weights file, so a file overwritten under the running daemon changes nothing "
                             "([model] copy_weights)")
    parser.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT ([mqtt] broker)")
    parser.add_argument("--device-id", help="device id ([mqtt] device_id)")
    parser.add_argument("--fleet-group", help="also serve $share/GROUP/edge/fleet/v1/generate ([mqtt] fleet_group)")
    parser.add_argument("--protocol", choices=["5", "3.1.1"], help="MQTT version ([mqtt] protocol; default 5)")
    parser.add_argument("--state-dir", help="reply store directory ([service] state_dir)")
    parser.add_argument("--log-content", action="store_true", default=None,
                        help="log prompts and generated text ([service] log_content)")
    parser.add_argument("--policy", help="operator safety policy TOML ([policy] file; see docs/policy.md)")


# config key -> the serve flag that sets it
SERVE_FLAGS = {"model.bundle": "--bundle", "model.profile": "--profile",
               "model.allow_cpu_fallback": "--allow-cpu-fallback", "model.copy_weights": "--copy-weights",
               "mqtt.broker": "--broker",
               "mqtt.device_id": "--device-id", "mqtt.fleet_group": "--fleet-group", "mqtt.protocol": "--protocol",
               "service.state_dir": "--state-dir", "service.log_content": "--log-content", "policy.file": "--policy"}


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides from the serve flags (unset flags are None and ignored)."""
    return {key: getattr(args, flag[2:].replace("-", "_"), None) for key, flag in SERVE_FLAGS.items()}


def missing_key_hint(error: ConfigError) -> str:
    """A config error's message, with the serve flags that give the key when it is a missing
    one (a missing table: the flags of its required keys)."""
    if error.problem != "missing key" or not error.key:
        return str(error)
    if "." not in error.key:  # a whole table: no --config, or one without it
        table = typing.get_type_hints(ServiceConfig).get(error.key)
        required = [f"{error.key}.{f.name}" for f in dataclasses.fields(table)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING] \
            if dataclasses.is_dataclass(table) else []
        flags = [f"{SERVE_FLAGS[k]} {k.split('.')[1].upper()}" for k in required if k in SERVE_FLAGS]
        if not flags:
            return str(error)
        return f"{error} (give {' and '.join(flags)}, or a [{error.key}] table in --config FILE)"
    flag = SERVE_FLAGS.get(error.key)
    if flag is None:
        return str(error)
    section, name = error.key.split(".")
    return f"{error} (give {flag}, or {name} in the [{section}] table of --config FILE)"
