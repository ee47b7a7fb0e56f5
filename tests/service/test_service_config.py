"""Daemon config loading/validation, broker URLs, and the reply store (no broker)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from edge_runtime.config import ServiceConfig, default_state_dir, load_config
from edge_runtime.errors import ConfigError
from edge_runtime.mqtt_connection import parse_broker_url, read_password_file
from edge_runtime.reply_store import ReplyStore, request_key

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "config.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


MINIMAL = """
[model]
bundle = "bundle"
[mqtt]
broker = "mqtt://127.0.0.1:1883"
device_id = "dev1"
"""


def test_example_config_loads():
    config = load_config(EXAMPLE, check_files=False)
    assert isinstance(config, ServiceConfig)
    assert config.mqtt.device_id == "jetson-01" and config.mqtt.protocol == "5"
    assert config.mqtt.client_id == "edge-runtime-jetson-01"
    assert config.mqtt.address.tls and config.mqtt.address.port == 8883
    assert config.limits.queue_depth == 8 and config.service.log_content is False
    assert config.model.bundle == Path("/opt/edge-runtime/bundles/codellama-7b-instruct-int4")
    # a stop drains the running request: its deadline must end before systemd's TimeoutStopSec= kills it
    unit = (EXAMPLE.parents[1] / "systemd" / "edge-runtime.service").read_text()
    stop_s = int(next(line for line in unit.splitlines() if line.startswith("TimeoutStopSec=")).split("=")[1])
    assert config.limits.max_deadline_ms < stop_s * 1000


def test_example_config_names_every_serve_flag_that_overrides_it():
    """The example's header lists the `serve` flags that override its keys: each of them
    (serve_flags.SERVE_FLAGS, and --log-level), and no other (--allow-cpu-fallback and --policy
    were missing)."""
    import re

    from edge_runtime.serve_flags import SERVE_FLAGS

    header = EXAMPLE.read_text(encoding="utf-8").split("override the")[0]
    listed = re.findall(r"--[a-z-]+", header.split("Flags given to `serve` (", 1)[1])
    assert sorted(listed) == sorted([*SERVE_FLAGS.values(), "--log-level"])


def test_defaults_and_relative_paths(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), check_files=False)
    assert config.model.bundle == tmp_path / "bundle"  # relative to the file
    assert config.model.profile is None and config.mqtt.fleet_group is None
    assert (config.mqtt.keepalive, config.mqtt.session_expiry_s) == (30, 86400)
    assert config.limits.max_deadline_ms >= config.limits.default_deadline_ms
    assert config.service.log_level == "INFO"


@pytest.mark.parametrize("profile, expected", [
    ("board.toml", "{dir}/board.toml"),  # a TOML file beside the config: relative to the config's folder
    ("profiles/board.toml", "{dir}/profiles/board.toml"),
    ("/opt/board.toml", "/opt/board.toml"),
    ("cpu-x86_64", "cpu-x86_64"),  # a packaged profile's name stays a name
])
def test_a_profile_file_in_the_config_is_relative_to_the_config(tmp_path, profile, expected):
    """Under systemd the working directory is /: a profile named by a relative path in
    /etc/edge-runtime/config.toml is the file beside it, as every other path there."""
    config = load_config(write(tmp_path, MINIMAL.replace("[mqtt]", f'profile = "{profile}"\n[mqtt]')),
                         check_files=False)
    assert config.model.profile == expected.format(dir=tmp_path)


def test_flags_override_the_file(tmp_path):
    overrides = {"mqtt.device_id": "other", "model": {"profile": "cpu-x86_64"}, "mqtt.broker": None,
                 "model.bundle": Path("rel"), "service.log_content": True, "limits.queue_depth": 2}
    config = load_config(write(tmp_path, MINIMAL), overrides, check_files=False)
    assert config.mqtt.device_id == "other" and config.model.profile == "cpu-x86_64"
    assert config.mqtt.broker == "mqtt://127.0.0.1:1883"  # None = flag not given
    assert config.model.bundle == Path("rel")  # flags are relative to the current directory
    assert config.service.log_content is True and config.limits.queue_depth == 2


def test_allow_cpu_fallback_from_the_file_or_the_serve_flag(tmp_path):
    import argparse

    from edge_runtime.serve_flags import add_serve_arguments, serve_overrides

    assert load_config(write(tmp_path, MINIMAL), check_files=False).model.allow_cpu_fallback is None  # the profile's
    path = write(tmp_path, MINIMAL.replace("[model]", "[model]\nallow_cpu_fallback = false"))
    assert load_config(path, check_files=False).model.allow_cpu_fallback is False
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    flags = serve_overrides(parser.parse_args(["--allow-cpu-fallback"]))
    assert load_config(path, flags, check_files=False).model.allow_cpu_fallback is True
    assert load_config(path, serve_overrides(parser.parse_args([])), check_files=False).model.allow_cpu_fallback \
        is False


def test_flags_only():
    config = load_config(None, {"model.bundle": "/b", "mqtt.broker": "mqtt://h", "mqtt.device_id": "d"},
                         check_files=False)
    assert config.mqtt.address.port == 1883


@pytest.mark.parametrize("extra, key", [
    ('[mqtt]\nbroker = "tcp://h:1"\ndevice_id = "d"', "mqtt.broker"),
    ('[mqtt]\nbroker = "mqtt://u:p@h:1"\ndevice_id = "d"', "mqtt.broker"),
    ('[mqtt]\nbroker = "mqtt://h:99999"\ndevice_id = "d"', "mqtt.broker"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "a/b"', "mqtt.device_id"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "fleet"', "mqtt.device_id"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"\nfleet_group = "a+b"', "mqtt.fleet_group"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"\nprotocol = "4"', "mqtt.protocol"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"\nprotocol = 5', "mqtt.protocol"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"\nkeepalive = "30"', "mqtt.keepalive"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"\nkeepalive = 1', "mqtt.keepalive"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"\npassword = "hunter2"', "mqtt.password"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"\npassword_file = "p"', "mqtt.password_file"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"\ntls_ca = "ca.crt"', "mqtt.tls_ca"),
    ('[mqtt]\nbroker = "mqtts://h"\ndevice_id = "d"\ntls_cert = "c.crt"', "mqtt.tls_key"),
    ('[mqtt]\ndevice_id = "d"', "mqtt.broker"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"\n[limits]\nqueue_depth = 0', "limits.queue_depth"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"\n[limits]\ndefault_deadline_ms = 10\nmax_deadline_ms = 5',
     "limits.default_deadline_ms"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"\n[service]\nlog_level = "LOUD"', "service.log_level"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"\n[service]\nlog_content = "yes"', "service.log_content"),
    ('[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"\n[extra]\nx = 1', "extra"),
    ('bundle_sha256 = "ABC"\n[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"', "model.bundle_sha256"),
    ('prompt_cache = "everyone"\n[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"', "model.prompt_cache"),
    ('prompt_cache = true\n[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"', "model.prompt_cache"),
    ('prompt_lookup = "yes"\n[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"', "model.prompt_lookup"),
])
def test_errors_name_the_key(tmp_path, extra, key):
    path = write(tmp_path, '[model]\nbundle = "b"\n' + extra + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=False)
    assert f"{path}: {key}" in str(info.value)


def test_missing_model_section(tmp_path):
    with pytest.raises(ConfigError, match="model: missing key"):
        load_config(write(tmp_path, '[mqtt]\nbroker = "mqtt://h"\ndevice_id = "d"\n'), check_files=False)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[model\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_override_error_names_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: mqtt.broker"):
        load_config(write(tmp_path, MINIMAL), {"mqtt.broker": "ftp://x"}, check_files=False)


def test_file_checks(tmp_path):
    (tmp_path / "bundle").mkdir()
    base = {"service.state_dir": str(tmp_path / "state")}
    config = load_config(write(tmp_path, MINIMAL), base)
    assert (tmp_path / "state").is_dir()
    assert config.service.resolved_state_dir == tmp_path / "state"
    with pytest.raises(ConfigError, match="model.bundle"):
        load_config(write(tmp_path, MINIMAL), {**base, "model.bundle": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="mqtt.password_file"):
        load_config(write(tmp_path, MINIMAL), {**base, "mqtt.username": "u",
                                               "mqtt.password_file": str(tmp_path / "nope")})
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="service.state_dir"):
            load_config(write(tmp_path, MINIMAL), {"service.state_dir": str(ro / "state")})
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="service.state_dir"):
        load_config(write(tmp_path, MINIMAL), {"service.state_dir": str(blocker / "state")})


def test_a_tls_file_that_holds_no_certificate_is_named_at_start_up(tmp_path):
    """What paho would only find at connect (after the bundle load): a CA file, or a client
    certificate and key, that cannot be used."""
    (tmp_path / "bundle").mkdir()
    (tmp_path / "ca.crt").write_text("not a certificate\n")
    base = {"service.state_dir": str(tmp_path / "state"), "mqtt.broker": "mqtts://h:8883"}
    with pytest.raises(ConfigError, match=r"mqtt\.tls_ca .*ca\.crt: not a PEM CA certificate"):
        load_config(write(tmp_path, MINIMAL), {**base, "mqtt.tls_ca": str(tmp_path / "ca.crt")})
    with pytest.raises(ConfigError, match=r"mqtt\.tls_cert .* with mqtt\.tls_key .*: not a PEM certificate"):
        load_config(write(tmp_path, MINIMAL), {**base, "mqtt.tls_cert": str(tmp_path / "ca.crt"),
                                               "mqtt.tls_key": str(tmp_path / "ca.crt")})


def test_password_file(tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "pw").write_text("s3cret\nignored\n")
    config = load_config(write(tmp_path, MINIMAL), {"mqtt.username": "u", "mqtt.password_file": str(tmp_path / "pw"),
                                                    "service.state_dir": str(tmp_path / "s")})
    assert config.mqtt.read_password() == "s3cret"
    assert read_password_file(tmp_path / "pw") == "s3cret"
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize("content, words", [(b"\xff\xfe\x00pw\n", "is not UTF-8 text"),
                                             (b"", "holds no password"), (b"\nsecret\n", "holds no password")])
def test_a_password_file_without_a_password_is_named_at_start_up(tmp_path, content, words):
    """Not after the bundle load (a traceback), nor as the broker's 'not authorized' at every retry."""
    (tmp_path / "bundle").mkdir()
    (tmp_path / "pw").write_bytes(content)
    with pytest.raises(ConfigError, match=f"mqtt.password_file: .*pw {words}"):
        load_config(write(tmp_path, MINIMAL), {"mqtt.username": "u", "mqtt.password_file": str(tmp_path / "pw"),
                                               "service.state_dir": str(tmp_path / "s")})


