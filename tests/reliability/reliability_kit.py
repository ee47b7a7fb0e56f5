"""Shared pieces of the reliability suite (tests/reliability) and the soak script
(scripts/reliability_soak.py): a real `edge-runtime serve` process, a raw MQTT
ledger that records every reply by request id, a psutil sampler, and the
figures file that docs/reliability.md is written from.

Nothing here is a mock: the daemon is the real CLI on a real bundle (or
tests/service/fake_daemon.py's real EdgeService with the FakeEngine), the broker
is a real Mosquitto (tests/mosquitto_broker.py).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
for _p in (TESTS, TESTS / "service"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

MiB = 1024 * 1024

# -- figures ---------------------------------------------------------------------------------


def figures_dir() -> Path | None:
    """Where measured figures go ($EDGE_RELIABILITY_FIGURES; unset: nowhere)."""
    value = os.environ.get("EDGE_RELIABILITY_FIGURES")
    return Path(value) if value else None


def record_figures(name: str, figures: dict[str, Any]) -> None:
    """Write `figures` as <figures dir>/<name>.json (and print them for -s runs)."""
    figures = dict(figures, recorded=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"\n[figures] {name}: {json.dumps(figures, sort_keys=True)}")
    out = figures_dir()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


def size(name: str, quick: int, long: int) -> int:
    """A test's size: $EDGE_RELIABILITY_<NAME>, else `long` in a long run
    ($EDGE_RELIABILITY_LONG=1, set by scripts/reliability.sh), else `quick`."""
    value = os.environ.get(f"EDGE_RELIABILITY_{name.upper()}")
    if value:
        return int(value)
    return long if os.environ.get("EDGE_RELIABILITY_LONG") == "1" else quick


# -- bundles ---------------------------------------------------------------------------------


def build_tiny_bundle(workdir: Path) -> Path:
    """The tests' tiny Code Llama-shaped fp32 bundle (same shape as conftest's
    `tiny_bundle`), built once into `workdir` and reused."""
    bundle = workdir / "tiny-fp32"
    if (bundle / "bundle.json").is_file():
        return bundle
    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress
    from edge_export.synthetic import build_checkpoint

    ckpt = workdir / "tiny-codellama"
    if not (ckpt / "config.json").is_file():
        build_checkpoint(ckpt, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4, num_kv_heads=2,
                         seed=1234)
    run_export(ExportOptions(checkpoint=ckpt, profile="cpu-x86_64", output=bundle, precision="fp32"),
               Progress(5, enabled=False))
    return bundle


# -- the daemon ------------------------------------------------------------------------------


def write_serve_config(path: Path, *, broker_url: str, device_id: str, bundle: Path, state_dir: Path,
                       queue_depth: int = 8, max_tokens: int = 64, log_level: str = "INFO",
                       keepalive: int = 5, max_payload_bytes: int = 262144) -> Path:
    path.write_text(f"""
[model]
bundle = "{bundle}"

[mqtt]
broker = "{broker_url}"
device_id = "{device_id}"
keepalive = {keepalive}

[limits]
queue_depth = {queue_depth}
max_tokens = {max_tokens}
max_payload_bytes = {max_payload_bytes}

[service]
state_dir = "{state_dir}"
log_level = "{log_level}"
""")
    return path


class ServeProcess:
    """`python -m edge_runtime serve --config FILE` (the real CLI) as a child process."""

    def __init__(self, config: Path, log_path: Path, *, extra: list[str] | None = None,
                 preexec_fn=None, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        cmd = [sys.executable, "-m", "edge_runtime", "serve", "--config", str(config), *(extra or [])]
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=dict(env or os.environ, PYTHONUNBUFFERED="1"), preexec_fn=preexec_fn)
        self.pid = self.process.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def fds(self) -> int:
        return psutil.Process(self.pid).num_fds()

    def threads(self) -> int:
        return psutil.Process(self.pid).num_threads()

    def kill(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        self.kill()
        self._log.close()


class PeakSampler:
    """Samples a process's RSS every `interval` s in a thread; `.peak` and `.series`."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self._proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.series: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                rss = self._proc.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self.series.append((time.monotonic() - t0, rss))
            self._stop.wait(self.interval)


# -- the client side -------------------------------------------------------------------------


@dataclass
class Answer:
    finals: list[dict] = field(default_factory=list)
    chunks: list[dict] = field(default_factory=list)
    first_reply_at: float | None = None


def _no_nagle(client, userdata, sock) -> None:
    import socket

    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


