"""The real daemon (`edge-runtime serve` as a process) on a real bundle, behind a
real Mosquitto, driven over MQTT, with systemd's notify socket owned by the test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_runtime.client import EdgeClient

DEVICE = "e2e-device"


class NotifySocket:
    """What systemd does for Type=notify: a datagram socket the daemon writes to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.5)
        self.messages: list[str] = []

    def wait_for(self, text: str, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in m for m in self.messages):
                return self.messages
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass
        raise AssertionError(f"no {text!r} from the daemon within {timeout}s; got {self.messages}")

    def collect(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass

    def count(self, text: str) -> int:
        return sum(m.count(text) for m in self.messages)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon(tiny_bundle, broker, tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000", "PYTHONUNBUFFERED": "1"}
    env.pop("WATCHDOG_PID", None)
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "serve", "--bundle", str(tiny_bundle),
                             "--broker", broker.url, "--device-id", DEVICE, "--state-dir", str(tmp_path / "state")],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        notify.wait_for("READY=1", timeout=60)
        yield proc, notify
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        notify.close()


def generate_cli(bundle: Path, *flags: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(bundle), "--json",
                          "--temperature", "0", "--max-tokens", "16", *flags], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_each_mode_over_mqtt_equals_local_generate(daemon, broker, tiny_bundle, tmp_path):
    messages = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Reverse a list"}]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    cases = [
        (dict(mode="complete", prompt="def fib(n):"), ["--prompt", "def fib(n):"]),
        (dict(mode="infill", prefix="def add(a, b):\n    return ", suffix="\n"),
         ["--prefix", "def add(a, b):\n    return ", "--suffix", "\n"]),
        (dict(mode="chat", messages=messages), ["--messages", str(tmp_path / "m.json")]),
    ]
    with EdgeClient(broker.url, DEVICE) as client:
        for i, (request, flags) in enumerate(cases):
            gen = client.generate(**request, max_tokens=16, temperature=0.0, timeout=60)
            chunks = list(gen)
            final = gen.result()
            assert final["done"] is True and "error" not in final
            assert [c["seq"] for c in chunks] == list(range(len(chunks)))
            assert "".join(c["delta"] for c in chunks) == final["text"]
            local = generate_cli(tiny_bundle, *flags)
            assert final["text"] == local["text"], request["mode"]
            # the daemon kept the start (<s>) of this client's previous prompt, which the next mode's
            # prompt shares and no more; the one-shot local run kept nothing
            assert local["usage"]["cached_prompt_tokens"] == 0
            assert final["usage"] == {**local["usage"], "cached_prompt_tokens": 1 if i else 0}
    # it warmed up before it reported ready, and the first request kept nothing of that
    assert "warmed up in" in (tmp_path / "daemon.log").read_text()


def test_a_clients_next_turn_reuses_its_previous_prompt_and_another_clients_does_not(daemon, broker):
    """Also: a request with "cache_prompt": false reuses nothing and leaves nothing to reuse."""
    first = [{"role": "user", "content": "Write a function that merges two sorted lists."}]
    with EdgeClient(broker.url, DEVICE, client_id="ward-7-terminal") as client:
        turn1 = client.generate(mode="chat", messages=first, max_tokens=8, temperature=0.0, timeout=60).result()
        assert turn1["usage"]["cached_prompt_tokens"] == 0
        second = first + [{"role": "assistant", "content": turn1["text"]}, {"role": "user", "content": "Add tests."}]
        turn2 = client.generate(mode="chat", messages=second, max_tokens=8, temperature=0.0, timeout=60).result()
    # <s>[INST] and the first question, at least, were kept
    assert turn2["usage"]["cached_prompt_tokens"] >= turn1["usage"]["prompt_tokens"] - 1
    with EdgeClient(broker.url, DEVICE, client_id="pharmacy-desk") as other:
        same = other.generate(mode="chat", messages=second, max_tokens=8, temperature=0.0, timeout=60).result()
        # "cache_prompt": false runs the whole prompt and leaves nothing for the next request
        fresh = other.generate(mode="chat", messages=second, max_tokens=8, temperature=0.0, timeout=60,
                               cache_prompt=False).result()
        after = other.generate(mode="chat", messages=second, max_tokens=8, temperature=0.0, timeout=60).result()
    assert same["usage"]["cached_prompt_tokens"] == 0
    assert same["text"] == turn2["text"] == fresh["text"]
    assert fresh["usage"]["cached_prompt_tokens"] == after["usage"]["cached_prompt_tokens"] == 0


def test_mqtt311_reply_to(daemon, broker):
    with EdgeClient(broker.url, DEVICE, protocol="3.1.1") as client:
        text = client.complete("import os", max_tokens=8, temperature=0.0, timeout=60)
    with EdgeClient(broker.url, DEVICE) as client:
        assert client.complete("import os", max_tokens=8, temperature=0.0, timeout=60) == text


def test_watchdog_pings_and_sigterm_sends_stopping(daemon):
    proc, notify = daemon
    notify.wait_for("WATCHDOG=1", timeout=5)
    before = notify.count("WATCHDOG=1")
    notify.collect(2.0)  # WATCHDOG_USEC is 1 s: a ping every 0.5 s
    assert notify.count("WATCHDOG=1") >= before + 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    notify.wait_for("STOPPING=1", timeout=2)


def _journal_stream_env(log_path: Path) -> dict[str, str]:
    """What systemd sets when the service's stderr is the journal: $JOURNAL_STREAM names it."""
    st = os.stat(log_path)
    return {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "PYTHONUNBUFFERED": "1"}


def test_in_the_journal_each_line_carries_its_priority_and_no_second_timestamp(tiny_bundle, tmp_path):
    """journald stored every line at priority info (`journalctl -p warning` showed nothing, not even
    'cannot reach the broker'), each line after a timestamp of its own next to journald's."""
    from mosquitto_broker import free_port

    log_path = tmp_path / "journal.log"
    log_path.touch()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "serve", "--bundle", str(tiny_bundle),
                                 "--broker", f"mqtt://127.0.0.1:{free_port()}", "--device-id", DEVICE,
                                 "--state-dir", str(tmp_path / "state")],
                                env=_journal_stream_env(log_path), stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while "cannot reach the broker" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    lines = log_path.read_text().splitlines()
    assert any(line.startswith("<4>edge_runtime.service: cannot reach the broker") for line in lines), lines
    assert any(line.startswith("<6>edge_runtime.service: stopped") for line in lines), lines
    assert all(line[:1] == "<" and line[1] in "234567" and line[2] == ">" for line in lines), lines

    # an error that stops the start is at priority err
    (tmp_path / "bad.toml").write_text(f'[model]\nbundle = "{tiny_bundle}"\n[mqtt]\nbroker = "tcp://x"\n'
                                       'device_id = "d"\n')
    with open(log_path, "w") as log:
        rc = subprocess.run([sys.executable, "-m", "edge_runtime", "serve", "--config", str(tmp_path / "bad.toml")],
                            env=_journal_stream_env(log_path), stdout=log, stderr=log, timeout=60).returncode
    assert rc == 2
    assert log_path.read_text().startswith("<3>error: ") and "mqtt.broker" in log_path.read_text()
    # on a terminal or in a file, as before
    out = subprocess.run([sys.executable, "-m", "edge_runtime", "serve", "--config", str(tmp_path / "bad.toml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: ")