def test_an_empty_path_is_refused_not_taken_for_the_current_folder(tmp_path):
    (tmp_path / "bundle").mkdir()
    with pytest.raises(ConfigError, match="command line: service.state_dir: an empty path"):
        load_config(write(tmp_path, MINIMAL), {"service.state_dir": ""})
    with pytest.raises(ConfigError, match="model.bundle: an empty path"):
        load_config(write(tmp_path, MINIMAL.replace('bundle = "bundle"', 'bundle = ""')), {})
    with pytest.raises(ConfigError, match="model.profile: an empty path"):
        load_config(write(tmp_path, MINIMAL), {"model.profile": " "})
    assert not any(tmp_path.glob("*.lock")) and not any(Path.cwd().glob("replies-*.sqlite3"))


def test_default_state_dir():
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/edge-runtime:/other"}) == Path("/var/lib/edge-runtime")
    assert default_state_dir({"XDG_STATE_HOME": "/x"}) == Path("/x/edge-runtime")
    assert default_state_dir({}) == Path.home() / ".local" / "state" / "edge-runtime"


def test_broker_urls():
    a = parse_broker_url("mqtt://example.org")
    assert (a.host, a.port, a.tls) == ("example.org", 1883, False)
    a = parse_broker_url("mqtts://10.0.0.1:8884/")
    assert (a.host, a.port, a.tls, a.url) == ("10.0.0.1", 8884, True, "mqtts://10.0.0.1:8884")
    assert parse_broker_url("mqtt://[::1]:1883").url == "mqtt://[::1]:1883"
    assert parse_broker_url("mqtt://[fe80::1%eth0]:1883").host == "fe80::1%eth0"  # link-local, with its zone
    for bad in ("example.org:1883", "http://h", "mqtt://", "mqtt://h/path", "mqtt://h:port"):
        with pytest.raises(ValueError):
            parse_broker_url(bad)
    for bad in ("mqtt://exa mple.com", "mqtt://exa%20mple.com:1883", "mqtt://h\x00x"):
        with pytest.raises(ValueError, match="broker URL has an invalid host"):
            parse_broker_url(bad)