class Ledger:
    """A raw MQTT 5 client that sends requests with a Response Topic of its own
    (``rel/<tag>/<id>``) and records every chunk and final reply by request id.

    `persistent` keeps its session (subscription and queued replies) across broker
    restarts; publishes never block (paho resends unacknowledged ones after a
    reconnect)."""

    def __init__(self, host: str, port: int, *, tag: str | None = None, persistent: bool = False,
                 client_id: str | None = None, username: str | None = None, password: str | None = None) -> None:
        self.tag = tag or uuid.uuid4().hex[:8]
        self.prefix = f"rel/{self.tag}"
        self.answers: dict[str, Answer] = defaultdict(Answer)
        self.sent_at: dict[str, float] = {}
        self.other: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self._subacks: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"ledger-{self.tag}", protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        if username is not None:
            self.client.username_pw_set(username, password)
        connected = threading.Event()
        self._connack: list[Any] = []

        self._subscriptions: list[str] = []

        def on_connect(c, u, flags, rc, props):
            self._connack.append(rc)
            if connected.is_set() and not rc.is_failure:
                for topic in self._subscriptions:  # the broker may have lost the session
                    c.subscribe(topic, qos=1)
            connected.set()

        self.client.on_connect = on_connect
        self.client.on_socket_open = _no_nagle
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subacks.put(rcs)
        props = Properties(PacketTypes.CONNECT)
        if persistent:
            props.SessionExpiryInterval = 3600
        self.client.connect(host, port, keepalive=10, clean_start=not persistent, properties=props)
        self.client.loop_start()
        if not connected.wait(10) or self._connack[-1].is_failure:
            self.client.loop_stop()
            raise ConnectionError(f"ledger could not connect: {self._connack}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def subscribe(self, topic: str) -> list[Any]:
        self._subscriptions.append(topic)
        self.client.subscribe(topic, qos=1)
        return self._subacks.get(timeout=10)

    def listen(self) -> "Ledger":
        self.subscribe(f"{self.prefix}/#")
        return self

    def reply_topic(self, request_id: str) -> str:
        return f"{self.prefix}/{request_id}"

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        if not msg.topic.startswith(self.prefix + "/"):
            with self._cond:
                self.other.append(msg)
                self._cond.notify_all()
            return
        key = msg.topic[len(self.prefix) + 1:]
        try:
            obj = json.loads(msg.payload)
        except ValueError:
            obj = {"unparseable": msg.payload[:200].decode(errors="replace")}
        with self._cond:
            answer = self.answers[key]
            if answer.first_reply_at is None:
                answer.first_reply_at = now
            if isinstance(obj, dict) and obj.get("done") is True:
                answer.finals.append(obj)
            else:
                answer.chunks.append(obj)
            self._cond.notify_all()

    def send(self, topic: str, request_id: str, payload: bytes | dict, *, correlation: bytes | None = None,
             wait: bool = False) -> mqtt.MQTTMessageInfo:
        """Publish a request (QoS 1) whose replies go to ``rel/<tag>/<request_id>``."""
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic(request_id)
        props.CorrelationData = correlation if correlation is not None else request_id.encode()
        self.sent_at[request_id] = time.monotonic()
        info = self.client.publish(topic, payload, qos=1, properties=props)
        if wait:
            info.wait_for_publish(10)
        return info

    def finals(self, request_id: str) -> list[dict]:
        with self._cond:
            return list(self.answers[request_id].finals) if request_id in self.answers else []

    def wait_finals(self, ids, timeout: float) -> set[str]:
        """Wait until every id has a final reply; returns the ids still without one."""
        ids = list(ids)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                missing = {i for i in ids if not (i in self.answers and self.answers[i].finals)}
                remaining = deadline - time.monotonic()
                if not missing or remaining <= 0:
                    return missing
                self._cond.wait(min(remaining, 0.5))

    def wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.5))
            return True

    def tally(self, ids) -> dict[str, Any]:
        """Lost (no final), duplicated (more than one final) and conflicting (finals
        that differ in text or error) answers over `ids`; and restreamed: answers
        streamed again (generated again after a daemon restart) whose chunks of one
        `seq` differ, so the stream the client saw is not the final text."""
        lost, dup, conflicting, restreamed = [], [], [], []
        with self._cond:
            for i in ids:
                finals = self.answers[i].finals if i in self.answers else []
                by_seq: dict[Any, set] = {}
                for chunk in self.answers[i].chunks if i in self.answers else []:
                    by_seq.setdefault(chunk.get("seq"), set()).add(chunk.get("delta"))
                if any(len(deltas) > 1 for deltas in by_seq.values()):
                    restreamed.append(i)
                if not finals:
                    lost.append(i)
                    continue
                if len(finals) > 1:
                    dup.append(i)
                    if len({json.dumps({k: f.get(k) for k in ("text", "error", "finish_reason")}, sort_keys=True)
                            for f in finals}) > 1:
                        conflicting.append(i)
        return {"requests": len(list(ids)), "lost": len(lost), "duplicated": len(dup),
                "conflicting": len(conflicting), "restreamed_differently": len(restreamed),
                "lost_ids": lost[:20], "duplicated_ids": dup[:20], "conflicting_ids": conflicting[:20],
                "restreamed_differently_ids": restreamed[:20]}


class StatusWatch:
    """Follows a device's retained status topic."""

    def __init__(self, host: str, port: int, device_id: str) -> None:
        self.topic = f"edge/{device_id}/v1/status"
        self.states: list[dict] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"status-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.topic, qos=1)
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            obj = json.loads(msg.payload)
        except ValueError:
            return
        obj["_received"] = time.monotonic()
        with self._cond:
            self.states.append(obj)
            self._cond.notify_all()

    def wait_state(self, state: str, timeout: float, *, after: float = 0.0) -> dict:
        """The first status with `state` received after monotonic time `after`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for s in self.states:
                    if s.get("state") == state and s["_received"] >= after:
                        return s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {state!r} status within {timeout}s; saw "
                                         f"{[s.get('state') for s in self.states]}")
                self._cond.wait(min(remaining, 0.5))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_online(watch: StatusWatch, proc: Any, timeout: float, after: float) -> dict:
    """Wait for `online` from this start of the daemon (a ServeProcess or
    service_harness.DaemonProcess); fail at once if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.process.returncode}:\n{proc.log[-3000:]}")
        try:
            return watch.wait_state("online", 0.5, after=after)
        except AssertionError:
            continue
    raise AssertionError(f"daemon not online within {timeout}s:\n{proc.log[-3000:]}")
