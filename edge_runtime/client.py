"""Python client of the daemon (`edge-runtime ask` is its command line: ask_command.py).

    with EdgeClient("mqtt://127.0.0.1:1883", "jetson-01") as c:
        print(c.complete("def fib(n):", max_tokens=64))
        for chunk in c.generate(mode="chat", messages=[{"role": "user", "content": "hi"}]):
            print(chunk["delta"], end="", flush=True)

Replies come on ``edge/<device_id>/v1/reply/<client_id>/<request id>``: with MQTT 5
as the request's Response Topic (plus Correlation Data), with MQTT 3.1.1 as the
``reply_to`` field of the request JSON.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .errors import REQUEST_ERRORS, EdgeRuntimeError
from .mqtt_connection import (
    TlsFiles,
    check_tls_files,
    connect_async,
    make_client,
    parse_broker_url,
    protocol_version,
    publish_properties,
    response_route,
    why_unreachable,
)
from .protocol import (RequestLimits, Topics, build_request, decode_json_object, encode_cancel, encode_request,
                       validate_name)
from .types import is_int, is_number

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
SHORT_CONNECTION_S = 10.0  # a connection the broker closes sooner counts as short
SHORT_CONNECTIONS = 3  # short connections in a row before the client says what that looks like
CLOSE_FLUSH_S = 2.0  # how long close() waits for the broker to acknowledge the cancels it sends
CLIENT_SESSION_EXPIRY_S = 600  # how long the broker keeps a client's replies while it reconnects


class RemoteError(EdgeRuntimeError):
    """The daemon answered with an error reply. It is raised as the subclass for its
    code, which is also the local error class of that code (edge_runtime.errors), so
    ``except Busy``, ``except ContextLengthExceeded``, ``except RateLimited`` ... catch
    the daemon's errors as they catch the local engine's; ``except RemoteError``
    catches every error reply. `code` is the wire's code, `message` its text."""

    def __new__(cls, code: str, message: str, request_id: str | None = None, **kwargs: Any) -> "RemoteError":
        if cls is RemoteError:
            cls = _REMOTE_ERRORS.get(code, RemoteError)
        return super().__new__(cls, code, message, request_id)

    def __init__(self, code: str, message: str, request_id: str | None = None, *,
                 retry_after_s: float | None = None, fields: dict[str, int] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code  # type: ignore[misc]  # instance attribute shadows the class default
        self.message = message
        self.request_id = request_id
        self.retry_after_s = retry_after_s  # rate_limited: when the device admits a request again
        # context_length_exceeded: the error object's prompt_tokens, max_tokens and context_limit, as
        # attributes too (None where the reply has none), so a chat can drop its oldest turns and retry
        for name, value in (fields or {}).items():
            setattr(self, name, value)

    def __reduce__(self) -> tuple[Any, ...]:  # copy and pickle (the Remote* classes are made at import)
        return (_remote_error, (self.code, self.message, self.request_id, self.retry_after_s, self._fields()))

    def _fields(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in REPLY_ERROR_COUNTS if getattr(self, name, None) is not None}

    @classmethod
    def from_reply(cls, error: dict[str, Any], request_id: str | None) -> "RemoteError":
        """The exception for a reply's ``error`` object."""
        retry = error.get("retry_after_s")
        fields = {name: error[name] for name in REPLY_ERROR_COUNTS if is_int(error.get(name))}
        return cls(str(error.get("code", "internal")), str(error.get("message", "")), request_id,
                   retry_after_s=float(retry) if is_number(retry) else None, fields=fields)


# the integer fields an error object may carry beside code and message (context_length_exceeded's)
REPLY_ERROR_COUNTS = ("prompt_tokens", "max_tokens", "context_limit")


def _remote_error(code: str, message: str, request_id: str | None, retry_after_s: float | None,
                  fields: dict[str, int] | None = None) -> RemoteError:
    return RemoteError(code, message, request_id, retry_after_s=retry_after_s, fields=fields)


# RemoteBusy(RemoteError, Busy), ...: one for each error code a reply can carry
_REMOTE_ERRORS: dict[str, type[RemoteError]] = {
    local.code: type(f"Remote{local.__name__}", (RemoteError, local), {"__module__": __name__})
    for local in REQUEST_ERRORS
}


# put in the inbox of each request in flight by close(): its reader stops waiting
_CLIENT_CLOSED: dict[str, Any] = {}


class Generation:
    """One request in flight. Iterate for chunk dicts (in `seq` order); the final
    reply is then in `final` (also the generator's return value, so
    ``final = yield from gen`` works; asyncio code uses ``async for`` and `aresult`).
    `result()` waits for and returns the final reply. Error replies raise
    `RemoteError`; `timeout` seconds without a reply message (a chunk, or the final
    reply of a request that does not stream) raise `TimeoutError` (after sending a
    cancel): a long answer that keeps streaming is never cut off, a stalled one is.

    The chunks' deltas add up to the final `text`: chunks lost on the way (a broker
    killed before it saved them) come as one last chunk with ``"recovered":
    true`` holding the rest of the final text (a request with ``stream=False`` has its
    whole text come as one chunk, without that flag: nothing was lost). Where what was streamed is not the
    start of the final text (the daemon generated the request again after a
    restart, with other tokens), `stream_diverged` is True and `final["text"]` is
    the answer; it is set as soon as a chunk that comes again differs from the one
    streamed, and no chunk of that run is yielded after it. Leaving the loop early, or an exception in it (Ctrl-C), cancels the
    request on the device. Closing the client ends a wait for its replies with `ConnectionError`."""

    def __init__(self, client: "EdgeClient", request_id: str, inbox: "queue.Queue[dict[str, Any]]",
                 timeout: float, *, payload_bytes: int = 0, streamed: bool = True) -> None:
        self.client = client
        self._streamed = streamed  # the request asked for chunks: text the final reply adds was lost on the way
        self._payload_bytes = payload_bytes  # the request's size, for what a timeout says
        self.id = request_id
        self.final: dict[str, Any] | None = None
        self._inbox = inbox
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._next_seq = 0
        self._buffer: dict[int, dict[str, Any]] = {}
        self._chunks: list[str] = []
        self._run: str | None = None  # the run whose chunks are streamed ("run" in the chunks)
        self._old_runs: set[str] = set()
        self._mixed = False  # chunks of two runs were told apart only by their deltas: stream no more
        self._iterating = False
        self.stream_diverged = False

    @property
    def text(self) -> str:
        """The text streamed so far (the final reply's `text` once done)."""
        if self.final is not None and "text" in self.final:
            return self.final["text"]
        return "".join(self._chunks)

    def __iter__(self) -> Generator[dict[str, Any], None, dict[str, Any]]:
        return self._iter()

    def _iter(self) -> Generator[dict[str, Any], None, dict[str, Any]]:
        if self.final is not None:
            return self.final
        if self._iterating:
            raise RuntimeError("a Generation can be iterated once")
        self._iterating = True
        try:
            while self.final is None:
                remaining = self._deadline - time.monotonic()
                try:
                    msg = self._inbox.get(timeout=max(remaining, 0.0)) if remaining > 0 else \
                        self._inbox.get_nowait()
                except queue.Empty:
                    what = "no reply" if not self._chunks and not self._buffer else "no further reply"
                    raise TimeoutError(f"{what} to request {self.id} for {self._timeout:g} s"
                                       f"{_why_no_reply(self.client, self._payload_bytes)}") from None
                if msg is _CLIENT_CLOSED:
                    raise ConnectionError(f"the client was closed before the final reply to request {self.id}")
                self._deadline = time.monotonic() + self._timeout  # the device is making progress
                if msg.get("done") is True:
                    self.final = msg
                    error = msg.get("error")
                    if isinstance(error, dict):
                        raise RemoteError.from_reply(error, self.id)
                    rest = self._unstreamed_text(msg)
                    if rest:
                        chunk = {"id": self.id, "seq": self._next_seq, "delta": rest, "done": False}
                        yield self._take({**chunk, "recovered": True} if self._streamed else chunk)
                    break
                seq = msg.get("seq")
                if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                    continue
                run = msg.get("run")
                if isinstance(run, str):  # which generation of the request (a daemon restart starts another)
                    if run in self._old_runs:
                        continue  # a late chunk of a run that another has replaced
                    if self._run is None:
                        self._run = run
                    elif run != self._run:  # generated again: from here on its chunks only, never a mix
                        self._old_runs.add(self._run)
                        self._run = run
                        self._buffer.clear()
                if seq < self._next_seq:  # a duplicate: sent again, or generated again after a daemon restart
                    if msg.get("delta") != self._chunks[seq]:
                        self.stream_diverged = True  # generated again with other tokens: stream no more of it
                    continue
                if self.stream_diverged or self._mixed:
                    continue  # the rest of a run that is not what was streamed: the final text is the answer
                if seq in self._buffer and self._buffer[seq].get("delta") != msg.get("delta"):
                    self._mixed = True  # two runs' chunks for one seq (a daemon without run ids): the rest
                    self._buffer.clear()  # comes from the final text
                    continue
                self._buffer[seq] = msg
                while self._next_seq in self._buffer:
                    chunk = self._buffer.pop(self._next_seq)
                    self._next_seq += 1
                    yield self._take(chunk)
        finally:
            self.client._forget(self.id)
            if self.final is None:  # abandoned: the loop was left, or raised (Ctrl-C, a timeout)
                self.client.cancel(self.id)
        assert self.final is not None  # the loop ends only with it (or raises)
        return self.final

    def _unstreamed_text(self, final: dict[str, Any]) -> str:
        """What of the final text no chunk in order brought (chunks after a lost one are
        dropped: the final text holds them); sets `stream_diverged` when the stream is not
        the final text's beginning."""
        text = final.get("text")
        self._buffer.clear()
        if not isinstance(text, str):
            return ""
        streamed = "".join(self._chunks)
        if not text.startswith(streamed):
            self.stream_diverged = True
            return ""
        return text[len(streamed):]

    def _take(self, chunk: dict[str, Any]) -> dict[str, Any]:
        delta = chunk.get("delta")
        self._chunks.append(delta if isinstance(delta, str) else "")  # one entry a seq: _iter compares copies by it
        return chunk

    def result(self) -> dict[str, Any]:
        """Wait for the final reply and return it (skipping remaining chunks)."""
        if self.final is None:
            for _ in self._iter():
                pass
        assert self.final is not None
        if isinstance(self.final.get("error"), dict):
            error = self.final["error"]
            raise RemoteError.from_reply(error, self.id)
        return self.final

    def cancel(self) -> None:
        """Ask the daemon to stop this request (the final reply still comes)."""
        self.client.cancel(self.id)

    # asyncio: ``async for chunk in client.generate(...)`` and ``await gen.aresult()``. The
    # waiting runs on the loop's default executor (the MQTT client has its own thread);
    # a cancelled task cancels the request on the device, whose final reply ends the wait.
    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        _in_thread(self._iter, items, asyncio.get_running_loop(), name=f"edge-stream-{self.id}", each=True)
        ended = False  # the reader thread is done (it cancelled on its own if it had to)
        try:
            while True:
                kind, value = await items.get()
                ended = kind != "item"
                if kind == "error":
                    raise value
                if kind == "end":
                    return
                yield value
        finally:
            if not ended and self.final is None:  # left early or cancelled: stop it on the device
                self.cancel()

    async def aresult(self) -> dict[str, Any]:
        """`result()` without blocking the event loop."""
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        _in_thread(self.result, items, asyncio.get_running_loop(), name=f"edge-result-{self.id}", each=False)
        try:
            kind, value = await items.get()
            if kind == "error":
                raise value
            return value
        finally:
            if self.final is None:
                self.cancel()


def _close_connection(client: mqtt.Client, topics: Topics, v5: bool, inboxes: dict[str, Any],
                      cancels: list[mqtt.MQTTMessageInfo], lock: threading.Lock) -> None:
    """`EdgeClient.close`: cancel the requests in flight, wait (a little) until the broker has
    every cancel, then disconnect. Not sooner: a socket closed with the broker's acknowledgements
    unread is reset, and the broker drops what it had not read yet, the cancels with it."""
    with lock:
        pending = list(inboxes)
        sent = list(cancels)
    if not topics.is_fleet:
        sent += [client.publish(topics.cancel, encode_cancel(request_id), qos=1) for request_id in pending]
    give_up = time.monotonic() + CLOSE_FLUSH_S
    for info in sent:
        try:
            info.wait_for_publish(max(give_up - time.monotonic(), 0.0))
        except (RuntimeError, ValueError):  # not connected: nothing to wait for
            pass
    if v5:  # end the session now rather than after its expiry interval
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0
        client.disconnect(properties=props)
    else:
        client.disconnect()
    client.loop_stop()


def _in_thread(work: Callable[[], Any], items: "asyncio.Queue[tuple[str, Any]]", loop: asyncio.AbstractEventLoop,
               *, name: str, each: bool) -> None:
    """Run `work` (a blocking wait on the reply inbox) on a daemon thread of its own, not the
    loop's executor: a stream the caller gave up on is still read to its final reply or its
    timeout, and that must not hold up the executor or the loop's shutdown. Puts
    ("item", x) for each item of an iterator (`each`) or its result, then ("end", None),
    or ("error", exception), on `items`."""
    def put(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def run() -> None:
        try:
            if each:
                for item in work():
                    put("item", item)
                put("end", None)
            else:
                put("item", work())
        except BaseException as exc:  # handed to the awaiting task
            put("error", exc)

    threading.Thread(target=run, name=name, daemon=True).start()


class EdgeClient:
    """A connection to the broker for talking to one device. Use as a context
    manager (CONNECT on enter, DISCONNECT on exit) or call `connect`/`close`.

    `client_id` (default: `username` when given, else random) is the ``<client_id>``
    level of the reply topics (and the prompt cache's scope); with the sample broker
    ACL it must be the MQTT username. It is also the MQTT client id when given; a
    client named after its username connects as ``<username>-<random>``
    (`mqtt_client_id`), so several clients of one user can be connected at once
    (two connections with one MQTT client id close each other's). ``device_id="fleet"`` sends requests to the fleet
    (``edge/fleet/v1/generate``, one device of a fleet group answers under
    ``edge/fleet/v1/reply/``); fleet requests cannot be cancelled.
    """

    def __init__(self, broker_url: str, device_id: str, *, client_id: str | None = None,
                 username: str | None = None, password: str | None = None,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, protocol: str = "5", keepalive: int = 30,
                 connect_timeout: float = 10.0) -> None:
        self.address = parse_broker_url(broker_url)
        protocol_version(protocol)
        if password is not None and username is None:  # MQTT sends no password without a user name
            raise ValueError("a password needs a username: without one the client would connect anonymously")
        self.topics = Topics(device_id)
        self.username = username
        self.client_id = validate_name(client_id or username or f"edge-client-{uuid.uuid4().hex[:12]}",
                                       "client_id")
        # the MQTT client id: `client_id` when given; a username's own plus a random suffix, so that
        # two scripts of one user (the reply level the sample ACL binds to the username) do not
        # make the broker close each other's connection over and over (one id, one connection)
        self.mqtt_client_id = client_id or (f"{username}-{uuid.uuid4().hex[:12]}" if username else self.client_id)
        self.protocol = protocol
        self._v5 = protocol_version(protocol) == mqtt.MQTTv5
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        tls = TlsFiles(ca=_s(tls_ca), cert=_s(tls_cert), key=_s(tls_key))
        self._tls = tls
        if self.address.tls:
            check_tls_files(tls)
        elif tls != TlsFiles():  # a plain connection to a TLS port never gets an answer
            given = [name for name, path in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key))
                     if path is not None]
            raise ValueError(f"{', '.join(given)} given, but {self.address.url} is a plain connection: "
                             "TLS needs an mqtts:// broker URL")
        self._mqtt = make_client(
            client_id=self.mqtt_client_id, protocol=protocol, address=self.address, username=username,
            password=password, tls=tls,
            persistent=False)
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_connect_fail = self._on_connect_fail
        self._mqtt.on_disconnect = self._on_disconnect
        self._mqtt.on_subscribe = self._on_subscribe
        self._mqtt.on_message = self._on_message
        self._inboxes: dict[str, queue.Queue[dict[str, Any]]] = {}
        self._correlation: dict[str, bytes] = {}
        # what was published for each request in flight: sent again after a reconnect
        self._published: dict[str, tuple[bytes, Properties | None]] = {}
        self._lock = threading.Lock()
        self._status_lock = threading.Lock()
        # ids of Generations garbage-collected unread: a finalizer only queues them (it may run in
        # any thread, even one holding _lock); generate() forgets and cancels them
        self._dropped: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._cancels: list[mqtt.MQTTMessageInfo] = []  # cancels published and maybe not yet acknowledged
        self._subscribed = threading.Event()
        self._refused: str | None = None
        self._unreachable = False  # the last connection attempt failed before the broker answered
        self._closed_early = False  # the broker closed the last connection attempt before its CONNACK
        self._sub_mid: int | None = None
        self._connected = False
        self._connected_at: float | None = None  # when the current connection was accepted
        self._short_connections = 0  # connections in a row the broker closed soon after accepting them

    # ------------------------------------------------------------------ connection

    def connect(self) -> "EdgeClient":
        if self._connected:
            return self
        # MQTT 5: a session that outlives a lost connection (a broker restart), so replies
        # published while the client reconnects wait for it; ended at close. Not a clean
        # start even the first time: Mosquitto saves no clean-start session across its restart
        # (a random client id has no earlier session; a fixed one may get stale replies of
        # ids no longer awaited, which are dropped)
        # a connect after a failed one or a close starts afresh: not the old failure's reason, and
        # not the old subscription's acknowledgement (a request sent before the new one would
        # lose its replies)
        self._subscribed.clear()
        self._refused = None
        self._unreachable = False
        self._closed_early = False
        self._short_connections = 0
        self._sub_mid = None
        connect_async(self._mqtt, self.address, protocol=self.protocol, keepalive=self.keepalive,
                      persistent=self._v5, session_expiry_s=CLIENT_SESSION_EXPIRY_S if self._v5 else None)
        self._mqtt.loop_start()
        try:
            answered = self._subscribed.wait(self.connect_timeout)
        except BaseException:  # Ctrl-C while waiting: no network thread left reconnecting in the background
            self._mqtt.disconnect()
            self._mqtt.loop_stop()
            raise
        if not answered or self._refused or self._unreachable or self._closed_early:
            self._mqtt.disconnect()
            self._mqtt.loop_stop()
            reason = self._refused or f"no connection within {self.connect_timeout:g} s"
            if self._unreachable:  # the name, the TCP connection or the TLS handshake
                why = why_unreachable(self.address, tls=self._tls)
                hint = " (is the broker running, and are the host and port right?)" if "no TCP" in why else ""
                reason = f"no broker answers at {self.address.host}:{self.address.port}: {why}{hint}"
            elif self._closed_early and not self._refused:
                reason = ("the broker closed the connection before answering its CONNECT" +
                          ("" if self.address.tls else " (a TLS port? TLS needs an mqtts:// broker URL)"))
            raise ConnectionError(f"cannot connect to {self.address.url}: {reason}")
        self._connected = True
        # close() or, for a script that ends without it, the interpreter's exit: not a method,
        # so that it does not keep this client alive
        self._closer = weakref.finalize(self, _close_connection, self._mqtt, self.topics, self._v5, self._inboxes,
                                        self._cancels, self._lock)
        return self

    def close(self) -> None:
        """Cancel the requests still in flight (nobody would read their replies), then
        disconnect. A script that ends without closing a connected client has it closed
        at exit (its requests cancelled, what it sent before flushed to the broker)."""
        if self._connected:
            self._connected = False
            self._closer()
            with self._lock:  # whoever waits for a reply (another thread, a task) stops waiting now
                inboxes = list(self._inboxes.values())
            for inbox in inboxes:
                inbox.put(_CLIENT_CLOSED)

    def __enter__(self) -> "EdgeClient":
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # asyncio: ``async with EdgeClient(...) as c:`` connects and closes without blocking the
    # event loop (connecting waits up to `connect_timeout`, closing for the cancels' acknowledgements)
    async def __aenter__(self) -> "EdgeClient":
        return await asyncio.to_thread(self.connect)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            self._refused = f"the broker refused the connection: {reason_code}"
            self._subscribed.set()
            return
        self._connected_at = time.monotonic()
        _, self._sub_mid = client.subscribe(self.topics.client_reply_filter(self.client_id), qos=1)
        if self._connected:  # a reconnect: replies published meanwhile may be gone
            self._publish_pending_again(client)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        """Count the connections the broker closes soon after accepting them: the sign of
        another client connected with the same MQTT client id (each connection closes the
        other's, and both reconnect). Mosquitto 2.0.11 says nothing of why it closes the older
        connection, and to an MQTT 3.1.1 client no broker can."""
        connected_at, self._connected_at = self._connected_at, None
        if not self._connected and connected_at is None and not self._subscribed.is_set():
            self._closed_early = True  # in connect(), before the broker answered: say so at once
            self._subscribed.set()
        if not self._connected or connected_at is None:  # close(), or a connect() that failed
            return
        short = time.monotonic() - connected_at < SHORT_CONNECTION_S
        self._short_connections = self._short_connections + 1 if short else 0
        if self._short_connections == SHORT_CONNECTIONS:
            log.warning("%s", _same_client_id_hint(self))

    def _publish_pending_again(self, client: mqtt.Client) -> None:
        """Send the requests in flight again, with their ids, after a reconnect. What the
        device published while this client was away may be lost (an MQTT 3.1.1 client has
        no session; a broker drops what is queued for an MQTT 5 session beyond its
        `max_queued_messages`, the final reply of a long answer first). The device answers
        a request it already answered with the stored final reply, and one it is still
        generating once (the copy joins it), so nothing is generated twice. Not fleet requests:
        another device of the group would generate them again."""
        if self.topics.is_fleet:  # another device of the group would generate it again: not sent twice
            return
        with self._lock:
            pending = list(self._published.values())
        if pending:
            log.info("reconnected: sending %d request(s) in flight again", len(pending))
        for payload, props in pending:
            client.publish(self.topics.generate, payload, qos=1, properties=props)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # the TCP (or TLS) connection failed: say so now rather than wait out the timeout
        # (connect() finds out why, off the network thread)
        self._unreachable = True
        self._subscribed.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[Any],
                      properties: Any) -> None:
        if mid == self._sub_mid:
            if any(rc.is_failure for rc in reason_codes):
                self._refused = f"the broker refused the reply subscription: {reason_codes[0]}"
            self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        request_id = message.topic.rsplit("/", 1)[-1]
        with self._lock:
            inbox = self._inboxes.get(request_id)
            expected = self._correlation.get(request_id)
        if inbox is None:
            return  # a late duplicate of a finished request
        _, correlation = response_route(message)
        if correlation is not None and expected is not None and correlation != expected:
            return
        try:
            obj = decode_json_object(message.payload)
        except ValueError:
            log.warning("ignored a reply that is not a JSON object on %s", message.topic)
            return
        if obj.get("done") is True:  # answered (even if not read yet): not to be sent again on a reconnect
            with self._lock:
                self._published.pop(request_id, None)
        inbox.put(obj)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._inboxes.pop(request_id, None)
            self._correlation.pop(request_id, None)
            self._published.pop(request_id, None)

    def _cancel_dropped(self) -> None:
        """Forget the Generations dropped unread and cancel them on the device."""
        while True:
            try:
                request_id = self._dropped.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                pending = self._inboxes.pop(request_id, None) is not None
                self._correlation.pop(request_id, None)
                self._published.pop(request_id, None)
            if pending and self._connected:
                self.cancel(request_id)

    # ------------------------------------------------------------------ requests

    def generate(self, *, mode: str, prompt: str | None = None, prefix: str | None = None,
                 suffix: str | None = None, suffix_first: bool | None = None,
                 messages: Sequence[Any] | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, stop: Sequence[str] | str | None = None, stream: bool = True,
                 deadline_ms: int | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 request_id: str | None = None, cache_prompt: bool | None = None,
                 repeat_penalty: float | None = None, presence_penalty: float | None = None,
                 frequency_penalty: float | None = None, repeat_last_n: int | None = None,
                 min_p: float | None = None, count_tokens: bool | None = None) -> Generation:
        """Publish a request now and return its `Generation` (iterate it for chunks).
        Parameters left None take the daemon's defaults. `count_tokens=True`: nothing is generated,
        the final reply's `count` says what the prompt takes of the context (`count_tokens()`)."""
        if not self._connected:
            raise RuntimeError("EdgeClient is not connected (use `with EdgeClient(...) as c:`)")
        if not is_number(timeout) or timeout <= 0:  # before anything is sent: no request left unread
            raise ValueError(f"timeout must be a number of seconds > 0 (how long to wait for each reply), "
                             f"got {timeout!r}")
        self._cancel_dropped()
        request_id = request_id or uuid.uuid4().hex
        reply_topic = self.topics.reply_topic(self.client_id, request_id)
        v5 = self._v5
        obj = build_request(request_id=request_id, mode=mode, prompt=prompt, prefix=prefix, suffix=suffix,
                            suffix_first=suffix_first, messages=messages, max_tokens=max_tokens,
                            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                            # reply_to also with MQTT 5: a daemon on MQTT 3.1.1 gets no Response Topic
                            stream=stream, deadline_ms=deadline_ms, reply_to=reply_topic,
                            cache_prompt=cache_prompt, repeat_penalty=repeat_penalty,
                            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                            repeat_last_n=repeat_last_n, min_p=min_p, count_tokens=count_tokens)
        inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        correlation = request_id.encode("utf-8")
        props = publish_properties(self.protocol, response_topic=reply_topic, correlation_data=correlation) \
            if v5 else None
        payload = encode_request(obj)
        with self._lock:
            if request_id in self._inboxes:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._inboxes[request_id] = inbox
            self._correlation[request_id] = correlation
            self._published[request_id] = (payload, props)
        self._mqtt.publish(self.topics.generate, payload, qos=1, properties=props)
        generation = Generation(self, request_id, inbox, timeout, payload_bytes=len(payload),
                                streamed=stream)
        # dropped without being read to its end: forget it and cancel it on the device
        weakref.finalize(generation, self._dropped.put, request_id)
        return generation

    # complete/infill/chat return the final text only, but ask for chunks all the same: they
    # show that the device is making progress, so `timeout` is for silence, not for the
    # whole answer (``stream=False`` makes it the whole answer's)

    def complete(self, prompt: str, **kw: Any) -> str:
        """Complete `prompt`; returns the final text."""
        return self.generate(mode="complete", prompt=prompt, **kw).result()["text"]

    def infill(self, prefix: str, suffix: str = "", **kw: Any) -> str:
        """Fill in the middle between `prefix` and `suffix`; returns the final text."""
        return self.generate(mode="infill", prefix=prefix, suffix=suffix, **kw).result()["text"]

    def chat(self, messages: Sequence[Any], **kw: Any) -> str:
        """Answer a conversation ([{role, content}, ...]); returns the final text."""
        return self.generate(mode="chat", messages=messages, **kw).result()["text"]

    def count_tokens(self, **kw: Any) -> dict[str, Any]:
        """How many tokens a request's prompt has, without generating: ``{"prompt_tokens", "max_tokens",
        "context_limit", "fits"}`` (the reply's `count`; `max_tokens` is what it would run with, the
        default lowered to what the context leaves). Takes `generate`'s arguments (``mode="chat",
        messages=history``); a chat sizes its history with it before sending. The device answers at
        once, not after its queue; a daemon older than the field answers `bad_request`."""
        count = self.generate(count_tokens=True, stream=False, **kw).result().get("count")
        if not isinstance(count, dict):
            raise RemoteError("internal", "the device's reply holds no count", None)
        return count

    def cancel(self, request_id: str) -> None:
        """Ask the daemon to stop a queued or running request (no-op for the fleet, and once
        the client is closed: close() cancelled what was in flight)."""
        if self.topics.is_fleet or not self._connected:
            return
        sent = self._mqtt.publish(self.topics.cancel, encode_cancel(request_id), qos=1)
        with self._lock:  # close() waits for their acknowledgements
            self._cancels[:] = [c for c in self._cancels if not c.is_published()] + [sent]

    def status(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The device's retained status message, or None if none arrives in `timeout`
        (always None for the fleet)."""
        if self.topics.is_fleet:
            return None
        got: queue.Queue[dict[str, Any]] = queue.Queue()

        def on_status(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            try:
                got.put(decode_json_object(message.payload))
            except ValueError:
                pass

        with self._status_lock:  # one subscription at a time: callers would undo each other's
            self._mqtt.message_callback_add(self.topics.status, on_status)
            self._mqtt.subscribe(self.topics.status, qos=1)
            try:
                return got.get(timeout=timeout)
            except queue.Empty:
                return None
            finally:
                self._mqtt.unsubscribe(self.topics.status)
                self._mqtt.message_callback_remove(self.topics.status)


def _s(p: str | Path | None) -> str | None:
    return str(p) if p is not None else None


# a request given up on is cancelled (Generation._iter): both wait on the broker for the daemon
_WAITS = (" (the request waits for it on the broker, and so does the cancel this client sends now: when the "
          "daemon is back it gets both and stops the request at once; send it again to have it run)")


def _same_client_id_hint(client: EdgeClient) -> str:
    return (f"the broker has closed this client's connection {client._short_connections} times in a row soon "
            f"after accepting it: is another client connected with the MQTT client id {client.mqtt_client_id!r}? "
            "Two connections with one client id close each other's, over and over (a broker with "
            "use_username_as_clientid gives all clients of one username the same id: give each its own username)")


# A status stamped this far after this machine's clock: the device's clock (or this one) is wrong.
CLOCK_AHEAD_S = 300.0


def _device_time(ts: float) -> str:
    """A status's `ts` for a person: the device's clock, which a board without a battery-backed clock
    (or one set by hand) may have years off; said so where it must be, a time after this machine's."""
    try:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    except (OverflowError, OSError, ValueError):
        return ""
    ahead = ts - time.time()
    if ahead <= CLOCK_AHEAD_S:
        return when
    days = ahead / 86400
    span = f"{days:.0f} days" if days >= 2 else f"{ahead / 3600:.1f} hours"
    return (f"{when} by the device's clock, {span} ahead of this machine's: one of the two clocks is wrong "
            "(docs/deployment.md, \"The device's clock\")")


def _why_no_reply(client: EdgeClient, payload_bytes: int = 0) -> str:
    """What the device's retained status says about a request left unanswered (of
    `payload_bytes`: over the daemon's default payload limit, a daemon cannot tell an MQTT
    3.1.1 client so)."""
    if client._short_connections >= SHORT_CONNECTIONS:
        return f"; {_same_client_id_hint(client)}"
    if not client._mqtt.is_connected():  # the status cannot be asked for either
        return (f"; the connection to the broker at {client.address.url} is lost (the client keeps reconnecting, "
                "1 s doubling to 30 s apart)")
    if client.topics.is_fleet:  # no status to read: say what a fleet request needs
        return ("; no device of a fleet group answered (is a daemon with [mqtt] fleet_group / --fleet-group "
                "connected to this broker? The broker drops a fleet request no daemon subscribes to; one that a "
                "device took is not cancelled)")
    device = client.topics.device_id
    status = client.status(timeout=2.0)
    if status is None:
        return (f"; no device {device!r} has published a status on this broker (check --device-id, and that "
                "its daemon runs against this broker)")
    state, ts = status.get("state"), status.get("ts")
    when = _device_time(ts) if is_number(ts) else ""
    if state == "online":
        acl = "" if client.username is None or client.username == client.client_id else (
            f"; its replies go under the client id {client.client_id!r}, not the username {client.username!r}: a "
            "broker whose ACL lets a client read only the replies under its username (the sample ACL) delivers "
            "none of them")
        size = "" if client._v5 or payload_bytes <= RequestLimits().max_payload_bytes else (
            f"; the request is {payload_bytes} bytes: a daemon refuses one over its [limits] max_payload_bytes "
            f"(default {RequestLimits().max_payload_bytes}) unread, so it cannot answer an MQTT 3.1.1 client")
        return (f"; device {device!r} is online with {status.get('queue_depth')} of {status.get('queue_limit')} "
                f"requests queued (a longer timeout waits longer for a busy device){acl}{size}")
    if status.get("reason") == "connection lost":  # the will, written when the daemon started: ts is not the loss
        return (f"; device {device!r} is offline: the broker lost its connection (a crash, power loss or network "
                f"fault){f'; the daemon had started at {when}' if when else ''}{_WAITS}")
    return f"; device {device!r} is {state}{f' since {when}' if when else ''}{_WAITS}"
