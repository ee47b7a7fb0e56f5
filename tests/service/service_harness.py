"""Helpers for the service tests: build configs, run EdgeService in-process or as a
real subprocess (tests/service/fake_daemon.py) against a real Mosquitto."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fake_engine import FakeEngine

from edge_runtime.config import ServiceConfig, load_config
from edge_runtime.service import EdgeService

HERE = Path(__file__).resolve().parent


def make_config(broker: Any, tmp_path: Path, *, device_id: str = "dev1", **overrides: Any) -> ServiceConfig:
    values = {"model.bundle": str(tmp_path), "mqtt.broker": broker.url, "mqtt.device_id": device_id,
              "service.state_dir": str(tmp_path / f"state-{device_id}"), "mqtt.keepalive": 5}
    values.update(overrides)
    return load_config(None, values, check_files=False)


def start_service(config: ServiceConfig, engine: FakeEngine | None = None, **kw: Any) -> EdgeService:
    kw.setdefault("status_interval_s", 0.1)
    service = EdgeService(config, engine or FakeEngine(), **kw).start()
    assert service.wait_ready(10), "service did not become ready"
    return service


def write_config(path: Path, broker: Any, state_dir: Path, *, device_id: str = "dev1",
                 queue_depth: int = 8, protocol: str = "5", log_level: str = "INFO") -> Path:
    path.write_text(f"""
[model]
bundle = "."

[mqtt]
broker = "{broker.url}"
device_id = "{device_id}"
protocol = "{protocol}"
keepalive = 5

[limits]
queue_depth = {queue_depth}

[service]
state_dir = "{state_dir}"
log_level = "{log_level}"
""")
    return path


class DaemonProcess:
    """`fake_daemon.py` as a child process."""

    def __init__(self, config_path: Path, *, token_delay: float = 0.0, calls_file: Path | None = None,
                 log_path: Path | None = None, run_serve: bool = False, extra: list[str] | None = None) -> None:
        cmd = [sys.executable, str(HERE / "fake_daemon.py"), "--config", str(config_path),
               "--token-delay", str(token_delay)]
        if calls_file is not None:
            cmd += ["--calls-file", str(calls_file)]
        if run_serve:
            cmd += ["--run-serve"]
        cmd += extra or []
        self.log_path = log_path or config_path.with_suffix(".log")
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def wait(self, timeout: float = 15.0) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self._log.close()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
