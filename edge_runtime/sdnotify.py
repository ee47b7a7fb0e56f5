"""systemd's sd_notify datagram protocol in pure Python (no libsystemd).

A `Type=notify` service tells systemd that it is ready, what it is doing, that it
is stopping, and that it is alive, by sending newline-separated ``KEY=VALUE``
datagrams to the AF_UNIX socket named in ``$NOTIFY_SOCKET`` (a path, or an
abstract-namespace name when it starts with ``@``). With ``WatchdogSec=`` set,
systemd also passes ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) and kills the
service when no ``WATCHDOG=1`` arrives within that time.

`SystemdNotifier.from_environment` is the one place that reads those variables.
Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op that returns False,
so the daemon calls the notifier unconditionally.

`Watchdog` is the thread that pings: it sends ``WATCHDOG=1`` every
``interval_s`` seconds, but only while the daemon's ``health_check()`` says True;
when the generation worker is stuck the check fails, the pings stop and systemd
restarts the service (``Restart=on-failure``) after ``WatchdogSec=``.

Typical use in the daemon (``EdgeService.health()`` is truthy while the worker
is alive and making progress)::

    notifier = SystemdNotifier.from_environment()
    service = EdgeService(config, engine, on_ready=lambda: notifier.ready("serving"),
                          on_status=notifier.status)
    watchdog = Watchdog(notifier, lambda: bool(service.health()), notifier.watchdog_interval_s)
    watchdog.start()                      # a no-op without WatchdogSec=
    try:
        service.run_forever()             # SIGTERM: notifier.stopping(), then drain
    finally:
        watchdog.stop()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

__all__ = ["ReadyAnnouncer", "StartExtender", "SystemdNotifier", "Watchdog"]

log = logging.getLogger(__name__)


def _socket_address(notify_socket: str) -> str | bytes | None:
    """The sendto() address for a ``$NOTIFY_SOCKET`` value, or None if unusable."""
    if notify_socket.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of '@'.
        return b"\0" + notify_socket[1:].encode()
    if notify_socket.startswith("/"):
        return notify_socket
    # systemd >= 253 also accepts "vsock:CID:PORT"; a device service never sees it.
    return None


def _one_line(text: str) -> str:
    """STATUS= values end at a newline; keep a multi-line text on one line."""
    return " ".join(str(text).split())


class SystemdNotifier:
    """Sends sd_notify messages; a no-op (methods return False) when not under systemd.

    Sending never raises: a failed datagram is logged once at WARNING (later ones
    at DEBUG) and reported by the False return value, because losing a status line
    must not take the daemon down. Thread-safe: the watchdog thread and the main
    thread share one instance.
    """

    def __init__(self, notify_socket: str | None = None, *,
                 watchdog_usec: int | None = None) -> None:
        self._address = _socket_address(notify_socket) if notify_socket else None
        if notify_socket and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or @abstract name; "
                        "systemd notifications are off", notify_socket)
        self.notify_socket = notify_socket if self._address is not None else None
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "SystemdNotifier":
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        The watchdog is ours only if ``WATCHDOG_PID`` is unset or names this
        process (systemd sets it to the main PID; a child that inherited the
        environment must not ping for its parent).
        """
        notify_socket = environ.get("NOTIFY_SOCKET") or None
        watchdog_usec: int | None = None
        raw_usec = environ.get("WATCHDOG_USEC")
        if raw_usec:
            try:
                watchdog_usec = int(raw_usec)
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not an integer; watchdog off", raw_usec)
            raw_pid = environ.get("WATCHDOG_PID")
            if watchdog_usec is not None and raw_pid:
                try:
                    if int(raw_pid) != os.getpid():
                        watchdog_usec = None
                except ValueError:
                    log.warning("WATCHDOG_PID=%r is not an integer; watchdog off", raw_pid)
                    watchdog_usec = None
        return cls(notify_socket, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to send to."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half of ``WatchdogSec``, or None if off."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; True if it was sent."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(payload, self._address)
                return True
            except OSError as exc:
                level = logging.DEBUG if self._warned else logging.WARNING
                self._warned = True
                log.log(level, "sd_notify to %s failed: %s", self.notify_socket, exc)
                return False

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (with an optional ``STATUS=``): start-up is complete."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        """``STATUS=<text>``: the line `systemctl status` shows."""
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown (draining) has begun."""
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def watchdog_ping(self) -> bool:
        """``WATCHDOG=1``: the service is alive and healthy."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: ask for more time to start or to stop.

        Sent while still starting (a slow bundle load) or stopping (a long drain),
        it pushes ``TimeoutStartSec=``/``TimeoutStopSec=`` out to ``seconds`` from
        now; repeat it before that runs out to keep extending.
        """
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __repr__(self) -> str:
        return (f"SystemdNotifier(notify_socket={self.notify_socket!r}, "
                f"watchdog_usec={self.watchdog_usec!r})")


class StartExtender:
    """While the bundle loads, asks systemd for more start time (``EXTEND_TIMEOUT_USEC=``)
    every ``interval_s``, up to ``budget_s`` in all: a 13B bundle hashed and read from an
    SD card can take longer than ``TimeoutStartSec=``, and a load that hangs still ends
    in systemd's timeout once the budget is spent. A context manager; nothing without
    systemd."""

    def __init__(self, notifier: SystemdNotifier, budget_s: float, interval_s: float = 20.0) -> None:
        self.notifier = notifier
        self.budget_s = budget_s
        self.interval_s = interval_s
        self.extensions = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "StartExtender":
        if self.notifier.enabled and self.budget_s > 0:
            self._thread = threading.Thread(target=self._run, name="sd-extend-start", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def _run(self) -> None:
        deadline = time.monotonic() + self.budget_s
        while not self._stop.wait(self.interval_s) and time.monotonic() < deadline:
            if self.notifier.extend_timeout(3 * self.interval_s):
                self.extensions += 1


class ReadyAnnouncer:
    """``READY=1``, once: when the daemon serves (subscribed on the broker: `serving`), or
    `grace_s` after `start` while it still has not reached the broker. A daemon that waits
    for a broker that is down at boot is then *active* and keeps reconnecting, as in any
    later outage, instead of being killed at ``TimeoutStartSec=`` and restarted, which
    would read the whole bundle again every few minutes. After ``READY=1``, what the other
    event says goes to ``STATUS=``."""

    def __init__(self, notifier: SystemdNotifier, grace_s: float, waiting: Callable[[], str]) -> None:
        self.notifier = notifier
        self.grace_s = grace_s
        self.waiting = waiting
        self.sent = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def start(self) -> "ReadyAnnouncer":
        if self.notifier.enabled:
            self._timer = threading.Timer(self.grace_s, self._grace)
            self._timer.daemon = True
            self._timer.start()
        return self

    def serving(self, status: str) -> None:
        if self._first():
            self.notifier.ready(status)
        else:
            self.notifier.status(status)

    def _grace(self) -> None:
        if self._first():
            self.notifier.ready(self.waiting())

    def _first(self) -> bool:
        with self._lock:
            first, self.sent = not self.sent, True
        return first

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class Watchdog:
    """A daemon thread that sends ``WATCHDOG=1`` every ``interval_s`` seconds while
    ``health_check()`` returns True.

    The first check runs at once on `start`. A check that returns False or raises
    skips that ping (logged at ERROR the first time, and again when health comes
    back), so systemd's ``WatchdogSec=`` runs out and it restarts the service. With
    ``interval_s`` None (no ``WatchdogSec=``) `start` does nothing.
    ``health_check`` runs on the watchdog thread: it must be quick and thread-safe.
    """

    def __init__(self, notifier: SystemdNotifier, health_check: Callable[[], bool],
                 interval_s: float | None) -> None:
        if interval_s is not None and not interval_s > 0:
            raise ValueError(f"watchdog interval must be > 0 seconds, got {interval_s!r}")
        self.notifier = notifier
        self.health_check = health_check
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Watchdog":
        if self.interval_s is None or self.running:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _healthy(self) -> bool:
        try:
            return bool(self.health_check())
        except Exception:  # a broken check counts as unhealthy, never kills the thread
            log.exception("watchdog health check raised")
            return False

    def _run(self) -> None:
        assert self.interval_s is not None
        was_healthy = True
        while not self._stop.is_set():
            healthy = self._healthy()
            if healthy:
                self.notifier.watchdog_ping()
                if not was_healthy:
                    log.warning("health check passes again; watchdog pings resumed")
            elif was_healthy:
                log.error("health check failed; watchdog pings stopped "
                          "(systemd restarts the service when WatchdogSec= runs out)")
            was_healthy = healthy
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

