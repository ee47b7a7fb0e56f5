"""The MQTT daemon: composes the broker connection, the wire protocol, the
scheduler (bounded queue + one engine worker) and the reply store.

Threads:

* paho's network thread runs every MQTT callback. It validates a request,
  answers what can be answered at once (bad requests, `busy`, stored replies)
  and queues the rest; it never waits on generation.
* ``edge-worker`` (the scheduler) runs the engine, one request at a time, and
  publishes chunks as tokens come.
* ``edge-acker`` acknowledges requests to the broker once their final reply is
  published (the final reply is stored before that, see `reply_store`).
* ``edge-housekeeping`` republishes the retained status when the queue changes
  and answers queued requests whose deadline has passed.

Delivery guarantees: the daemon uses a persistent session and manual
acknowledgement. A request is acknowledged only after its final reply was
stored and published, so a crash at any point leads to a redelivery, which is
answered from the reply store when the request had finished and generated
(once more) when it had not.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from . import __version__
from .config import ServiceConfig
from .errors import BadRequest, EdgeRuntimeError
from .guard import PolicyGuard
from .mqtt_connection import (RECONNECT_DELAY_S, Will, connect_async, make_client, publish_properties, response_route,
                              why_unreachable)
from .protocol import (
    FLEET_GENERATE_TOPIC,
    ProtocolError,
    WireRequest,
    encode_chunk,
    encode_count,
    encode_error,
    encode_final,
    encode_status,
    error_fields,
    fleet_subscription,
    is_control_topic,
    is_valid_publish_topic,
    parse_cancel,
    parse_request,
    reply_client_id,
    reply_topic_too_long,
)
from .device_lock import DeviceLock
from .policy import Policy, load_policy
from .reply_store import DEFAULT_MAX_ENTRIES, ReplyStore, request_key
from .scheduler import EngineLike, Job, Outcome, Scheduler, Submit
from .types import Chunk, GenerationResult

log = logging.getLogger(__name__)

SHORT_SESSION_S = 10.0  # a connection the broker closes sooner counts as short
SHORT_SESSIONS = 3  # short connections in a row before the daemon says why and slows down
FLAPPING_RECONNECT_S = (15, 60)  # reconnect backoff while connections keep being closed
# A connection that lasts this long ends the slow-down: longer than the slowed backoff, so
# two daemons that take turns every 15-60 s do not count as settled.
LASTING_SESSION_S = 2.0 * FLAPPING_RECONNECT_S[1]
# CONNACK reason codes of a refused login: MQTT 5 "Bad User Name or Password" and "Not authorized"
# (paho maps MQTT 3.1.1's return codes 4 and 5 onto them)
REFUSED_LOGIN = (0x86, 0x87)
# Signals that drain the daemon (a second one abandons the running request)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# `serve`'s exit status after a SIGHUP drain (128 + SIGHUP, as a shell reports a hangup). The
# unit restarts the daemon on it (RestartForceExitStatus=) and counts it a success: under
# systemd a `kill -HUP` is an operator's reload, and an exit 0 left the service stopped.
SIGHUP_EXIT_STATUS = 128 + signal.SIGHUP
# MQTT 5 Receive Maximum of the daemon's connection (the protocol's largest). A request stays
# unacknowledged until its final reply, so without it the broker's in-flight window (Mosquitto's
# max_inflight_messages, 20) held every request past the 19th queued, and every cancel behind
# them, at the broker: no `busy`, not in the status, a cancel for the running request held
# until it ended. Past queue_depth a request is refused `busy` (and acknowledged) at once.
RECEIVE_MAXIMUM = 65535
# An MQTT 3.1.1 connection cannot ask for more: Mosquitto's default in-flight window
MQTT311_IN_FLIGHT_WINDOW = 20


@dataclass(frozen=True)
class ReplyRoute:
    """Where a request's replies go: the MQTT 5 Response Topic (with its
    Correlation Data) or the `reply_to` topic of an MQTT 3.1.1 client."""

    topic: str
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class Delivery:
    """One delivery of a request by the broker, to acknowledge later.
    `generation` counts connections: an ack is sent only on the connection the
    message came on (after a reconnect the broker delivers it again)."""

    mid: int
    qos: int
    generation: int


@dataclass(frozen=True)
class Health:
    """What a watchdog needs. Truthy when healthy."""

    ok: bool
    state: str  # "starting" | "online" | "draining" | "offline"
    worker_alive: bool
    stalled_for_s: float  # seconds since the worker's last progress (0 while idle)
    connected: bool
    queue_depth: int
    running: str | None  # id of the request being generated

    def __bool__(self) -> bool:
        return self.ok


class _Acker:
    """Acknowledges deliveries once the reply published before them is complete."""

    def __init__(self, service: "EdgeService", wait_s: float = 10.0) -> None:
        self._service = service
        self._wait_s = wait_s
        self._queue: queue.SimpleQueue[tuple[mqtt.MQTTMessageInfo | None, list[Delivery]] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="edge-acker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, info: mqtt.MQTTMessageInfo | None, deliveries: list[Delivery]) -> None:
        self._queue.put((info, deliveries))

    def close(self, timeout: float) -> None:
        """Finish what is queued (bounded by `timeout`), then stop."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            info, deliveries = item
            try:
                self._handle(info, deliveries)
            except Exception:
                log.exception("acknowledging failed")

    def _handle(self, info: mqtt.MQTTMessageInfo | None, deliveries: list[Delivery]) -> None:
        if info is not None and not self._confirmed(info) and not self._service.connected:
            # The broker redelivers the request after the reconnect; it is answered
            # from the reply store then (paho also resends the reply itself).
            log.debug("reply not confirmed and the connection is down; not acknowledging %s", deliveries)
            return
        # Unconfirmed on a live connection: paho keeps retrying the reply, and it is stored.
        self._service._ack(deliveries)

    def _confirmed(self, info: mqtt.MQTTMessageInfo) -> bool:
        """Whether the broker acknowledged the reply (waits up to `wait_s`)."""
        try:
            info.wait_for_publish(self._wait_s)
            return info.is_published()
        except (RuntimeError, ValueError):
            return False  # published while disconnected (paho sends it after reconnecting)


