"""A real Mosquitto broker for tests: started on a free loopback port with a
config file written here, stopped (and restartable on the same port and
persistence file) by the tests. Never a mock."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")


class MosquittoBroker:
    """One broker process. `extra_config` is appended to the listener config
    (e.g. password_file, acl_file, TLS lines); `listener_options` replace the
    default anonymous plain listener when given."""

    def __init__(self, workdir: Path, *, port: int | None = None, extra_config: str = "",
                 listener_config: str | None = None, persistence: bool = True) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        listener = listener_config if listener_config is not None else (
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
        persist = (f"persistence true\npersistence_location {self.workdir}/\n"
                   if persistence else "persistence false\n")
        self.config_path.write_text(
            # as root, mosquitto would switch to the `mosquitto` user, who cannot write pytest's tmp dirs
            f"{listener}{persist}user {getpass.getuser()}\nlog_dest file {self.log_path}\nlog_type all\n"
            f"max_queued_messages 10000\n{extra_config}\n")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "MosquittoBroker":
        self.process = subprocess.Popen([mosquitto_binary(), "-c", str(self.config_path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise RuntimeError(f"mosquitto exited: {err}\n{log}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> "MosquittoBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


SAMPLE_ACL = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "acl"


def secured_broker(workdir: Path, *, users: dict[str, str], acl_lines: str) -> MosquittoBroker:
    """A started broker that admits only `users` (name -> password, mosquitto_passwd),
    with usernames as client ids and an ACL of deploy/mosquitto/acl's pattern lines plus
    `acl_lines` (per-user `user ...` / `topic ...` lines)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    patterns = "\n".join(line for line in SAMPLE_ACL.read_text().splitlines() if line.startswith("pattern "))
    acl = workdir / "acl"
    acl.write_text(f"{patterns}\n{acl_lines}")
    passwd = workdir / "passwd"
    for i, (user, password) in enumerate(users.items()):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd), user, password],
                       check=True, capture_output=True)
    broker = MosquittoBroker(workdir / "broker")
    broker.config_path.write_text(
        f"listener {broker.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"
        f"use_username_as_clientid true\npersistence false\nuser {getpass.getuser()}\n"
        f"log_dest file {broker.log_path}\n")
    return broker.start()