def test_why_a_broker_cannot_be_reached_is_said():
    from edge_runtime.mqtt_connection import why_unreachable

    assert "does not resolve" in why_unreachable(parse_broker_url("mqtt://no-such-host.invalid"))
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert why_unreachable(parse_broker_url(f"mqtt://127.0.0.1:{port}")) == \
        f"no TCP connection to port {port}: Connection refused"
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        assert "TLS handshake failed" in why_unreachable(parse_broker_url(f"mqtts://127.0.0.1:{port}"))


# ------------------------------------------------------------------ reply store


def test_reply_store_persists_and_is_bounded(tmp_path):
    path = tmp_path / "state" / "replies.sqlite3"
    with ReplyStore(path, max_entries=3) as store:
        for i in range(5):
            store.put(request_key("t", f"r{i}"), f"payload {i}".encode())
        store.put(request_key("t", "r4"), b"replaced")
        assert store.get(request_key("t", "r0")) is None and len(store) == 3
        assert store.get(request_key("t", "r4")) == b"replaced"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with ReplyStore(path, max_entries=3) as store:  # a new process sees the same replies
        assert [store.get(request_key("t", f"r{i}")) for i in range(2, 5)] == [b"payload 2", b"payload 3",
                                                                             b"replaced"]
        assert request_key("t", "r2") in store and request_key("other", "r2") not in store
    with ReplyStore(path, max_entries=1) as store:  # shrinking the bound prunes the oldest
        assert len(store) == 1 and store.get(request_key("t", "r4")) == b"replaced"
    with pytest.raises(RuntimeError):
        store.put("k", b"v")