class EdgeService:
    """The daemon. `engine` is injected (anything with `info` and `generate`).

    ``start()`` connects in the background (reconnecting with backoff) and starts
    the worker; ``run_forever()`` blocks until SIGTERM/SIGINT/SIGHUP and drains;
    ``request_drain()`` starts a drain from any thread (or a signal handler);
    ``drain()`` drains and waits; ``stop()`` stops at once, leaving unfinished
    requests to the broker for redelivery.

    Hooks for a service manager: ``on_ready()`` is called once, when the daemon is
    subscribed and serving; ``on_status(text)`` with a one-line status on every
    state change; ``health()`` says whether the worker is alive and making progress.
    """

    def __init__(self, config: ServiceConfig, engine: EngineLike, *,
                 on_ready: Callable[[], None] | None = None,
                 on_status: Callable[[str], None] | None = None,
                 stall_after_s: float = 300.0,
                 status_interval_s: float = 1.0,
                 reply_store_entries: int = DEFAULT_MAX_ENTRIES,
                 version: str = __version__,
                 policy: Policy | None = None,
                 device_lock: DeviceLock | None = None) -> None:
        self.config = config
        self.engine = engine
        self.on_ready: Callable[[], None] = on_ready or (lambda: None)
        self.on_status: Callable[[str], None] = on_status or (lambda text: None)
        self.version = version
        self.topics = config.mqtt.topics
        self.protocol = config.mqtt.protocol
        self.limits = config.limits
        self.log_content = config.service.log_content
        self.state_dir = Path(config.service.resolved_state_dir)
        self._status_interval_s = status_interval_s
        self._reply_store_entries = reply_store_entries
        if policy is None and config.policy.file is not None:
            policy = load_policy(config.policy.file)
        # The operator's policy: admission checks here, classifier and output rules around the engine.
        self.guard = PolicyGuard.create(policy, self.state_dir) if policy is not None else None
        if policy is not None and policy.classifier is not None:
            # the classifier runs in the worker before a request's first token, for up to its timeout
            # (at most 600 s): that long without a token is not a stall (systemd's watchdog would kill it)
            stall_after_s += policy.classifier.timeout_s
        self.scheduler = Scheduler(self.guard.wrap(engine) if self.guard else engine, self, depth=config.limits.queue_depth,
                                   on_change=self._mark_status_dirty, stall_after_s=stall_after_s,
                                   log_content=self.log_content)
        self.store: ReplyStore | None = None
        self._client: mqtt.Client | None = None
        self._acker = _Acker(self)
        self._state = "starting"
        self._lock = threading.Lock()
        self._connected = False
        self._connect_failures = 0  # failed attempts since the last connection (or start)
        self._connack_seen = False  # the broker answered the current connection attempt (CONNACK)
        self._publish_refusal_said = False  # a PUBACK that refused a message was logged on this connection
        self._refused_reply_topics: set[str] = set()  # reply topics a PUBACK refused, logged once each
        self._connected_at = 0.0  # monotonic time of the last connection
        self._short_sessions = 0  # connections in a row the broker closed within SHORT_SESSION_S
        self._generation = 0
        self._subscribe_mid: int | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._drain_requested = threading.Event()
        self._abort = threading.Event()
        self._drain_once = threading.Lock()
        self._stop_signal: signal.Signals | None = None  # the signal that asked for the drain
        self._status_dirty = False
        self._hk_stop = threading.Event()
        self._housekeeping: threading.Thread | None = None
        # held from start to stop; `serve` passes the one it took before loading the bundle
        self._device_lock = device_lock or DeviceLock(self.state_dir, config.mqtt.device_id)
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def state(self) -> str:
        return self._state

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def stop_signal(self) -> signal.Signals | None:
        """The signal that asked `run_forever` to drain, if one did."""
        return self._stop_signal

    def start(self) -> "EdgeService":
        """Open the reply store, start the worker and connect (in the background)."""
        if self._started:
            return self
        self._started = True
        try:
            self._start()
        except BaseException:
            self._abandon_start()
            raise
        return self

    def _start(self) -> None:
        self._device_lock.acquire()
        try:
            self.store = ReplyStore(self.state_dir / f"replies-{self.config.mqtt.device_id}.sqlite3",
                                    max_entries=self._reply_store_entries)
        except (OSError, sqlite3.Error) as exc:  # a full or read-only disk: say so, no traceback
            raise EdgeRuntimeError(f"cannot open the reply store in {self.state_dir} (service.state_dir): "
                                   f"{exc}") from exc
        self.scheduler.start()
        self._acker.start()
        m = self.config.mqtt
        self._client = make_client(
            client_id=m.client_id, protocol=m.protocol, address=m.address,
            username=m.username, password=m.read_password(), tls=m.tls,
            will=Will(self.topics.status, self._status_payload("offline", running=False, reason="connection lost")),
            manual_ack=True, persistent=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        # said before the network thread starts: it may connect and say "serving" at once
        self._set_status_text(f"connecting to {m.address.url}")
        connect_async(self._client, m.address, protocol=m.protocol, keepalive=m.keepalive,
                      persistent=True, session_expiry_s=m.session_expiry_s, receive_maximum=RECEIVE_MAXIMUM)
        self._client.loop_start()
        self._housekeeping = threading.Thread(target=self._housekeeping_loop, name="edge-housekeeping",
                                              daemon=True)
        self._housekeeping.start()
        info = getattr(self.engine, "info", None)
        log.info("edge-runtime %s: device %s, model %s (%s, %s), broker %s, protocol %s, queue depth %d",
                 self.version, m.device_id, getattr(info, "model_name", "?"), getattr(info, "profile", "?"),
                 getattr(info, "precision", "?"), m.address.url, m.protocol, self.limits.queue_depth)
        log.info("state directory %s (reply store%s)", self.state_dir, ", audit log" if self.guard else "")
        if m.protocol == "3.1.1" and self.limits.queue_depth + 1 >= MQTT311_IN_FLIGHT_WINDOW:
            log.warning("queue_depth %d with MQTT 3.1.1: the broker sends at most its in-flight window of "
                        "unacknowledged requests (Mosquitto's max_inflight_messages, %d by default) and a request "
                        "is acknowledged with its final reply, so the requests past it, and the cancels behind "
                        "them, wait at the broker; raise max_inflight_messages above queue_depth + 1 (0: no "
                        "limit) or use [mqtt] protocol = \"5\"", self.limits.queue_depth, MQTT311_IN_FLIGHT_WINDOW)
        if self.guard is not None:
            policy = self.guard.policy
            log.info("policy %s: sha256 %s, %d rules, classifier %s", policy.source, policy.sha256[:16],
                     len(policy.rules), policy.summary()["classifier"] or "none")
        else:
            log.info("no operator policy ([policy] file): requests are checked only against the limits")

    def _abandon_start(self) -> None:
        """Undo a start that failed half-way (the error propagates)."""
        self.scheduler.stop_accepting()
        self._acker.close(timeout=1.0)
        self._hk_stop.set()
        if self._client is not None:
            self._client.loop_stop()
        if self.store is not None:
            self.store.close()
        self._device_lock.release()
        self._state = "offline"
        self._drain_once.acquire(blocking=False)
        self._stopped.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the daemon is subscribed and has published `online`."""
        return self._ready.wait(timeout)

    def run_forever(self) -> None:
        """Start (if needed), serve until SIGTERM, SIGINT or SIGHUP, then drain and return.
        A second signal during the drain abandons the running request. SIGHUP (a closed
        terminal, `kill -HUP` out of a reload habit) drains too: its default action killed
        the daemon mid-request, and systemd counts a SIGHUP death as clean, so
        `Restart=on-failure` left the device down with nothing in the journal."""
        installed: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                installed[sig] = signal.signal(sig, self._on_signal)
        try:
            self.start()
            while not self._drain_requested.wait(0.5):
                pass
            if self._stop_signal is not None:
                log.info("%s: stopping%s", self._stop_signal.name,
                         f" (exit status {SIGHUP_EXIT_STATUS}: the installed unit starts the daemon again, which "
                         "reads its config and bundle anew; elsewhere, to apply a change, start it again)"
                         if self._stop_signal == signal.SIGHUP else "")
            self.drain()
        finally:
            for sig, previous in installed.items():
                signal.signal(sig, previous)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._drain_requested.is_set():
            self._abort.set()
        elif self._stop_signal is None:
            self._stop_signal = signal.Signals(signum)
        self._drain_requested.set()

    def request_drain(self) -> None:
        """Begin a graceful drain in a background thread (thread-safe, idempotent);
        `run_forever` and `wait_stopped` return once it is done."""
        first = not self._drain_requested.is_set()
        self._drain_requested.set()
        if first and not self._drain_once.locked():
            threading.Thread(target=self.drain, name="edge-drain", daemon=True).start()

    def drain(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish the running one (unless `timeout` seconds
        pass first), leave queued ones unacknowledged for redelivery, publish
        `offline` and disconnect. Returns when done (also when already stopped)."""
        self._shutdown(graceful=True, timeout=timeout)

    def stop(self) -> None:
        """Stop at once: the running request is abandoned (cancelled, no reply, not
        acknowledged: the broker redelivers it), then `offline` and disconnect."""
        self._abort.set()
        self._shutdown(graceful=False, timeout=0)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def _shutdown(self, *, graceful: bool, timeout: float | None) -> None:
        if not self._drain_once.acquire(blocking=False):
            self._stopped.wait()
            return
        self._drain_requested.set()
        if not self._started:
            self._state = "offline"
            self._stopped.set()
            return
        with self._lock:
            self._state = "draining"
        self.scheduler.stop_accepting()
        # a request that came only at QoS 0 is never delivered again: answer it now, `busy`
        for job in self.scheduler.take_queued(lambda j: all(d.qos == 0 for d in j.deliveries)):
            self._refuse_while_stopping(job.id, job.route)
        running = self.scheduler.running
        log.info("draining: %s; %d queued request(s) left for redelivery",
                 f"finishing request {running.id!r}" if running else "no request running",
                 self.scheduler.queue_depth)
        self._set_status_text("draining")
        self._publish_status()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.scheduler.wait_stopped(0.1):
            if self._abort.is_set() or not graceful or (deadline is not None and time.monotonic() > deadline):
                abandoned = self.scheduler.abandon_all()
                if abandoned:
                    log.warning("abandoned request(s) %s: left for redelivery",
                                ", ".join(repr(j.id) for j in abandoned))
                self.scheduler.wait_stopped(5.0)
                break
        self._acker.close(timeout=15.0)
        self._stop_housekeeping()
        with self._lock:
            self._state = "offline"
        client = self._client
        if client is not None:
            info = self._publish_status()
            if info is not None and self._connected:
                try:
                    info.wait_for_publish(5.0)
                except (RuntimeError, ValueError):
                    pass
            client.disconnect()
            client.loop_stop()
        if self.store is not None:
            self.store.close()
        self._device_lock.release()
        self._set_status_text("stopped")
        log.info("stopped")
        self._stopped.set()

    def __enter__(self) -> "EdgeService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ health

    def health(self) -> Health:
        """Healthy while the worker thread is alive and, when busy, made progress
        (a token) within `stall_after_s` seconds, which must therefore exceed the
        longest prefill. Broker outages do not count (paho reconnects on its own).
        Quick and thread-safe: meant for a watchdog thread. Not yet started, and
        draining or stopped after a requested shutdown, is not a failure."""
        now = time.monotonic()
        running = self.scheduler.running
        stalled_for = max(0.0, now - self.scheduler.last_progress) if running is not None else 0.0
        alive = self.scheduler.worker_alive
        state = self._state
        shutting_down = self._drain_requested.is_set()
        ok = ((shutting_down or (state != "offline" and (alive or not self.scheduler.worker_started)))
              and stalled_for <= self.scheduler.stall_after_s)
        return Health(ok=ok, state=state, worker_alive=alive, stalled_for_s=round(stalled_for, 3),
                      connected=self._connected, queue_depth=self.scheduler.queue_depth,
                      running=running.id if running is not None else None)

    # ------------------------------------------------------------------ status

    def _status_payload(self, state: str, **extra: Any) -> bytes:
        return encode_status(state, device_id=self.config.mqtt.device_id,
                             model_info=getattr(self.engine, "info", None),
                             queue_depth=self.scheduler.queue_depth, queue_limit=self.limits.queue_depth,
                             version=self.version, mqtt_version=self.protocol,
                             policy=self.guard.policy.summary() if self.guard else None, **extra)

    def _publish_status(self) -> mqtt.MQTTMessageInfo | None:
        client = self._client
        if client is None:
            return None
        with self._lock:
            state = self._state
            self._status_dirty = False
        if state == "starting":
            return None
        running = self.scheduler.running
        return client.publish(self.topics.status,
                              self._status_payload(state, running=running is not None),
                              qos=1, retain=True)

    @property
    def serving_status(self) -> str:
        """The one-line status while serving (systemd's STATUS=, `systemctl status`): the model
        and the queue, updated with the retained status (about once a second at most)."""
        info = getattr(self.engine, "info", None)
        model = (f"{info.model_name} ({info.precision}) on {info.provider}" if info is not None
                 else self.topics.generate)
        return (f"serving {model}: {self.scheduler.queue_depth} queued of {self.limits.queue_depth}, "
                f"{'generating' if self.scheduler.running is not None else 'idle'}")

    def _mark_status_dirty(self) -> None:
        self._status_dirty = True

    def _set_status_text(self, text: str) -> None:
        try:
            self.on_status(text)
        except Exception:
            log.exception("on_status hook failed")

    def _housekeeping_loop(self) -> None:
        while not self._hk_stop.wait(self._status_interval_s):
            try:
                self.scheduler.expire_queued()
                if self._status_dirty and self._connected and self._state == "online":
                    self._publish_status()
                    self._set_status_text(self.serving_status)
            except Exception:
                log.exception("housekeeping failed")

    def _stop_housekeeping(self) -> None:
        self._hk_stop.set()
        thread = self._housekeeping
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        self._housekeeping = None

    # ------------------------------------------------------------------ MQTT callbacks (network thread)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: Any, properties: Any) -> None:
        self._connack_seen = True
        if reason_code.is_failure:
            hint = (" (check [mqtt] username and password_file against the broker's password file)"
                    if getattr(reason_code, "value", None) in REFUSED_LOGIN else "")
            self._note_failed_attempt(f"broker refused the connection: {reason_code}{hint}", logging.ERROR)
            return
        self._generation += 1
        self._publish_refusal_said = False
        self._connected = True
        self._connect_failures = 0
        self._connected_at = time.monotonic()
        log.info("connected to %s (session present: %s)", self.config.mqtt.address.url, flags.session_present)
        if self._generation > 1 and not flags.session_present:
            log.warning("the broker kept no session for this daemon while it was disconnected: requests sent "
                        "meanwhile are lost (a broker restarted without persistence, or the session expired: "
                        "[mqtt] session_expiry_s, %d s, which the broker counts on its wall clock, so a jump of "
                        "its clock forward ends it sooner; docs/deployment.md, \"The device's clock\")",
                        self.config.mqtt.session_expiry_s)
        subs = [(self.topics.generate, 1), (self.topics.cancel, 1)]
        if self.config.mqtt.fleet_group:
            subs.append((fleet_subscription(self.config.mqtt.fleet_group), 1))
        _, self._subscribe_mid = client.subscribe(subs)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        """The broker could not be reached at all (refused, unreachable, TLS failed):
        paho retries with backoff (1 s doubling to 30 s). Said at the first failure and
        then at every power of two, so a wrong address or a stopped broker shows in the
        journal at once without filling it while the broker stays down."""
        self._connect_failures += 1
        n = self._connect_failures
        if n & (n - 1) == 0:
            # why, probed on a thread of its own: name resolution has no timeout, and paho's network
            # thread (this one) must not wait on it
            address = self.config.mqtt.address
            threading.Thread(target=lambda: log.warning(
                "cannot reach the broker at %s (%d failed attempt%s; a probe now: %s); retrying", address.url, n,
                "" if n == 1 else "s", why_unreachable(address, tls=self.config.mqtt.tls)), name="broker-probe",
                daemon=True).start()
        self._set_status_text(f"cannot reach the broker at {self.config.mqtt.address.url}; retrying")

    def _note_failed_attempt(self, reason: str, level: int) -> None:
        """A connection attempt that reached the broker but did not connect (refused, or closed
        before its CONNACK): logged at the first failure and at every power of two, as an
        unreachable broker is, with the status line saying it at each."""
        self._connect_failures += 1
        n = self._connect_failures
        url = self.config.mqtt.address.url
        if n & (n - 1) == 0:
            log.log(level, "cannot connect to the broker at %s (%d failed attempt%s): %s; retrying", url, n,
                    "" if n == 1 else "s", reason)
        self._set_status_text(f"cannot connect to the broker at {url}: {reason}; retrying")

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[Any],
                      properties: Any) -> None:
        if mid != self._subscribe_mid:
            return
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("the broker refused subscription(s): %s (check the ACL)", ", ".join(failed))
        with self._lock:
            if self._state == "starting":
                self._state = "online"
        self._publish_status()
        if self._state == "online":
            self._set_status_text(self.serving_status)
        if not self._ready.is_set():
            self._ready.set()
            try:
                self.on_ready()
            except Exception:
                log.exception("on_ready hook failed")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        was = self._connected
        self._connected = False
        answered, self._connack_seen = self._connack_seen, False
        if self._drain_once.locked() and self._state == "offline":
            log.debug("disconnected")
            return
        if not was and not answered:  # closed before its CONNACK: a plain mqtt:// connection to a TLS port
            self._note_failed_attempt("the broker closed the connection before answering its CONNECT" + (
                "" if self.config.mqtt.address.tls else " (a TLS port? TLS needs an mqtts:// broker URL)"),
                logging.WARNING)
            return
        self._set_status_text("reconnecting to the broker")
        if was:
            log.warning("lost the broker connection (%s); reconnecting", reason_code)
            self._note_session_end(client, reason_code, time.monotonic() - self._connected_at)

    def _note_session_end(self, client: mqtt.Client, reason_code: Any, lasted_s: float) -> None:
        """A second client with this client id (the same device_id on two machines, an
        image cloned onto many boards) makes the broker close each connection as the other
        one connects: both reconnect at once, forever. Said plainly, and the reconnects
        slowed, after SHORT_SESSIONS connections in a row that lasted under SHORT_SESSION_S
        (or a broker's "session taken over"); a connection that lasts LASTING_SESSION_S
        restores the pace."""
        taken_over = getattr(reason_code, "value", None) == 0x8E  # MQTT 5 Session taken over
        slowed = self._short_sessions >= SHORT_SESSIONS
        if not taken_over and (lasted_s >= LASTING_SESSION_S or (lasted_s >= SHORT_SESSION_S and not slowed)):
            if slowed:
                client.reconnect_delay_set(min_delay=RECONNECT_DELAY_S[0], max_delay=RECONNECT_DELAY_S[1])
            self._short_sessions = 0
            return
        if not taken_over and lasted_s >= SHORT_SESSION_S:  # slowed, and taking turns with the other client
            return
        self._short_sessions += 1
        n = self._short_sessions
        if taken_over or n == SHORT_SESSIONS or (n > SHORT_SESSIONS and n & (n - 1) == 0):
            log.error("the broker closed this connection %s (%d in a row): another client is probably using the "
                      "client id %r, such as a second daemon with device_id %r (each device needs its own); "
                      "reconnecting every %d-%d s until a connection lasts", "as another client took over its session"
                      if taken_over else f"within {SHORT_SESSION_S:.0f} s of connecting", n,
                      self.config.mqtt.client_id, self.config.mqtt.device_id, *FLAPPING_RECONNECT_S)
            self._set_status_text(f"the broker keeps closing the connection: is client id {self.config.mqtt.client_id!r} "
                                  "used twice?")
        if taken_over or n >= SHORT_SESSIONS:
            client.reconnect_delay_set(min_delay=FLAPPING_RECONNECT_S[0], max_delay=FLAPPING_RECONNECT_S[1])

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        """An MQTT 5 broker says in its PUBACK when it refuses a message (Mosquitto: "Not
        authorized" where its ACL does not let this user write the topic): the status and the
        replies go nowhere, while the connection looks fine. Said once a connection."""
        if not getattr(reason_code, "is_failure", False):
            return
        # the refused message is still in paho's out-queue while this callback runs (under its lock)
        refused = getattr(client, "_out_messages", {}).get(mid)
        topic = getattr(refused, "topic", None)
        if topic is not None and topic != self.topics.status:
            # a reply: the topic came from a client, and may be one the ACL never lets this daemon write
            if topic in self._refused_reply_topics or len(self._refused_reply_topics) >= 100:
                log.debug("the broker refused a reply on %r: %s", topic, reason_code)
                return
            self._refused_reply_topics.add(topic)
            log.warning("the broker refused a reply on %r (%s): the client never gets it; a client's reply topic "
                        "must be one this daemon's MQTT user may write (with the sample ACL of deploy/: "
                        "edge/%s/v1/reply/<client username>/...)", topic, reason_code, self.config.mqtt.device_id)
            return
        if self._publish_refusal_said:
            log.debug("the broker refused message %d: %s", mid, reason_code)
            return
        self._publish_refusal_said = True
        m = self.config.mqtt
        log.error("the broker refused a message this daemon published (%s): its status on %s and its replies go "
                  "nowhere; check the broker's ACL for the MQTT user %s (with the sample ACL of deploy/, the "
                  "username must be the device_id, %r)", reason_code, self.topics.status,
                  repr(m.username) if m.username is not None else "(anonymous)", m.device_id)
        self._set_status_text(f"the broker refuses what this daemon publishes ({reason_code}): check its ACL")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        delivery = Delivery(message.mid, message.qos, self._generation)
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self._ack([delivery])
            return
        try:
            if message.retain and topic in (self.topics.cancel, self.topics.generate):
                # a retained request or cancel: the broker hands it to the daemon at every
                # subscribe (every restart); the live copy, if any, came without the flag
                log.warning("ignored a retained message on %s: requests and cancels must be published without the "
                            "retain flag, or they come again at every restart (clear it: mosquitto_pub -t '%s' "
                            "-r -n)", topic, topic)
                self._ack([delivery])
            elif topic == self.topics.cancel:
                if self._handle_cancel(message.payload):
                    self._ack([delivery])
            elif topic in (self.topics.generate, FLEET_GENERATE_TOPIC):
                self._handle_request(message, delivery)
            else:
                self._ack([delivery])
        except Exception:
            log.exception("failed to handle a message on %s", topic)
            self._ack([delivery])

    # ------------------------------------------------------------------ requests (network thread)

    def _handle_cancel(self, payload: bytes) -> bool:
        """Cancel what the message names; False: leave it unacknowledged. While draining, a
        cancel that matches nothing may be for a request the drain left for redelivery: the
        broker redelivers both to the next daemon, the request first, where it then matches."""
        if not payload:  # what clears a retained cancel (mosquitto_pub -r -n)
            log.info("ignored an empty message on %s (one that clears a retained cancel)", self.topics.cancel)
            return True
        try:
            request_id = parse_cancel(payload)
        except ProtocolError as exc:
            log.warning("ignored a cancel: %s", exc.message)
            return True
        matched = self.scheduler.cancel(request_id)
        if not matched and self._drain_requested.is_set():
            log.info("cancel %r: no queued or running request; left for the next daemon (draining)", request_id)
            return False
        log.info("cancel %r: %s", request_id, "matched" if matched else "no queued or running request")
        return True

    def _handle_request(self, message: mqtt.MQTTMessage, delivery: Delivery) -> None:
        response_topic, correlation = response_route(message)
        if self._drain_requested.is_set() or self._state not in ("starting", "online"):
            # Draining: leave it unacknowledged; the broker redelivers it to the next daemon,
            # but not one that came at QoS 0: that one is answered `busy` (or its error)
            if message.qos == 0:
                try:
                    wire = parse_request(message.payload, self.limits)
                except ProtocolError as exc:
                    topic = response_topic or exc.reply_to
                    if self._usable_reply_topic(topic):
                        self._publish(ReplyRoute(topic, correlation), encode_error(exc.request_id, exc.code,
                                                                                   exc.message))
                    return
                topic = response_topic or wire.reply_to
                if self._usable_reply_topic(topic) and not reply_topic_too_long(topic):
                    self._refuse_while_stopping(wire.id, ReplyRoute(topic, correlation))
                return
            log.debug("draining: left a request for redelivery")
            return
        if not message.payload and response_topic is None:
            # what clears a retained request (mosquitto_pub -r -n, as the warning about one says):
            # the broker hands subscribers the empty message too; nothing to answer or warn about
            log.info("ignored an empty message on %s (one that clears a retained request)", message.topic)
            self._ack([delivery])
            return
        try:
            wire = parse_request(message.payload, self.limits)
        except ProtocolError as exc:
            topic = response_topic or exc.reply_to
            if not self._usable_reply_topic(topic):
                log.warning("dropped an invalid request (%s: %s) that has no usable reply topic",
                            exc.code, exc.message)
                self._ack([delivery])
                return
            assert topic is not None
            log.info("request %r rejected: %s: %s", exc.request_id, exc.code, exc.message)
            info = self._publish(ReplyRoute(topic, correlation), encode_error(exc.request_id, exc.code,
                                                                              exc.message))
            self._acker.submit(info, [delivery])
            return
        topic = response_topic or wire.reply_to
        if not self._usable_reply_topic(topic):
            log.warning("request %r dropped: no usable reply topic (MQTT 5 Response Topic or reply_to)",
                        wire.id)
            self._ack([delivery])
            return
        assert topic is not None
        route = ReplyRoute(topic, correlation)
        too_long = reply_topic_too_long(topic)  # an MQTT 5 Response Topic (a reply_to was checked with the JSON)
        if too_long:
            log.info("request %r rejected: bad_request: %s", wire.id, too_long)
            self._acker.submit(self._publish(route, encode_error(wire.id, "bad_request", too_long)), [delivery])
            return
        key = request_key(topic, wire.id)
        pending = self.scheduler.attach(key, delivery)
        if pending is not None:
            if pending.body != message.payload:
                log.warning("request %r came again with another body while it is pending: it is answered once, for "
                            "the body it first came with (a new request needs a new id)", wire.id)
            else:
                log.info("request %r delivered again while pending; it will be answered once", wire.id)
            return
        assert self.store is not None
        stored = self.store.get(key)
        if stored is not None:
            log.info("request %r was answered before: sending the stored final reply", wire.id)
            self._acker.submit(self._publish(route, stored), [delivery])
            return
        client = reply_client_id(topic)  # "" when the reply topic names no client: no prompt cache to scope it by
        cache = bool(client) and wire.request.cache_prompt  # the request's "cache_prompt": false opts out
        wire = dataclasses.replace(wire, request=dataclasses.replace(wire.request, client_id=client,
                                                                     cache_prompt=cache))
        if self.guard is not None:
            if wire.request.max_tokens_is_default:
                wire = dataclasses.replace(wire, request=self.guard.default_max_tokens(wire.request))
            try:
                self.guard.admit(wire.request)
            except EdgeRuntimeError as exc:
                log.info("request %r refused by the policy: %s: %s", wire.id, exc.code, exc)
                payload = encode_error(wire.id, exc.code, str(exc), retry_after_s=getattr(exc, "retry_after_s", None))
                self._acker.submit(self._publish(route, payload), [delivery])
                return
        if wire.count_tokens:
            self._answer_count(wire, route, delivery)
            return
        job = Job(wire=wire, key=key, route=route, deliveries=[delivery], body=message.payload)
        result = self.scheduler.submit(job)
        if result is not Submit.ACCEPTED and self.guard is not None:
            self.guard.refund(wire.request)
        if result is Submit.FULL:
            log.info("request %r refused: busy (queue of %d is full)", wire.id, self.limits.queue_depth)
            payload = encode_error(wire.id, "busy", f"the queue is full ({self.limits.queue_depth} waiting); "
                                                    "retry later")
            self._acker.submit(self._publish(route, payload), [delivery])
        elif result is Submit.CLOSED and delivery.qos == 0:
            self._refuse_while_stopping(wire.id, route)
        elif result is Submit.CLOSED:
            log.debug("request %r left for redelivery (draining)", wire.id)
        else:
            log.info("request %r queued: client=%s mode=%s prompt_chars=%d max_tokens=%d stream=%s deadline_ms=%d "
                     "queue=%d/%d", wire.id, _shown_client(wire.request.client_id), wire.mode, wire.prompt_chars,
                     wire.request.max_tokens,
                     wire.stream, wire.deadline_ms, self.scheduler.queue_depth, self.limits.queue_depth)
            if self.log_content:
                log.info("request %r content: %r", wire.id, _content(wire.request))

    def _answer_count(self, wire: WireRequest, route: ReplyRoute, delivery: Delivery) -> None:
        """A `"count_tokens": true` request: its prompt is built and counted here, at once (no model run,
        no queue: the tokenizer only), and the count or the error is sent and not stored, as a
        validation error is (the same request again counts again)."""
        count_tokens = getattr(self.engine, "count_tokens", None)
        try:
            if count_tokens is None:
                raise BadRequest("this daemon's engine cannot count tokens")
            payload = encode_count(wire.id, count_tokens(wire.request))
            log.info("request %r counted: client=%s mode=%s prompt_chars=%d", wire.id,
                     _shown_client(wire.request.client_id), wire.mode, wire.prompt_chars)
        except EdgeRuntimeError as exc:
            log.info("request %r (a count) refused: %s: %s", wire.id, exc.code, exc)
            payload = encode_error(wire.id, exc.code, str(exc), fields=error_fields(exc))
        except Exception:
            log.exception("request %r: counting its tokens failed", wire.id)
            payload = encode_error(wire.id, "internal", "internal error while counting tokens")
        self._acker.submit(self._publish(route, payload), [delivery])

    def _refuse_while_stopping(self, request_id: str, route: ReplyRoute) -> None:
        """A request the broker cannot deliver again (QoS 0) while the daemon stops: `busy`,
        not stored, so the same request sent again later is served."""
        log.info("request %r refused: busy (the daemon is stopping; a QoS 0 request is not delivered again)",
                 request_id)
        self._publish(route, encode_error(request_id, "busy", "the daemon is stopping; send the request again "
                                                              "later (at QoS 1 the broker would have kept it)"))

    @staticmethod
    def _usable_reply_topic(topic: str | None) -> bool:
        """A topic replies may go to: publishable, and not a request/cancel/status
        topic of any device (a reply there would act as a request or a cancel)."""
        return topic is not None and is_valid_publish_topic(topic) and not is_control_topic(topic)

    # ------------------------------------------------------------------ publishing / acking

    def _publish(self, route: ReplyRoute, payload: bytes) -> mqtt.MQTTMessageInfo | None:
        client = self._client
        if client is None:
            return None
        props = None
        if route.correlation_data is not None:
            props = publish_properties(self.protocol, correlation_data=route.correlation_data)
        return client.publish(route.topic, payload, qos=1, properties=props)

    def _ack(self, deliveries: list[Delivery]) -> None:
        client = self._client
        if client is None:
            return
        for d in deliveries:
            if d.qos > 0 and d.generation == self._generation and self._connected:
                client.ack(d.mid, d.qos)

    # ------------------------------------------------------------------ JobSink (worker thread)

    def job_started(self, job: Job) -> None:
        waited_ms = ((job.started or time.monotonic()) - job.received) * 1000.0
        log.debug("request %r started after %.0f ms in the queue", job.id, waited_ms)

    def job_chunk(self, job: Job, seq: int, chunk: Chunk) -> None:
        if job.wire.stream:
            self._publish(job.route, encode_chunk(job.id, seq, chunk.text, run=job.run))

    def record(self, job: Job, outcome: Outcome) -> bytes:
        if isinstance(outcome, GenerationResult):
            payload = encode_final(job.id, outcome)
            t = outcome.timings
            log.info("request %r done: client=%s mode=%s finish=%s prompt_tokens=%d (cached %d) completion_tokens=%d "
                     "ttft_ms=%.1f tokens_per_s=%.1f total_ms=%.1f", job.id, _shown_client(job.wire.request.client_id),
                     job.wire.mode, outcome.finish_reason, outcome.usage.prompt_tokens,
                     outcome.usage.cached_prompt_tokens, outcome.usage.completion_tokens,
                     t.ttft_ms, t.decode_tokens_per_s, t.total_ms)
            if self.log_content:
                log.info("request %r text: %r", job.id, outcome.text)
        else:
            payload = encode_error(job.id, outcome.code, str(outcome) or outcome.code, fields=error_fields(outcome))
            log.info("request %r failed: client=%s mode=%s %s: %s", job.id, _shown_client(job.wire.request.client_id),
                     job.wire.mode, outcome.code, outcome)
        try:
            assert self.store is not None
            self.store.put(job.key, payload)
        except (sqlite3.Error, OSError) as exc:  # the disk: full, read-only, failing. One line, not a traceback
            log.error("request %r: could not store the final reply in the reply store %s (service.state_dir): %s; "
                      "it is answered, but a redelivery of it would be generated again. Check that disk (full? "
                      "read-only? failing?); storing resumes once it takes writes", job.id, self.store.path, exc)
        except Exception:
            log.exception("request %r: could not store the final reply", job.id)
        return payload

    def deliver(self, job: Job, payload: bytes, deliveries: list[Any]) -> None:
        self._acker.submit(self._publish(job.route, payload), deliveries)


def _shown_client(client_id: str) -> str:
    """A client id (a reply topic's level) as the log's `client=` field shows it: as is when it
    is one plain word, else quoted, since a topic level may hold spaces and `=` ("x mode=chat")."""
    if not client_id:
        return "-"
    return client_id if re.fullmatch(r"[A-Za-z0-9._@:+-]+", client_id) else repr(client_id)


def _content(request: Any) -> Any:
    if request.mode == "complete":
        return request.prompt
    if request.mode == "infill":
        return {"prefix": request.prefix, "suffix": request.suffix}
    return [(m.role, m.content) for m in request.messages]
