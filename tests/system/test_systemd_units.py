"""The systemd side of a device: the units in systemd/ (verified by systemd-analyze,
with the hardening the service needs), the sd_notify protocol and watchdog of
edge_runtime/sdnotify.py against a datagram socket the test owns, the unit's
seccomp sandbox reproduced around a real onnxruntime run, and
`edge-runtime install-service` into a temporary root.

No systemd PID 1 is needed: `systemd-analyze verify/security --offline` read unit
files only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from edge_runtime import install_service as svc
from edge_runtime.sdnotify import SystemdNotifier, Watchdog

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
UNIT = SYSTEMD / "edge-runtime.service"
GPU_DROPIN = SYSTEMD / "edge-runtime-gpu.conf"
SAMPLE_CONFIG = SYSTEMD / "config.toml"
TOKENIZER_JSON = REPO / "export" / "assets" / "codellama-tokenizer.json"
# Exposure scores measured with systemd 252 (systemd/README.md); lower is better.
CPU_SCORE_LIMIT = 1.2
GPU_SCORE_LIMIT = 1.6


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: apt-get install -y systemd", pytrace=False)
    return path


def parse_unit(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values in order (systemd allows repeated keys)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


@pytest.fixture
def unit_dir(tmp_path) -> Path:
    """A copy of the unit whose ExecStart= names an executable that exists here (verify
    checks that), with the GPU drop-in beside it in edge-runtime.service.d/."""
    fake = tmp_path / "bin" / "edge-runtime"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    (units / "edge-runtime.service").write_text(svc.render_unit(fake))
    return units


def add_dropin(units: Path) -> None:
    (units / "edge-runtime.service.d").mkdir()
    shutil.copy(GPU_DROPIN, units / "edge-runtime.service.d" / "gpu.conf")


def analyze(units: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{units}:", SYSTEMD_LOG_LEVEL="notice")
    return subprocess.run([systemd_analyze(), *args], capture_output=True, text=True, env=env, timeout=60)


def exposure(units: Path) -> tuple[float, str]:
    result = analyze(units, "security", "--offline=yes", "--no-pager", str(units / "edge-runtime.service"))
    match = re.search(r"Overall exposure level for edge-runtime\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1)), result.stdout


# -- the unit files ---------------------------------------------------------------------------
def test_unit_verifies_cleanly(unit_dir):
    result = analyze(unit_dir, "verify", "--man=no", str(unit_dir / "edge-runtime.service"))
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_unit_with_gpu_dropin_verifies_cleanly_and_is_merged(unit_dir):
    add_dropin(unit_dir)
    result = analyze(unit_dir, "verify", "--man=no", str(unit_dir / "edge-runtime.service"))
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    score, report = exposure(unit_dir)
    assert "/dev/nvmap:rw" in report and "char-nvidia*:rw" in report  # the drop-in's DeviceAllow=
    assert score <= GPU_SCORE_LIMIT, report


def test_cpu_unit_exposure_score_does_not_regress(unit_dir):
    score, report = exposure(unit_dir)
    assert score <= CPU_SCORE_LIMIT, report


def test_unit_has_the_required_directives():
    unit = parse_unit(UNIT.read_text())
    expected = {
        "Service.Type": ["notify"], "Service.NotifyAccess": ["main"], "Service.KillSignal": ["SIGTERM"],
        "Service.Restart": ["on-failure"], "Service.User": ["edge-runtime"],
        "Service.StateDirectory": ["edge-runtime"], "Service.ConfigurationDirectory": ["edge-runtime"],
        "Service.NoNewPrivileges": ["yes"], "Service.ProtectSystem": ["strict"], "Service.ProtectHome": ["yes"],
        "Service.PrivateTmp": ["yes"], "Service.PrivateDevices": ["yes"],
        "Service.RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
        "Service.SystemCallArchitectures": ["native"], "Service.CapabilityBoundingSet": [""],
        "Service.AmbientCapabilities": [""], "Service.ProtectKernelTunables": ["yes"],
        "Service.ProtectKernelModules": ["yes"], "Service.ProtectKernelLogs": ["yes"],
        "Service.ProtectControlGroups": ["yes"], "Service.ProtectClock": ["yes"],
        "Service.ProtectHostname": ["yes"], "Service.ProtectProc": ["invisible"],
        "Service.RestrictNamespaces": ["yes"], "Service.RestrictRealtime": ["yes"],
        "Service.RestrictSUIDSGID": ["yes"], "Service.LockPersonality": ["yes"],
        "Service.MemoryDenyWriteExecute": ["yes"], "Service.UMask": ["0077"],
        "Install.WantedBy": ["multi-user.target"],
    }
    for key, value in expected.items():
        assert unit.get(key) == value, f"{key}: {unit.get(key)}"
    assert unit["Service.SystemCallFilter"][0] == "@system-service"
    assert unit["Service.ExecStart"] == [f"{svc.DEFAULT_EXECUTABLE} serve --config /etc/edge-runtime/config.toml"]
    assert set(unit["Unit.After"][0].split()) >= {"network-online.target", "mosquitto.service"}
    # ordered after a local broker, never starting one a remote-broker device has disabled
    assert unit["Unit.Wants"] == ["network-online.target"]
    watchdog_s = int(unit["Service.WatchdogSec"][0])
    assert 10 <= watchdog_s <= 120
    # Long enough to finish a request the sample config allows, and to load a bundle.
    assert int(unit["Service.TimeoutStopSec"][0]) * 1000 > 240_000
    assert int(unit["Service.TimeoutStartSec"][0]) >= 120


def test_gpu_dropin_opens_the_nvidia_devices():
    dropin = parse_unit(GPU_DROPIN.read_text())
    assert dropin["Service.SupplementaryGroups"] == ["video render"]
    assert dropin["Service.PrivateDevices"] == ["no"]
    assert dropin["Service.DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in dropin["Service.DeviceAllow"]}
    assert {"char-nvidia*", "char-drm", "/dev/nvmap", "/dev/nvhost-ctrl", "/dev/nvhost-ctrl-gpu",
            "/dev/nvhost-prof-gpu", "/dev/nvgpu/igpu0/ctrl"} <= allowed


def test_sample_config_is_a_valid_daemon_config():
    from edge_runtime.config import load_config

    config = load_config(SAMPLE_CONFIG, check_files=False)
    assert config.mqtt.address.tls
    assert config.mqtt.device_id == config.mqtt.username  # the ACL's identity convention
    # A drain finishes the longest request before TimeoutStopSec= runs out.
    stop_s = int(parse_unit(UNIT.read_text())["Service.TimeoutStopSec"][0])
    assert config.limits.max_deadline_ms < stop_s * 1000


# -- sd_notify ---------------------------------------------------------------------------------
@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield path, sock
    sock.close()


def datagrams(sock: socket.socket, wait: float) -> list[str]:
    """Every datagram that arrives within `wait` seconds."""
    out = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append(sock.recv(4096).decode())
        except socket.timeout:
            break
    return out


def test_notifier_sends_ready_status_stopping_and_watchdog(notify_socket):
    path, sock = notify_socket
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = SystemdNotifier.from_environment(env)
    assert notifier.enabled and notifier.watchdog_interval_s == 15.0
    assert notifier.ready(status="model demo, queue 0/8")
    assert sock.recv(4096).decode() == "READY=1\nSTATUS=model demo, queue 0/8"
    assert notifier.status("queue 1/8\nbusy")
    assert sock.recv(4096).decode() == "STATUS=queue 1/8 busy"  # one line
    assert notifier.watchdog_ping()
    assert sock.recv(4096).decode() == "WATCHDOG=1"
    assert notifier.extend_timeout(90)
    assert sock.recv(4096).decode() == "EXTEND_TIMEOUT_USEC=90000000"
    assert notifier.stopping()
    assert sock.recv(4096).decode() == "STOPPING=1"
    notifier.close()


def test_a_slow_bundle_load_extends_the_start_timeout_within_its_budget(notify_socket, tiny_bundle):
    from edge_runtime.bundle import load_time_budget_s
    from edge_runtime.sdnotify import StartExtender

    path, sock = notify_socket
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": str(path)})
    with StartExtender(notifier, budget_s=0.35, interval_s=0.1) as extender:
        time.sleep(0.8)  # a load that takes longer than the budget: the extensions stop at it
    sent = datagrams(sock, 0.3)
    assert sent and set(sent) == {"EXTEND_TIMEOUT_USEC=300000"} and 2 <= len(sent) <= 4, sent
    assert extender.extensions == len(sent)
    with StartExtender(notifier, budget_s=10, interval_s=0.1):
        pass  # a quick load asks for nothing
    assert datagrams(sock, 0.3) == []
    # the budget: the bundle read twice at 10 MB/s
    size = sum(f.stat().st_size for f in tiny_bundle.iterdir() if f.name != "bundle.json")
    assert load_time_budget_s(tiny_bundle) == pytest.approx(2 * size / 10e6, rel=1e-6)
    assert load_time_budget_s(tiny_bundle.parent / "no-such-bundle") == 0.0
    notifier.close()


def test_ready_comes_when_serving_or_after_the_grace_without_the_broker(notify_socket):
    """Broker up: READY=1 when the daemon serves, and the grace sends nothing more. Broker
    down: READY=1 after the grace, saying it waits for the broker, then the serving line as
    STATUS= once it connects: the service is active, not restarted at TimeoutStartSec."""
    from edge_runtime.sdnotify import ReadyAnnouncer

    path, sock = notify_socket
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": str(path)})
    up = ReadyAnnouncer(notifier, 0.2, lambda: "waiting for the broker").start()
    up.serving("serving demo")
    assert datagrams(sock, 0.5) == ["READY=1\nSTATUS=serving demo"]
    down = ReadyAnnouncer(notifier, 0.2, lambda: "waiting for the broker").start()
    assert datagrams(sock, 0.5) == ["READY=1\nSTATUS=waiting for the broker"]
    down.serving("serving demo")
    assert datagrams(sock, 0.3) == ["STATUS=serving demo"]
    stopped = ReadyAnnouncer(notifier, 0.2, lambda: "waiting for the broker").start()
    stopped.stop()  # the daemon stopped before the grace ran out
    assert datagrams(sock, 0.4) == []
    notifier.close()


def test_notifier_uses_the_abstract_namespace(tmp_path):
    name = f"edge-runtime-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"


def test_notifier_is_a_noop_outside_systemd(tmp_path):
    notifier = SystemdNotifier.from_environment({})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert not notifier.ready() and not notifier.watchdog_ping() and not notifier.stopping()
    watchdog = Watchdog(notifier, lambda: True, notifier.watchdog_interval_s).start()
    assert not watchdog.running
    watchdog.stop()
    # A socket that is gone: the send fails quietly (False), never raises.
    gone = SystemdNotifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    assert gone.enabled and not gone.ready()


def test_watchdog_belongs_to_the_main_pid_only():
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert SystemdNotifier.from_environment(env).watchdog_interval_s is None
    env.pop("WATCHDOG_PID")
    assert SystemdNotifier.from_environment(env).watchdog_interval_s == 0.5
    env["WATCHDOG_USEC"] = "nonsense"
    assert SystemdNotifier.from_environment(env).watchdog_interval_s is None


def test_watchdog_pings_while_healthy_and_stops_when_the_worker_hangs(notify_socket):
    path, sock = notify_socket
    notifier = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval_s == 0.05
    healthy = threading.Event()
    healthy.set()
    watchdog = Watchdog(notifier, healthy.is_set, notifier.watchdog_interval_s)
    with watchdog:
        assert watchdog.running
        pings = datagrams(sock, 0.4)
        assert len(pings) >= 4 and set(pings) == {"WATCHDOG=1"}
        healthy.clear()  # the generation worker is stuck
        time.sleep(0.1)  # a ping already in flight may still land
        datagrams(sock, 0.01)
        assert datagrams(sock, 0.4) == []
        healthy.set()  # it recovered before systemd's WatchdogSec= ran out
        assert "WATCHDOG=1" in datagrams(sock, 0.3)
    assert not watchdog.running
    datagrams(sock, 0.06)
    assert datagrams(sock, 0.2) == []  # stopped for good


def test_watchdog_treats_a_raising_check_as_unhealthy(notify_socket):
    path, sock = notify_socket
    notifier = SystemdNotifier(str(path), watchdog_usec=100000)

    def broken() -> bool:
        raise RuntimeError("worker state unreadable")

    with Watchdog(notifier, broken, 0.05):
        assert datagrams(sock, 0.3) == []


# -- the sandbox, reproduced -----------------------------------------------------------------
# A 1x4 @ 4x4-identity MatMul, serialized with onnx (opset 13, IR 8).
TINY_ONNX_HEX = (
    "08083a8d010a110a01780a017712017922064d61744d756c1201742a4b08040804100122400000803f000000000000"
    "000000000000000000000000803f000000000000000000000000000000000000803f0000000000000000000000000000"
    "00000000803f4201775a130a0178120e0a0c080112080a0208010a02080462130a0179120e0a0c080112080a0208010a"
    "02080442040a00100d")

SANDBOX_PROBE = textwrap.dedent(r'''
    """Apply the unit's seccomp rules like systemd does (before exec), then run the
    device stack. argv: setup|run, JSON parameters."""
    import ctypes, ctypes.util, errno, json, mmap, os, socket, sys

    params = json.loads(sys.argv[2])
    if sys.argv[1] == "setup":
        lib = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)

        class Cmp(ctypes.Structure):
            _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                        ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(Cmp)]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        ALLOW, EQ, GT, MASKED_EQ = 0x7FFF0000, 4, 6, 7
        errno_action = lambda e: 0x00050000 | e

        def load(default, rules):
            ctx = lib.seccomp_init(default)
            assert ctx, "seccomp_init failed"
            for name, action, cmps in rules:
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr < 0:
                    continue  # not a syscall of this architecture
                arr = (Cmp * max(1, len(cmps)))(*[Cmp(*c) for c in cmps])
                rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
                assert rc == 0, (name, rc)
            assert lib.seccomp_load(ctx) == 0, "seccomp_load failed"

        # MemoryDenyWriteExecute=yes
        W, X, SHM_EXEC = mmap.PROT_WRITE, mmap.PROT_EXEC, 0o100000
        load(ALLOW, [("mmap", errno_action(errno.EPERM), [(2, MASKED_EQ, W | X, W | X)]),
                     ("mprotect", errno_action(errno.EPERM), [(2, MASKED_EQ, X, X)]),
                     ("pkey_mprotect", errno_action(errno.EPERM), [(2, MASKED_EQ, X, X)]),
                     ("shmat", errno_action(errno.EPERM), [(2, MASKED_EQ, SHM_EXEC, SHM_EXEC)])])
        # RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
        families = [socket.AF_UNIX, socket.AF_INET, socket.AF_INET6]
        denied = [f for f in range(max(families)) if f not in families]
        load(ALLOW, [("socket", errno_action(errno.EAFNOSUPPORT), [(0, EQ, f, 0)]) for f in denied]
             + [("socket", errno_action(errno.EAFNOSUPPORT), [(0, GT, max(families), 0)])])
        # SystemCallFilter=@system-service ~@privileged, SystemCallErrorNumber=EPERM; last,
        # since it denies seccomp() itself.
        load(errno_action(errno.EPERM), [(n, ALLOW, []) for n in params["allowed"]])
        os.execv(sys.executable, [sys.executable, sys.argv[0], "run", sys.argv[2]])

    # -- under the sandbox: first show it is in force...
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("writable+executable memory was allowed")
    except PermissionError:
        pass
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        sys.exit("AF_NETLINK was allowed")
    except OSError as exc:
        assert exc.errno == errno.EAFNOSUPPORT, exc
    try:
        os.setuid(os.getuid())  # in @privileged
        sys.exit("setuid was allowed")
    except PermissionError:
        pass

    # ...then run what the daemon runs.
    import numpy as np
    import onnxruntime as ort
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from tokenizers import Tokenizer
    from edge_runtime.sdnotify import SystemdNotifier

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2  # a thread pool, pinned to cores by onnxruntime
    session = ort.InferenceSession(bytes.fromhex(params["model_hex"]), options,
                                   providers=["CPUExecutionProvider"])
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    y = session.run(None, {"x": x})[0]
    assert np.array_equal(y, x), y
    a = np.random.default_rng(0).standard_normal((256, 256))
    assert np.allclose(a @ np.linalg.inv(a), np.eye(256), atol=1e-6)
    ids = Tokenizer.from_file(params["tokenizer"]).encode("def fib(n):").ids
    assert len(ids) > 2, ids

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("localhost", params["port"])
    client.loop_start()
    info = client.publish("edge/sandbox/v1/status", "online", qos=1)
    info.wait_for_publish(10)
    assert info.is_published()
    client.disconnect()
    client.loop_stop()

    assert SystemdNotifier(params["notify_socket"]).ready(status="sandbox ok")
    print("sandbox ok")
''')


def _syscall_group(name: str, seen: set[str] | None = None) -> set[str]:
    out = subprocess.run([systemd_analyze(), "syscall-filter", name], capture_output=True, text=True,
                         check=True).stdout
    seen = seen if seen is not None else set()
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not line.startswith(" ") or not item or item.startswith("#"):
            continue
        if item.startswith("@"):
            if item not in seen:
                seen.add(item)
                calls |= _syscall_group(item, seen)
        else:
            calls.add(item)
    return calls


def test_the_device_stack_runs_under_the_units_seccomp_sandbox(broker, notify_socket, tmp_path):
    """SystemCallFilter=, MemoryDenyWriteExecute= and RestrictAddressFamilies= of the
    unit, applied as seccomp filters before exec (as systemd does): onnxruntime
    (threads, affinity), numpy, tokenizers, paho over TCP and sd_notify all work."""
    path, sock = notify_socket
    unit = parse_unit(UNIT.read_text())
    filters = unit["Service.SystemCallFilter"]
    assert filters == ["@system-service", "~@privileged"], "update this test with the unit"
    assert unit["Service.SystemCallErrorNumber"] == ["EPERM"]
    allowed = sorted(_syscall_group("@system-service") - _syscall_group("@privileged"))
    import ctypes.util

    if ctypes.util.find_library("seccomp") is None:
        pytest.fail("libseccomp is missing: apt-get install -y libseccomp2", pytrace=False)
    probe = tmp_path / "sandbox_probe.py"
    probe.write_text(SANDBOX_PROBE)
    params = {"allowed": allowed, "model_hex": TINY_ONNX_HEX, "tokenizer": str(TOKENIZER_JSON),
              "port": broker.port, "notify_socket": str(path)}
    result = subprocess.run([sys.executable, str(probe), "setup", json.dumps(params)], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sandbox ok" in result.stdout
    assert sock.recv(4096).decode() == "READY=1\nSTATUS=sandbox ok"


# -- install-service ---------------------------------------------------------------------------
EXE = "/opt/edge-runtime/venv/bin/edge-runtime"


class FakeRun:
    """Records commands; `useradd --prefix ROOT` adds the user to ROOT/etc/passwd."""

    def __init__(self, enabled: bool = False, active: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.enabled = enabled
        self.active = active
        self.need_reload = False

    def __call__(self, argv, **kwargs):
        self.calls.append(list(argv))
        if argv[0] == "useradd" and "--prefix" in argv:
            root = Path(argv[argv.index("--prefix") + 1])
            with open(root / "etc" / "passwd", "a") as f:
                f.write(f"{argv[-1]}:x:999:999::/var/lib/edge-runtime:/usr/sbin/nologin\n")
        stdout = "enabled\n" if argv[:2] == ["systemctl", "is-enabled"] and self.enabled else "disabled\n"
        if argv[:3] == ["systemctl", "show", "--property=NeedDaemonReload"]:
            stdout = "yes\n" if self.need_reload else "no\n"
        if argv[:2] == ["systemctl", "is-active"]:
            stdout = "active\n" if self.active else "inactive\n"
        return subprocess.CompletedProcess(argv, 0, stdout=stdout, stderr="")


@pytest.fixture
def image_root(tmp_path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\nvideo:x:44:\nrender:x:105:\n")
    exe = root / EXE.lstrip("/")  # the image's venv: --executable must name a program in the tree
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/opt/edge-runtime/venv/bin/python\n")
    exe.chmod(0o755)
    return root


def write_bundle(bundle: Path, profile: str = "jetson-orin-nano") -> Path:
    """A bundle that passes `load_bundle` (every file listed with its size and SHA-256)."""
    from edge_runtime.bundle import FORMAT_NAME, MANIFEST_NAME, SUPPORTED_FORMAT_VERSIONS, sha256_file

    (bundle / "tokenizer").mkdir(parents=True, exist_ok=True)
    (bundle / "model.onnx").write_bytes(bytes.fromhex(TINY_ONNX_HEX))
    (bundle / "model.onnx.data").write_bytes(bytes(range(256)) * 16)
    (bundle / "tokenizer" / "tokenizer.json").write_text("{}")
    files = [{"path": name, "size": (bundle / name).stat().st_size, "sha256": sha256_file(bundle / name)}
             for name in ("model.onnx", "model.onnx.data", "tokenizer/tokenizer.json")]
    (bundle / MANIFEST_NAME).write_text(json.dumps({
        "format": FORMAT_NAME, "format_version": SUPPORTED_FORMAT_VERSIONS[-1], "files": files,
        "graph": {"flavour": "optimum-kv-concat", "file": "model.onnx"},
        "tokenizer": {"file": "tokenizer/tokenizer.json", "supports_infill": False, "chat_format": "llama2"},
        "architecture": {"num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "head_dim": 8, "hidden_size": 32,
                         "vocab_size": 64, "rope_theta": 10000.0, "max_position_embeddings": 256},
        "context_limit": 256, "precision": "fp32", "profile": {"name": profile}, "source": {"name": "demo"}}))
    return bundle


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    from edge_runtime.bundle import load_bundle

    bundle = write_bundle(tmp_path / "codellama-demo")
    assert load_bundle(bundle).profile_name == "jetson-orin-nano"
    return bundle


@pytest.fixture
def cpu_bundle_dir(tmp_path) -> Path:
    return write_bundle(tmp_path / "codellama-cpu", profile="cpu-x86_64")




def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_install_service_into_a_root_then_again_changes_nothing(image_root, bundle_dir):
    run = FakeRun()
    first = svc.install_service("nvidia-gpu", bundle_dir, root=image_root, run=run, executable=EXE)
    text = "\n".join(first)
    assert run.calls and run.calls[0][:2] == ["useradd", "--prefix"]
    assert "--system" in run.calls[0] and "/usr/sbin/nologin" in run.calls[0]
    assert all(call[0] != "systemctl" for call in run.calls)  # not the live system
    for expected in ("user edge-runtime: created", "/etc/systemd/system/edge-runtime.service: installed",
                     "/etc/systemd/system/edge-runtime.service.d/gpu.conf: installed",
                     "bundle /opt/edge-runtime/bundles/codellama-demo: copied",
                     "/etc/edge-runtime/config.toml: installed", "systemctl: skipped"):
        assert expected in text, text

    unit = (image_root / svc.UNIT_FILE).read_text()
    assert f"ExecStart={EXE} serve --config /etc/edge-runtime/config.toml" in unit
    assert (image_root / svc.GPU_DROPIN_FILE).read_text() == GPU_DROPIN.read_text()
    installed = image_root / "opt/edge-runtime/bundles/codellama-demo"
    assert (installed / "model.onnx").read_bytes() == (bundle_dir / "model.onnx").read_bytes()
    assert oct((installed / "model.onnx").stat().st_mode & 0o777) == "0o644"
    assert oct(installed.stat().st_mode & 0o777) == "0o755"
    from edge_runtime.config import load_config

    config = load_config(image_root / svc.CONFIG_FILE, check_files=False)
    assert config.model.bundle == Path("/opt/edge-runtime/bundles/codellama-demo")
    assert config.model.profile == "nvidia-gpu"

    before = snapshot(image_root)
    run_again = FakeRun()
    second = svc.install_service("nvidia-gpu", bundle_dir, root=image_root, run=run_again, executable=EXE)
    assert run_again.calls == []
    assert snapshot(image_root) == before
    assert second[-1] == "nothing to do: everything is already installed", second
    assert not any(": installed" in s or "created" in s or "copied" in s for s in second), second


def test_install_service_keeps_an_edited_config_and_follows_the_profile(image_root, bundle_dir):
    svc.install_service("jetson-orin-nano", bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    config = image_root / svc.CONFIG_FILE
    config.write_text(config.read_text().replace('device_id = "device-01"', 'device_id = "jetson-7"'))
    edited = config.read_text()
    steps = svc.install_service("cpu-arm64", None, root=image_root, run=FakeRun(), executable=EXE)
    assert config.read_text() == edited
    assert any("config.toml: exists, not overwritten" in s for s in steps), steps
    # A CPU profile takes the GPU drop-in away again (and its now empty folder).
    assert not (image_root / svc.GPU_DROPIN_FILE).exists()
    assert not (image_root / svc.GPU_DROPIN_FILE).parent.exists()
    assert any("gpu.conf: removed (CPU profile)" in s for s in steps), steps
    # ...and says that the kept config still runs the other profile, and what to change.
    assert any(s.startswith("warning: /etc/edge-runtime/config.toml keeps [model] profile = \"jetson-orin-nano\", "
                            "not \"cpu-arm64\"") and 'Set profile = "cpu-arm64"' in s for s in steps), steps


def test_install_service_takes_the_profile_from_the_bundle(image_root, bundle_dir):
    svc.install_service(None, bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    assert (image_root / svc.GPU_DROPIN_FILE).is_file()  # bundle.json names jetson-orin-nano


def test_install_service_leaves_out_groups_the_system_lacks(image_root):
    (image_root / "etc" / "group").write_text("root:x:0:\nvideo:x:44:\n")
    steps = svc.install_service("nvidia-gpu", None, root=image_root, run=FakeRun(), executable=EXE)
    dropin = parse_unit((image_root / svc.GPU_DROPIN_FILE).read_text())
    assert dropin["Service.SupplementaryGroups"] == ["video"]
    assert any("group render does not exist" in s for s in steps)


def test_install_service_dry_run_changes_nothing(image_root, bundle_dir):
    before = snapshot(image_root)
    run = FakeRun()
    steps = svc.install_service("nvidia-gpu", bundle_dir, root=image_root, run=run, executable=EXE, dry_run=True)
    assert run.calls == [] and snapshot(image_root) == before
    assert any("would install" in s for s in steps) and steps[-1] == "dry run: nothing was changed"


def test_install_service_on_a_live_systemd_enables_without_starting(monkeypatch):
    monkeypatch.setattr(svc, "_systemd_running", lambda: True)
    run = FakeRun()
    program = "/bin/sh"  # one that exists here (--executable is checked on the live system)
    steps = svc.install_service("cpu-x86_64", None, root=Path("/"), run=run, executable=program, dry_run=True)
    assert run.calls == [["systemctl", "is-enabled", "edge-runtime"]]  # read-only in a dry run
    assert "systemctl enable edge-runtime: would run it" in steps
    run = FakeRun(enabled=True)
    steps = svc.install_service("cpu-x86_64", None, root=Path("/"), run=run, executable=program, dry_run=True)
    assert "systemctl enable edge-runtime: already enabled, skipped" in steps


def test_a_rerun_after_an_install_stopped_before_daemon_reload_reloads(image_root, monkeypatch):
    """The first run wrote the units and stopped (a bundle copy that failed, Ctrl-C) before
    `systemctl daemon-reload`: the rerun writes nothing new, and systemd still holds the old
    unit; its NeedDaemonReload says so, and the rerun reloads."""
    svc.install_service("cpu-x86_64", None, root=image_root, run=FakeRun(), executable=EXE)
    monkeypatch.setattr(svc, "_is_live", lambda root: True)
    monkeypatch.setattr(svc, "_systemd_running", lambda: True)
    monkeypatch.setattr(svc.os, "geteuid", lambda: 0)
    run = FakeRun(enabled=True)
    run.need_reload = True
    steps = svc.install_service("cpu-x86_64", None, root=image_root, run=run, executable=EXE)
    assert ["systemctl", "daemon-reload"] in run.calls
    assert "systemctl daemon-reload (systemd held older unit files): done" in steps
    run = FakeRun(enabled=True)
    steps = svc.install_service("cpu-x86_64", None, root=image_root, run=run, executable=EXE)
    assert ["systemctl", "daemon-reload"] not in run.calls
    assert "systemctl daemon-reload: skipped (no unit file changed)" in steps


def test_a_profile_given_as_a_file_is_installed_where_the_service_reads_it(image_root, tmp_path, monkeypatch):
    """`--profile ./orin-custom.toml`: under systemd the working directory is / and ProtectHome
    hides the operator's home, so the profile is copied to /etc/edge-runtime/profiles and the
    config names that copy by its absolute path."""
    from edge_runtime.config import load_config
    from edge_runtime.profiles import load_profile, profile_text

    mine = tmp_path / "home" / "orin-custom.toml"
    mine.parent.mkdir()
    mine.write_text(profile_text("jetson-orin-nano").replace("intra_op_threads = ", "intra_op_threads = 3 # "))
    monkeypatch.chdir(mine.parent)
    steps = svc.install_service("./orin-custom.toml", None, root=image_root, run=FakeRun(), executable=EXE)
    installed = image_root / "etc/edge-runtime/profiles/orin-custom.toml"
    assert installed.read_text() == mine.read_text()
    config = (image_root / svc.CONFIG_FILE).read_text()
    assert 'profile = "/etc/edge-runtime/profiles/orin-custom.toml"' in config
    assert load_profile(installed).intra_op_threads == 3
    assert (image_root / svc.GPU_DROPIN_FILE).exists()  # a Jetson profile: the GPU drop-in
    assert any("etc/edge-runtime/profiles/orin-custom.toml" in step for step in steps)
    assert load_config(image_root / svc.CONFIG_FILE, {"mqtt.device_id": "d"}, check_files=False).model.profile == \
        "/etc/edge-runtime/profiles/orin-custom.toml"
    again = svc.install_service("./orin-custom.toml", None, root=image_root, run=FakeRun(), executable=EXE)
    assert again[-1] == "nothing to do: everything is already installed", again


def test_the_service_user_joins_a_group_of_its_name_left_by_an_earlier_userdel(image_root):
    """`userdel edge-runtime` keeps the group while it has other members; `useradd --user-group`
    would then fail, so the user is made with that group."""
    with open(image_root / "etc/group", "a") as f:
        f.write("edge-runtime:x:998:admin\n")
    run = FakeRun()
    svc.install_service("cpu-x86_64", None, root=image_root, run=run, executable=EXE)
    useradd = next(argv for argv in run.calls if argv[0] == "useradd")
    assert "--user-group" not in useradd and useradd[useradd.index("--gid") + 1] == "edge-runtime"


def test_install_service_refuses_what_the_sandbox_would_hide(image_root, bundle_dir):
    from edge_runtime.errors import BundleError, ConfigError

    with pytest.raises(ConfigError, match="ProtectHome"):
        svc.install_service(None, None, root=image_root, run=FakeRun(), executable="/home/me/venv/bin/edge-runtime")
    with pytest.raises(ConfigError, match="unknown device profile"):
        svc.install_service("no-such-profile", None, root=image_root, run=FakeRun(), executable=EXE)
    (bundle_dir / "bundle.json").unlink()
    with pytest.raises(BundleError, match="not a bundle folder"):
        svc.install_service(None, bundle_dir, root=image_root, run=FakeRun(), executable=EXE)


def test_install_service_command_line(image_root, bundle_dir, capsys):
    parser = argparse.ArgumentParser()
    svc.add_arguments(parser)
    args = parser.parse_args(["--profile", "cpu-x86_64", "--bundle", str(bundle_dir), "--root", str(image_root),
                              "--executable", EXE, "--dry-run"])
    assert svc.run_install_service(args) == 0
    out = capsys.readouterr().out
    assert "/etc/systemd/system/edge-runtime.service: would install it" in out
    args = parser.parse_args(["--profile", "bogus", "--root", str(image_root), "--executable", EXE])
    assert svc.run_install_service(args) == 2
    assert "error: unknown device profile" in capsys.readouterr().err


def test_install_service_refuses_a_bundle_that_fails_verification(image_root, bundle_dir, capsys):
    """One byte flipped in the external data: refused with the daemon's own message
    (`load_bundle`), before anything is changed; a dry run lists the plan, then fails."""
    from edge_runtime.bundle import load_bundle
    from edge_runtime.errors import BundleError

    data = bundle_dir / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError) as daemon:
        load_bundle(bundle_dir)
    assert "model.onnx.data: SHA-256 does not match" in str(daemon.value)

    before = snapshot(image_root)
    run = FakeRun()
    with pytest.raises(BundleError) as refused:
        svc.install_service("nvidia-gpu", bundle_dir, root=image_root, run=run, executable=EXE)
    assert str(refused.value) == str(daemon.value)
    assert run.calls == [] and snapshot(image_root) == before  # no user, unit or copy

    parser = argparse.ArgumentParser()
    svc.add_arguments(parser)
    args = parser.parse_args(["--bundle", str(bundle_dir), "--root", str(image_root), "--executable", EXE])
    assert svc.run_install_service(args) == 2
    out, err = capsys.readouterr()
    assert f"bundle {bundle_dir}: verifying the size and SHA-256 of its 3 files" in out
    assert "copied" not in out and err == f"error: {daemon.value}\n"
    assert snapshot(image_root) == before

    with pytest.raises(svc.DryRunRefused) as dry:
        svc.install_service("nvidia-gpu", bundle_dir, root=image_root, run=run, executable=EXE, dry_run=True)
    assert "/etc/systemd/system/edge-runtime.service: would install it" in dry.value.steps
    assert any(s.startswith("warning: a real run would stop here: model.onnx.data: SHA-256") for s in dry.value.steps)
    assert "bundle /opt/edge-runtime/bundles/codellama-demo: would refuse to copy it (see the warning above)" \
        in dry.value.steps
    assert run.calls == [] and snapshot(image_root) == before


def test_install_service_refuses_a_bundle_whose_manifest_changes_while_it_is_verified(image_root, bundle_dir,
                                                                                     monkeypatch):
    """bundle.json rewritten between the installer's first read and the verification (a copy
    still being written): refused, nothing installed, rather than describing one manifest and
    installing another."""
    import edge_runtime.bundle
    from edge_runtime.errors import BundleError

    verify = edge_runtime.bundle.load_bundle

    def rewritten_meanwhile(path, **kwargs):
        manifest = Path(path) / "bundle.json"
        manifest.write_text(manifest.read_text() + "\n")
        return verify(path, **kwargs)

    monkeypatch.setattr(edge_runtime.bundle, "load_bundle", rewritten_meanwhile)
    before = snapshot(image_root)
    run = FakeRun()
    with pytest.raises(BundleError, match="bundle.json changed while it was verified"):
        svc.install_service("nvidia-gpu", bundle_dir, root=image_root, run=run, executable=EXE)
    assert run.calls == [] and snapshot(image_root) == before


def test_install_service_rerun_without_profile_keeps_the_installed_profile(image_root, cpu_bundle_dir):
    """The installed config's [model] profile decides over the bundle's own when no
    --profile is given: an upgrade keeps the GPU drop-in."""
    svc.install_service("nvidia-gpu", cpu_bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    assert (image_root / svc.GPU_DROPIN_FILE).is_file()
    before = snapshot(image_root)
    steps = svc.install_service(None, cpu_bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    assert (image_root / svc.GPU_DROPIN_FILE).is_file(), steps
    assert "profile: nvidia-gpu (the [model] profile of /etc/edge-runtime/config.toml; a GPU profile)" in steps
    assert not any("removed" in s or s.startswith("warning") for s in steps), steps
    assert snapshot(image_root) == before and steps[-1] == "nothing to do: everything is already installed"


def test_install_service_leaves_the_drop_in_of_a_profile_it_cannot_read(image_root, cpu_bundle_dir):
    """A custom GPU profile TOML the installer cannot read (not in the image yet, or from a
    newer version) must not be taken for a CPU profile: the drop-in stays."""
    svc.install_service("jetson-orin-nano", cpu_bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    config = image_root / svc.CONFIG_FILE
    text = config.read_text()
    assert 'profile = "jetson-orin-nano"' in text
    config.write_text(text.replace('profile = "jetson-orin-nano"', 'profile = "/etc/edge-runtime/orin-nx.toml"'))
    steps = svc.install_service(None, cpu_bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    assert (image_root / svc.GPU_DROPIN_FILE).is_file(), steps
    assert any(s.startswith("warning: cannot load profile /etc/edge-runtime/orin-nx.toml") for s in steps), steps
    assert "GPU drop-in: left as it is (no profile to decide it by: no --profile, and no readable [model] profile " \
           "or bundle profile)" in steps
    config.write_text(text + "\n[model]\n")  # a config the daemon cannot read either (a table defined twice)
    with pytest.raises(svc.DryRunRefused) as dry:
        svc.install_service(None, cpu_bundle_dir, root=image_root, run=FakeRun(), executable=EXE, dry_run=True)
    assert "GPU drop-in: left as it is (no profile to decide it by: no --profile, and no readable [model] profile " \
           "or bundle profile)" in dry.value.steps


def test_install_service_without_a_profile_anywhere_follows_the_bundle(image_root, cpu_bundle_dir, bundle_dir):
    svc.install_service(None, cpu_bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    from edge_runtime.config import load_config

    assert load_config(image_root / svc.CONFIG_FILE, check_files=False).model.profile is None
    # No --bundle either: the profile of the bundle the config names.
    steps = svc.install_service(None, None, root=image_root, run=FakeRun(), executable=EXE)
    assert "profile: cpu-x86_64 (the bundle's own; a CPU profile)" in steps
    assert "GPU drop-in: not needed (CPU profile), skipped" in steps
    # Another bundle: the drop-in follows it, and a warning says the config names the old one.
    steps = svc.install_service(None, bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    assert (image_root / svc.GPU_DROPIN_FILE).is_file()
    assert any(s.startswith('warning: /etc/edge-runtime/config.toml keeps [model] bundle = '
                            '"/opt/edge-runtime/bundles/codellama-cpu", not "/opt/edge-runtime/bundles/codellama-demo"')
               for s in steps), steps


def test_install_service_warns_when_the_kept_config_runs_another_profile(image_root, cpu_bundle_dir):
    svc.install_service(None, cpu_bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    config = image_root / svc.CONFIG_FILE
    kept = config.read_text()
    steps = svc.install_service("jetson-orin-nano", cpu_bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    assert config.read_text() == kept  # never overwritten
    assert (image_root / svc.GPU_DROPIN_FILE).is_file()  # --profile decides
    warning = [s for s in steps if s.startswith("warning:")]
    assert warning == ['warning: /etc/edge-runtime/config.toml sets no [model] profile, so the service runs its '
                       'bundle\'s own (cpu-x86_64), not "jetson-orin-nano" as --profile asks. Add profile = '
                       '"jetson-orin-nano" to its [model], then `systemctl restart edge-runtime`'], steps
    # Once the operator has set it, no warning.
    config.write_text(kept.replace('# profile = "cpu-x86_64"', 'profile = "jetson-orin-nano"'))
    steps = svc.install_service("jetson-orin-nano", cpu_bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    assert not any(s.startswith("warning:") for s in steps), steps


def test_install_service_warns_when_the_kept_config_pins_another_bundle(image_root, cpu_bundle_dir):
    from edge_runtime.bundle import read_manifest

    svc.install_service(None, cpu_bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    config = image_root / svc.CONFIG_FILE
    old_pin = "0" * 64
    config.write_text(config.read_text().replace("[model]\n", f'[model]\nbundle_sha256 = "{old_pin}"\n', 1))
    steps = svc.install_service(None, cpu_bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    sha = read_manifest(cpu_bundle_dir)[1]
    assert [s for s in steps if s.startswith("warning:")] == [
        f'warning: /etc/edge-runtime/config.toml pins [model] bundle_sha256 = "{old_pin}", and this bundle\'s '
        f"bundle.json is {sha}: the service refuses it at start. Set bundle_sha256 = \"{sha}\" in its [model] (or "
        "remove the pin), then `systemctl restart edge-runtime`"], steps
    config.write_text(config.read_text().replace(old_pin, sha))
    steps = svc.install_service(None, cpu_bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    assert not any(s.startswith("warning:") for s in steps), steps


def test_install_service_resolves_a_relative_root(image_root, bundle_dir, monkeypatch):
    monkeypatch.chdir(image_root.parent)
    run = FakeRun()
    parser = argparse.ArgumentParser()
    svc.add_arguments(parser)
    args = parser.parse_args(["--bundle", str(bundle_dir), "--root", image_root.name, "--executable", EXE])
    steps = svc.install_service(args.profile, args.bundle, root=args.root, run=run, executable=EXE)
    assert run.calls[0][:3] == ["useradd", "--prefix", str(image_root)], run.calls
    assert (image_root / svc.UNIT_FILE).is_file() and (image_root / svc.CONFIG_FILE).is_file()
    assert f"systemctl: skipped (--root {image_root}: enable it on the device with " \
           "`systemctl enable edge-runtime`)" in steps


def test_install_service_refuses_a_root_without_a_user_database(tmp_path):
    root = tmp_path / "bare"
    (root / "etc").mkdir(parents=True)
    from edge_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"has no etc/passwd or etc/group: useradd --prefix"):
        svc.install_service("cpu-x86_64", None, root=root, run=FakeRun(), executable=EXE)
    assert list(root.rglob("*")) == [root / "etc"]


def test_install_service_dry_run_lists_the_plan_then_what_a_real_run_refuses(image_root, monkeypatch, capsys):
    """The console script (or its interpreter, or this package) where the unit hides files,
    as for a root user's pyenv under /root: a real run refuses before changing anything; a
    dry run lists the whole plan with the problem as a warning, then exits 2 with it."""
    from edge_runtime.errors import ConfigError

    before = snapshot(image_root)
    # --executable the unit would hide: the plan, then the refusal.
    with pytest.raises(svc.DryRunRefused, match="--executable: /home/me/venv/bin/edge-runtime is under /home"):
        svc.install_service(None, None, root=image_root, run=FakeRun(), executable="/home/me/venv/bin/edge-runtime",
                            dry_run=True)
    # a relative --executable: refused before the user and the files, not at the unit's rendering
    with pytest.raises(ConfigError, match="--executable: venv/bin/edge-runtime is not an absolute path"):
        svc.install_service("cpu-x86_64", None, root=image_root, run=FakeRun(), executable="venv/bin/edge-runtime")
    assert snapshot(image_root) == before
    monkeypatch.setattr(svc, "HIDDEN_PREFIXES", (str(Path(svc.__file__).resolve().parent),))
    with pytest.raises(ConfigError, match="which the unit hides"):
        svc.install_service("cpu-x86_64", None, root=image_root, run=FakeRun())
    assert snapshot(image_root) == before

    parser = argparse.ArgumentParser()
    svc.add_arguments(parser)
    args = parser.parse_args(["--profile", "cpu-x86_64", "--root", str(image_root), "--dry-run"])
    assert svc.run_install_service(args) == 2
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("warning: a real run would stop here: ") and "which the unit hides" in lines[0]
    assert "/etc/systemd/system/edge-runtime.service: would install it" in lines
    assert "/etc/edge-runtime/config.toml: would install it" in lines
    assert lines[-1] == "dry run: nothing was changed; a real run would stop (see the warnings above)"
    assert err.startswith("error: dry run: a real run would stop: ") and "ProtectHome" in err
    assert snapshot(image_root) == before


def test_uninstall_service_removes_the_unit_and_keeps_the_data(image_root, bundle_dir):
    svc.install_service("nvidia-gpu", bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    state = image_root / "var/lib/edge-runtime"
    state.mkdir(parents=True)
    (state / "audit.jsonl").write_text("{}\n")
    override = image_root / "etc/systemd/system/edge-runtime.service.d/override.conf"
    override.write_text("[Service]\nNice=5\n")
    wants = image_root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "edge-runtime.service").symlink_to("/etc/systemd/system/edge-runtime.service")
    before = snapshot(image_root)

    run = FakeRun()
    dry = svc.uninstall_service(root=image_root, run=run, dry_run=True)
    assert snapshot(image_root) == before and run.calls == []
    assert "/etc/systemd/system/edge-runtime.service: would remove it (installed by install-service)" in dry
    assert dry[-1] == "dry run: nothing was changed"

    steps = svc.uninstall_service(root=image_root, run=run)
    assert run.calls == []  # not the live system
    assert not (image_root / svc.UNIT_FILE).exists() and not (image_root / svc.GPU_DROPIN_FILE).exists()
    assert not os.path.lexists(wants / "edge-runtime.service")
    assert "/etc/systemd/system/multi-user.target.wants/edge-runtime.service: removed (the enable link)" in steps
    assert override.is_file() and (image_root / svc.CONFIG_FILE).is_file() and (state / "audit.jsonl").is_file()
    assert (image_root / "opt/edge-runtime/bundles/codellama-demo/model.onnx").is_file()
    for expected in ("/etc/systemd/system/edge-runtime.service.d/gpu.conf: removed (installed by install-service)",
                     "/etc/systemd/system/edge-runtime.service: removed (installed by install-service)",
                     f"/etc/systemd/system/edge-runtime.service.d/override.conf: kept (not installed by "
                     f"install-service); to remove it: rm {override}",
                     f"/etc/edge-runtime: kept (the config, MQTT password and CA); to remove it: "
                     f"rm -r {image_root}/etc/edge-runtime",
                     f"/var/lib/edge-runtime: kept (the state: audit log, reply store); to remove it: rm -r {state}",
                     f"/opt/edge-runtime/bundles: kept (the bundles); to remove it: "
                     f"rm -r {image_root}/opt/edge-runtime/bundles",
                     f"user edge-runtime: kept (it owns the state files); to remove it: "
                     f"userdel --prefix {image_root} edge-runtime"):
        assert expected in steps, steps
    again = svc.uninstall_service(root=image_root, run=run)
    assert again[-1] == "nothing to do: edge-runtime is not installed as a service", again


def test_uninstall_service_on_a_live_systemd_stops_and_disables(image_root, monkeypatch):
    svc.install_service("cpu-x86_64", None, root=image_root, run=FakeRun(), executable=EXE)
    # The tree stands in for / (nothing outside it is touched; systemctl is the fake).
    monkeypatch.setattr(svc, "_is_live", lambda root: True)
    monkeypatch.setattr(svc, "_systemd_running", lambda: True)
    monkeypatch.setattr(svc.os, "geteuid", lambda: 0)
    run = FakeRun(enabled=True, active=True)
    dry = svc.uninstall_service(root=image_root, run=run, dry_run=True)
    assert run.calls == [["systemctl", "is-active", "edge-runtime"], ["systemctl", "is-enabled", "edge-runtime"]]
    assert "systemctl stop edge-runtime: would run it" in dry and "systemctl disable edge-runtime: would run it" in dry
    run.calls.clear()
    steps = svc.uninstall_service(root=image_root, run=run)
    assert run.calls == [["systemctl", "is-active", "edge-runtime"], ["systemctl", "stop", "edge-runtime"],
                         ["systemctl", "is-enabled", "edge-runtime"], ["systemctl", "disable", "edge-runtime"],
                         ["systemctl", "daemon-reload"]], run.calls
    assert not (image_root / svc.UNIT_FILE).exists()
    assert "systemctl daemon-reload: done" in steps
    run = FakeRun()  # stopped and disabled now
    steps = svc.uninstall_service(root=image_root, run=run)
    assert "systemctl stop edge-runtime: not running, skipped" in steps
    assert "systemctl disable edge-runtime: not enabled (disabled), skipped" in steps
    assert "systemctl daemon-reload: skipped (no unit file changed)" in steps


def test_uninstall_service_command_line(image_root, capsys):
    parser = argparse.ArgumentParser()
    svc.add_arguments(parser)
    assert svc.run_install_service(parser.parse_args(["--uninstall", "--root", str(image_root), "--dry-run"])) == 0
    assert "nothing to do: edge-runtime is not installed as a service" in capsys.readouterr().out
    args = parser.parse_args(["--uninstall", "--profile", "cpu-x86_64", "--root", str(image_root)])
    assert svc.run_install_service(args) == 2
    assert capsys.readouterr().err == "error: --uninstall takes only --root and --dry-run, not --profile\n"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m edge_runtime install-service ARGS` (always with a --root or --dry-run here)."""
    return subprocess.run([sys.executable, "-m", "edge_runtime", "install-service", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd or REPO)


@pytest.mark.parametrize("flag, what", [("--root", "image tree to install into"), ("--bundle", "bundle folder"),
                                        ("--executable", "absolute path of the ExecStart= program"),
                                        ("--profile", "device profile's name or TOML file")])
def test_install_service_refuses_an_empty_flag_instead_of_the_current_folder(image_root, flag, what):
    """`--root ""` would plan `useradd --prefix <cwd>`, `--bundle ""` verify the cwd: an empty
    value is refused, naming the flag, before anything is printed or changed."""
    before = snapshot(image_root)
    args = {"--root": str(image_root), "--executable": EXE, "--profile": "cpu-x86_64", flag: ""}
    for extra in ([], ["--dry-run"]):
        result = cli(*[a for item in args.items() for a in item], *extra, cwd=image_root)
        assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
        assert result.stderr == f"error: {flag} is empty: give the {what}" + \
            (" (leave --root out for /)\n" if flag == "--root" else "\n"), result.stderr
    if flag == "--root":
        result = cli("--uninstall", "--root", "", "--dry-run", cwd=image_root)
        assert result.returncode == 2 and result.stderr.startswith("error: --root is empty"), result.stderr
    assert snapshot(image_root) == before


def test_install_service_refuses_a_relative_executable_before_the_plan(image_root):
    """A relative --executable cannot go into ExecStart=: refused up front, naming the flag,
    in a dry run too (not one plan step and then an error from rendering the unit)."""
    before = snapshot(image_root)
    for extra in ([], ["--dry-run"]):
        result = cli("--profile", "cpu-x86_64", "--root", str(image_root), "--executable", "bin/edge-runtime", *extra)
        assert result.returncode == 2 and result.stdout == "", result.stdout
        assert result.stderr == "error: --executable: bin/edge-runtime is not an absolute path (ExecStart= needs " \
                                f"one, e.g. {svc.DEFAULT_EXECUTABLE})\n", result.stderr
    assert snapshot(image_root) == before


def test_install_service_checks_the_root_before_hashing_the_bundle(tmp_path, bundle_dir):
    """A --root without a user database is refused before the bundle is verified (minutes
    for a 4 GiB bundle), in a real run and first among a dry run's warnings."""
    root = tmp_path / "bare"
    (root / "etc").mkdir(parents=True)
    result = cli("--profile", "cpu-x86_64", "--bundle", str(bundle_dir), "--root", str(root), "--executable", EXE)
    assert result.returncode == 2 and "verifying" not in result.stdout, result.stdout
    assert result.stderr.startswith(f"error: --root {root} has no etc/passwd or etc/group"), result.stderr
    result = cli("--profile", "cpu-x86_64", "--bundle", str(bundle_dir), "--root", str(root), "--executable", EXE,
                 "--dry-run")
    lines = result.stdout.splitlines()
    assert result.returncode == 2 and lines[0].startswith(f"warning: a real run would stop here: --root {root} has "
                                                          "no etc/passwd"), result.stdout
    assert any(line.startswith(f"bundle {bundle_dir}: verifying") for line in lines[1:]), result.stdout
    assert list(root.rglob("*")) == [root / "etc"]


def test_install_service_refuses_an_executable_that_is_not_there(image_root):
    """A unit whose ExecStart= names no program fails every start with 203/EXEC: --executable
    must name an executable file, in the --root tree (a link with an absolute target is
    followed there); a dry run shows the plan, then refuses."""
    before = snapshot(image_root)
    result = cli("--profile", "cpu-x86_64", "--root", str(image_root), "--executable", "/nonexistent/edge-runtime")
    assert result.returncode == 2 and result.stderr == (
        f"error: --executable: /nonexistent/edge-runtime does not exist in --root {image_root} "
        f"({image_root}/nonexistent/edge-runtime): ExecStart= would fail with status=203/EXEC\n"), result.stderr
    assert "user edge-runtime" not in result.stdout and snapshot(image_root) == before
    result = cli("--profile", "cpu-x86_64", "--root", str(image_root), "--executable", "/nonexistent/edge-runtime",
                 "--dry-run")
    assert result.returncode == 2 and "/etc/systemd/system/edge-runtime.service: would install it" in result.stdout
    assert result.stderr.startswith("error: dry run: a real run would stop: --executable: /nonexistent/edge-runtime "
                                    "does not exist"), result.stderr
    (image_root / EXE.lstrip("/")).chmod(0o644)
    result = cli("--profile", "cpu-x86_64", "--root", str(image_root), "--executable", EXE)
    assert result.returncode == 2 and f"error: --executable: {EXE} is not an executable file" in result.stderr
    assert snapshot(image_root) == {**before, EXE.lstrip("/"): (before[EXE.lstrip("/")][0], 0o100644)}
    # The image's own layout: the venv's script links to a program elsewhere in the image.
    (image_root / EXE.lstrip("/")).unlink()
    real = image_root / "usr/lib/edge-runtime/edge-runtime"
    real.parent.mkdir(parents=True)
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    (image_root / EXE.lstrip("/")).symlink_to("/usr/lib/edge-runtime/edge-runtime")
    result = cli("--profile", "cpu-x86_64", "--root", str(image_root), "--executable", EXE)
    assert result.returncode == 0, result.stderr
    assert f"ExecStart={EXE} serve" in (image_root / svc.UNIT_FILE).read_text()
    # the live system: the path itself
    svc.install_service("cpu-x86_64", None, root=Path("/"), run=FakeRun(), executable="/bin/sh", dry_run=True)
    with pytest.raises(svc.DryRunRefused, match="--executable: /nonexistent/edge-runtime does not exist: ExecStart="):
        svc.install_service("cpu-x86_64", None, root=Path("/"), run=FakeRun(), executable="/nonexistent/edge-runtime",
                            dry_run=True)


def test_uninstall_dry_run_does_not_list_what_it_would_remove_as_kept(image_root):
    svc.install_service("nvidia-gpu", None, root=image_root, run=FakeRun(), executable=EXE)
    override = image_root / "etc/systemd/system/edge-runtime.service.d/override.conf"
    override.write_text("[Service]\nNice=5\n")
    before = snapshot(image_root)
    result = cli("--uninstall", "--root", str(image_root), "--dry-run")
    assert result.returncode == 0 and snapshot(image_root) == before, result.stderr
    lines = result.stdout.splitlines()
    dropin = "/etc/systemd/system/edge-runtime.service.d/gpu.conf"
    assert f"{dropin}: would remove it (installed by install-service)" in lines
    assert not any(line.startswith(f"{dropin}: kept") for line in lines), result.stdout
    assert f"/etc/systemd/system/edge-runtime.service.d/override.conf: kept (not installed by install-service); " \
           f"to remove it: rm {override}" in lines
    assert lines[-1] == "dry run: nothing was changed"


def test_install_service_says_a_bundle_file_is_not_the_bundle_folder(image_root, bundle_dir):
    for named, hint in ((bundle_dir / "bundle.json", f"give the folder it is in, --bundle {bundle_dir}"),
                        (bundle_dir / "model.onnx", f"give the folder it is in, --bundle {bundle_dir}"),
                        (image_root / "etc" / "passwd", "give the folder that holds bundle.json and the files it "
                                                        "lists")):
        result = cli("--bundle", str(named), "--root", str(image_root), "--executable", EXE, "--dry-run")
        assert result.returncode == 2 and result.stdout == "", result.stdout
        assert result.stderr == f"error: --bundle {named} is a file, not the bundle folder: {hint}\n", result.stderr


def test_install_service_refuses_an_installed_config_it_cannot_read(image_root):
    """A kept config that is not valid TOML, which the daemon refuses at start: not `nothing to
    do` (exit 0) but exit 2, saying so and how to fix it, and the operator's file untouched."""
    svc.install_service("nvidia-gpu", None, root=image_root, run=FakeRun(), executable=EXE)
    config = image_root / svc.CONFIG_FILE
    config.write_text(config.read_text() + "\n[model]\n")  # a table defined twice
    before = snapshot(image_root)
    expected = ("the installed config cannot be read (/etc/edge-runtime/config.toml: invalid TOML: "
                "Cannot declare ('model',) twice")
    fix = f"install-service never overwrites it: fix it, or move it aside (mv {config} {config}.bad)"
    result = cli("--profile", "nvidia-gpu", "--root", str(image_root), "--executable", EXE)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {expected}"), result.stdout + result.stderr
    assert fix in result.stderr and "nothing to do" not in result.stdout
    result = cli("--root", str(image_root), "--executable", EXE, "--dry-run")
    assert result.returncode == 2 and result.stdout.startswith(f"warning: a real run would stop here: {expected}")
    assert result.stderr.startswith(f"error: dry run: a real run would stop: {expected}"), result.stderr
    assert snapshot(image_root) == before
    # --uninstall still goes ahead, and says the config's state_dir is unknown
    result = cli("--uninstall", "--root", str(image_root))
    assert result.returncode == 0 and result.stdout.startswith(
        "warning: cannot read /etc/edge-runtime/config.toml (/etc/edge-runtime/config.toml: invalid TOML"), \
        result.stdout
    assert not (image_root / svc.UNIT_FILE).exists() and config.read_bytes() == before[svc.CONFIG_FILE][0]


def test_install_service_copies_only_the_files_bundle_json_lists(image_root, bundle_dir, tmp_path):
    """The installer copied the whole source folder as root, following links: a link in it to
    a root-only file outside the bundle was installed as a world-readable copy under
    /opt/edge-runtime/bundles, and a dangling one failed the install after everything else was
    copied (a raw list of errors, the partial copy left behind). Only bundle.json and the files
    it lists are installed (the daemon reads nothing else), and a note names what is not."""
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    (bundle_dir / "notes").symlink_to(secret)
    (bundle_dir / "gone").symlink_to(tmp_path / "nothing-here")
    (bundle_dir / "model.onnx.data.bak").write_bytes(b"old weights")
    steps = svc.install_service("cpu-x86_64", bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    bundles = image_root / "opt/edge-runtime/bundles"
    installed = bundles / bundle_dir.name
    assert [p.name for p in bundles.iterdir()] == [bundle_dir.name]  # no partial copy beside it
    assert sorted(p.relative_to(installed).as_posix() for p in installed.rglob("*")) == [
        "bundle.json", "model.onnx", "model.onnx.data", "tokenizer", "tokenizer/tokenizer.json"]
    for name in ("bundle.json", "model.onnx", "model.onnx.data", "tokenizer/tokenizer.json"):
        assert (installed / name).read_bytes() == (bundle_dir / name).read_bytes()
    assert (f"note: bundle {bundle_dir}: 3 files not listed in bundle.json are not installed (the daemon reads "
            "none of them): gone, model.onnx.data.bak, notes") in steps, steps
    from edge_runtime.bundle import load_bundle

    assert load_bundle(installed).manifest == load_bundle(bundle_dir).manifest
    again = svc.install_service("cpu-x86_64", bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    assert f"bundle /opt/edge-runtime/bundles/{bundle_dir.name}: unchanged, skipped" in again, again


@pytest.fixture
def small_bundles_fs(image_root):
    """/opt/edge-runtime/bundles of the image on a tmpfs with room for one copy of the test
    bundle (its four files, a 4 KiB page each) and not two."""
    mnt = image_root / "opt/edge-runtime/bundles"
    mnt.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_bundle_copy_that_runs_out_of_space_leaves_the_installed_one_and_no_partial_copy(
        image_root, tmp_path, small_bundles_fs):
    """A new bundle of the same name on a disk with room for one: the copy fails (ENOSPC). The
    partial copy was left beside the installed bundle (gigabytes for a real one, on a full disk)
    with a raw list of errors; now it is removed, the message says the installed bundle is
    unchanged, and that one still verifies."""
    from edge_runtime.bundle import load_bundle
    from edge_runtime.errors import ConfigError

    old = write_bundle(tmp_path / "v1" / "codellama", profile="cpu-x86_64")
    svc.install_service("cpu-x86_64", old, root=image_root, run=FakeRun(), executable=EXE)
    installed = small_bundles_fs / "codellama"
    old_manifest = load_bundle(installed).manifest_sha256

    new = write_bundle(tmp_path / "v2" / "codellama", profile="cpu-x86_64")
    (new / "model.onnx.data").write_bytes(bytes(range(256)) * 17)  # another bundle: a bigger weights file
    (new / "bundle.json").write_text((new / "bundle.json").read_text().replace('"fp32"', '"fp32" '))
    from edge_runtime.bundle import sha256_file

    manifest = json.loads((new / "bundle.json").read_text())
    for entry in manifest["files"]:
        entry["size"] = (new / entry["path"]).stat().st_size
        entry["sha256"] = sha256_file(new / entry["path"])
    (new / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError) as refused:
        svc.install_service("cpu-x86_64", new, root=image_root, run=FakeRun(), executable=EXE)
    assert "cannot copy the bundle to /opt/edge-runtime/bundles/.codellama.tmp-install: No space left on device" \
        in str(refused.value)
    assert "the installed bundle is unchanged and the partial copy removed" in str(refused.value)
    assert sorted(p.name for p in small_bundles_fs.iterdir()) == ["codellama"]
    assert load_bundle(installed).manifest_sha256 == old_manifest


def test_install_service_makes_its_folders_readable_to_the_service_under_a_strict_umask(tmp_path):
    """Root with a hardened umask (077 here; CIS asks for 027): the folders install-service made
    were root-only (/etc/edge-runtime 0700, /opt/edge-runtime 0700): the service user could reach
    neither its config nor its bundle. The folders it makes are 0755 whatever the umask."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    exe = root / "usr/bin/edge-runtime"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/usr/bin/python3\n")
    exe.chmod(0o755)
    bundle = write_bundle(tmp_path / "codellama", profile="cpu-x86_64")
    previous = os.umask(0o077)
    try:
        svc.install_service("cpu-x86_64", bundle, root=root, run=FakeRun(), executable="/usr/bin/edge-runtime")
    finally:
        os.umask(previous)
    for folder in ("opt", "opt/edge-runtime", "opt/edge-runtime/bundles", "opt/edge-runtime/bundles/codellama",
                   "opt/edge-runtime/bundles/codellama/tokenizer", "etc/edge-runtime", "etc/systemd",
                   "etc/systemd/system"):
        assert oct((root / folder).stat().st_mode & 0o777) == "0o755", folder
    for file in (svc.CONFIG_FILE, svc.UNIT_FILE, "opt/edge-runtime/bundles/codellama/model.onnx.data"):
        assert oct((root / file).stat().st_mode & 0o777) == "0o644", file


def test_install_service_again_repairs_an_installed_bundle_that_changed_in_place(image_root, bundle_dir):
    """A byte of the installed weights changed, size and time kept (a failing SD card, a copy
    over it that kept the times): the daemon refuses it at start and says to copy the bundle
    again, but install-service compared names, sizes and times only and said 'unchanged,
    skipped', so the device stayed down. It checks the installed copy's hashes too and copies
    the bundle again."""
    from edge_runtime.bundle import load_bundle
    from edge_runtime.errors import BundleError

    svc.install_service("cpu-x86_64", bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    installed = image_root / "opt/edge-runtime/bundles" / bundle_dir.name
    weights = installed / "model.onnx.data"
    st = weights.stat()
    raw = bytearray(weights.read_bytes())
    raw[10] ^= 0x01
    weights.write_bytes(bytes(raw))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(BundleError, match="model.onnx.data: SHA-256 does not match"):
        load_bundle(installed)
    steps = svc.install_service("cpu-x86_64", bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    shown = f"bundle /opt/edge-runtime/bundles/{bundle_dir.name}"
    assert any(s.startswith(f"{shown}: the installed copy fails verification (model.onnx.data: SHA-256 does not "
                            "match") for s in steps), steps
    assert f"{shown}: replaced from {bundle_dir}" in steps, steps
    assert load_bundle(installed).manifest_sha256 == load_bundle(bundle_dir).manifest_sha256
    again = svc.install_service("cpu-x86_64", bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    assert f"{shown}: unchanged, skipped" in again and again[-1].startswith("nothing to do"), again


def test_install_service_refuses_a_bundle_the_daemon_would_refuse_for_its_memory(image_root, cpu_bundle_dir,
                                                                                 tmp_path):
    """install-service verified only the hashes, and the daemon checks at start that the bundle
    fits its profile's memory budget too: a bundle too big for the device was installed (over the
    one of the same name, which was then gone) and the service refused to start at every try.
    It is refused before anything is changed, with the daemon's numbers; a kept config with
    [model] check_memory = false (the daemon then starts it anyway) lets it through."""
    from edge_runtime.errors import ConfigError
    from edge_runtime.memory_fit import MemoryBudgetExceeded, bundle_plan

    board = tmp_path / "small-board.toml"
    cpu = (REPO / "device_profiles" / "cpu-x86_64.toml").read_text()
    board.write_text(cpu.replace('name = "cpu-x86_64"', 'name = "small-board"')
                     .replace("memory_budget_bytes = 17179869184", "memory_budget_bytes = 65536"))
    from edge_runtime.bundle import load_bundle
    from edge_runtime.profiles import load_profile

    plan = bundle_plan(load_bundle(cpu_bundle_dir), load_profile(str(board)))
    assert not plan.fits  # the daemon's own check refuses it
    before = snapshot(image_root)
    run = FakeRun()
    with pytest.raises(ConfigError) as refused:
        svc.install_service(str(board), cpu_bundle_dir, root=image_root, run=run, executable=EXE)
    assert str(MemoryBudgetExceeded(plan)) in str(refused.value)
    assert "set [model] check_memory = false in /etc/edge-runtime/config.toml to start it anyway" in str(refused.value)
    assert run.calls == [] and snapshot(image_root) == before
    with pytest.raises(svc.DryRunRefused) as dry:
        svc.install_service(str(board), cpu_bundle_dir, root=image_root, run=FakeRun(), executable=EXE, dry_run=True)
    assert any(s.startswith("warning: a real run would stop here: ") and "does not fit" in s for s in dry.value.steps)

    config = image_root / svc.CONFIG_FILE
    config.parent.mkdir(parents=True)
    config.write_text(svc.render_config(f"/opt/edge-runtime/bundles/{cpu_bundle_dir.name}", None)
                      .replace("[model]\n", "[model]\ncheck_memory = false\n"))
    steps = svc.install_service(str(board), cpu_bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    assert f"bundle /opt/edge-runtime/bundles/{cpu_bundle_dir.name}: copied from {cpu_bundle_dir}" in steps, steps


def test_unit_for_a_program_path_with_a_percent_sign_verifies(tmp_path):
    """`/opt/edge runtime 50%b/venv/...`: `%` starts a unit specifier, so the unit install-service
    wrote ran another path (`%b`, the boot id: "Command ... is not executable") or was refused at
    start (`%x`: "Failed to resolve unit specifiers ...: Invalid slot"). It is written `%%`; a
    path systemd refuses outright (a quote: "Executable name contains special characters") is
    refused by install-service before it writes anything."""
    fake = tmp_path / "edge runtime 50%b" / "bin" / "edge-runtime"  # %b: the boot id, in a unit
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    (units / "edge-runtime.service").write_text(svc.render_unit(fake))
    result = analyze(units, "verify", "--man=no", str(units / "edge-runtime.service"))
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    with pytest.raises(svc.ConfigError, match="characters systemd refuses"):
        svc.render_unit("/opt/it's/edge-runtime")


def test_install_service_under_an_ascii_locale_writes_a_non_ascii_bundle_name_as_utf8(image_root, bundle_dir,
                                                                                       tmp_path):
    """LC_ALL=C PYTHONUTF8=0 and a bundle folder `bündle 模型`: the bundle was copied, then writing
    config.toml stopped with a UnicodeEncodeError traceback, leaving an empty
    `.config.toml.tmp-install` and no config. The config names the bundle in UTF-8, as the daemon
    reads it; a folder whose name is not UTF-8 is refused before anything is copied."""
    named = tmp_path / "bündle 模型"
    shutil.copytree(bundle_dir, named)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIO"))}
    env.update(LC_ALL="C", PYTHONUTF8="0")
    command = [sys.executable, "-m", "edge_runtime", "install-service", "--profile", "cpu-x86_64", "--root",
               str(image_root), "--executable", EXE, "--bundle"]
    out = subprocess.run([*command, str(named)], capture_output=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr.decode("utf-8", "replace")
    config = (image_root / "etc" / "edge-runtime" / "config.toml").read_text(encoding="utf-8")
    assert 'bundle = "/opt/edge-runtime/bundles/bündle 模型"' in config
    assert sorted(p.name for p in (image_root / "etc" / "edge-runtime").iterdir()) == ["config.toml"]
    latin1 = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    shutil.copytree(bundle_dir, os.fsdecode(latin1))
    refused = subprocess.run([*command, latin1], capture_output=True, timeout=120)
    assert refused.returncode == 2 and b"not UTF-8" in refused.stderr, refused.stderr
    assert not os.path.exists(os.path.join(os.fsencode(image_root), b"opt/edge-runtime/bundles/caf\xe9"))


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_install_service_interrupted_while_copying_the_bundle_leaves_no_partial_copy(image_root, tmp_path, signum):
    """Ctrl-C, or SIGTERM (`timeout`, a provisioning job cancelled), while the bundle is copied: the
    partial copy (`.NAME.tmp-install`, up to the bundle's size, on an SD card) stayed until the next
    run, and SIGTERM killed the command without a word. Now it is removed, one line, exit 130/143."""
    import signal

    from edge_runtime.bundle import MANIFEST_NAME, sha256_file

    bundle = write_bundle(tmp_path / "big-bundle", profile="cpu-x86_64")
    data = bundle / "model.onnx.data"
    with open(data, "ab") as f:  # large enough that the copy takes a while
        f.truncate(400 * 2**20)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    for entry in manifest["files"]:
        if entry["path"] == "model.onnx.data":
            entry.update(size=data.stat().st_size, sha256=sha256_file(data))
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    staging = image_root / "opt" / "edge-runtime" / "bundles" / ".big-bundle.tmp-install"
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "install-service", "--root", str(image_root),
                             "--executable", EXE, "--bundle", str(bundle)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not staging.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert staging.exists(), "the copy did not start (or ended before it was seen)"
    proc.send_signal(getattr(signal, signum))
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the copy finished before the signal arrived")
    assert proc.returncode == 128 + getattr(signal, signum), err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: interrupted"), err
    assert not staging.exists() and not staging.with_name("big-bundle").exists()


def test_install_service_flushes_what_it_installs_to_the_disk_before_and_after_each_rename(
        image_root, bundle_dir, tmp_path, monkeypatch):
    """A power cut in the seconds after install-service returned: it wrote the unit, drop-in
    and config and copied the bundle without one fsync, then renamed them into place, so the
    disk could keep the new names and lose the bytes (ext4's delayed allocation): an installed
    bundle of empty or short files fails its SHA-256 check and the daemon never starts. Every
    file a rename puts in place (each file and folder of the bundle copy) is flushed before
    it, and the folder it lands in after it; a replaced bundle too."""
    from disk_flushes import DiskFlushes

    flushes = DiskFlushes().install(monkeypatch)
    steps = svc.install_service("nvidia-gpu", bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    flushing = f"bundle /opt/edge-runtime/bundles/{bundle_dir.name}: copied, now flushing it to the disk"
    assert any(s.startswith(flushing) and "do not cut the power" in s for s in steps), steps
    installed = image_root / "opt/edge-runtime/bundles" / bundle_dir.name
    for path in (installed, image_root / svc.UNIT_FILE, image_root / svc.GPU_DROPIN_FILE,
                 image_root / svc.CONFIG_FILE):
        renames = flushes.renames_into(path)
        assert len(renames) == 1, (path, flushes.events)
        assert flushes.problems_of_rename(renames[0]) == [], path
    # the bundle copy, every file of it: flushed under the temporary name it had then
    _, src, _, files = flushes.events[flushes.renames_into(installed)[0]]
    assert {os.path.relpath(f, src) for f in files} == {".", "tokenizer", "bundle.json", "model.onnx",
                                                        "model.onnx.data", "tokenizer/tokenizer.json"}

    (bundle_dir / "model.onnx.data").write_bytes(bytes(range(256)) * 16)  # a new time: copied again
    flushes.events.clear()
    steps = svc.install_service("nvidia-gpu", bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    assert f"bundle /opt/edge-runtime/bundles/{bundle_dir.name}: replaced from {bundle_dir}" in steps, steps
    renames = flushes.renames_into(installed)
    assert len(renames) == 1 and flushes.problems_of_rename(renames[0]) == []


def test_install_service_replaces_a_bundle_without_a_moment_when_its_name_is_missing(
        image_root, bundle_dir, monkeypatch):
    """Replacing a same-name bundle renamed the old folder away, then the new one into its place:
    a power cut between the two renames booted a device with no bundle at the name its config
    gives (the daemon refuses to start), and a daemon started by systemd in that moment failed
    the same way. The two names are exchanged in one step where Linux can (renameat2's
    RENAME_EXCHANGE); after every rename and exchange the name holds a whole bundle, the old
    one or the new one."""
    from edge_runtime import durable_files
    from edge_runtime.bundle import load_bundle

    svc.install_service("cpu-x86_64", bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    installed = image_root / "opt/edge-runtime/bundles" / bundle_dir.name
    old_sha = load_bundle(installed).manifest_sha256
    seen: list[str | None] = []

    def look(what):
        def step(*args, **kwargs):
            result = what(*args, **kwargs)
            try:  # what a daemon starting at this moment (or booting after a power cut now) loads
                seen.append(load_bundle(installed).manifest_sha256)
            except Exception:  # noqa: BLE001 - a missing or partial folder, as the daemon would see it
                seen.append(None)
            return result
        return step

    monkeypatch.setattr(os, "replace", look(os.replace))
    monkeypatch.setattr(durable_files, "_renameat2_exchange", look(durable_files._renameat2_exchange))
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    manifest["note"] = "a new export"
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))
    steps = svc.install_service("cpu-x86_64", bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    assert f"bundle /opt/edge-runtime/bundles/{bundle_dir.name}: replaced from {bundle_dir}" in steps, steps
    new_sha = load_bundle(installed).manifest_sha256
    assert new_sha != old_sha and seen and None not in seen, seen
    assert seen[-1] == new_sha
    assert sorted(p.name for p in installed.parent.iterdir()) == [bundle_dir.name]  # the old copy removed


def test_install_service_replaces_a_bundle_where_names_cannot_be_exchanged(image_root, bundle_dir, monkeypatch):
    """A file system (or a kernel before 3.15, a C library without renameat2) that cannot
    exchange two names: the bundle is replaced by two renames, as before, the old copy removed."""
    import errno

    from edge_runtime import durable_files
    from edge_runtime.bundle import load_bundle

    svc.install_service("cpu-x86_64", bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    monkeypatch.setattr(durable_files, "_renameat2_exchange", lambda a, b: errno.EINVAL)
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    manifest["note"] = "a new export"
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))
    steps = svc.install_service("cpu-x86_64", bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    installed = image_root / "opt/edge-runtime/bundles" / bundle_dir.name
    assert f"bundle /opt/edge-runtime/bundles/{bundle_dir.name}: replaced from {bundle_dir}" in steps, steps
    assert load_bundle(installed).manifest_sha256 == load_bundle(bundle_dir).manifest_sha256
    assert sorted(p.name for p in installed.parent.iterdir()) == [bundle_dir.name]


def test_install_service_onto_a_file_system_that_cannot_flush_a_folder_installs(image_root, bundle_dir, monkeypatch):
    """Some file systems (a VM's shared folder, some network ones) refuse fsync on a folder with
    EINVAL: the flush of the folders is skipped there, not the install (sqlite does the same)."""
    import errno
    import stat

    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    steps = svc.install_service("cpu-x86_64", bundle_dir, root=image_root, run=FakeRun(), executable=EXE)
    assert f"bundle /opt/edge-runtime/bundles/{bundle_dir.name}: copied from {bundle_dir}" in steps, steps
    assert (image_root / svc.CONFIG_FILE).is_file()
