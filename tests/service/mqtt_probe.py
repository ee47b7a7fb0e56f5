"""A raw paho test client that speaks the wire protocol by hand (independent of
EdgeClient), records every message it receives, and waits with bounded timeouts."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None
    response_topic: str | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.payload)


class Probe:
    def __init__(self, host: str, port: int, *, protocol: str = "5", client_id: str | None = None,
                 persistent: bool = False) -> None:
        """`persistent`: keep the session (and subscriptions) across broker restarts;
        paho reconnects on its own."""
        self.v5 = protocol == "5"
        kwargs = {} if self.v5 else {"clean_session": not persistent}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311, **kwargs)
        self.client.reconnect_delay_set(1, 2)
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._acks: queue.Queue[int] = queue.Queue()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda c, u, mid, rc, p: self._acks.put(mid)
        connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: connected.set()
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            if persistent:
                props.SessionExpiryInterval = 3600
            self.client.connect(host, port, keepalive=30, clean_start=not persistent, properties=props)
        else:
            self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not connected.wait(5):
            raise RuntimeError("probe could not connect")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        with self._cond:
            self.messages.append(Received(msg.topic, msg.payload, bool(msg.retain),
                                          bytes(corr) if corr is not None else None, response_topic))
            self._cond.notify_all()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        _, mid = self.client.subscribe(topic, qos=qos)
        deadline = time.monotonic() + 5
        while True:
            got = self._acks.get(timeout=max(0.01, deadline - time.monotonic()))
            if got == mid:
                return

    def publish(self, topic: str, payload: bytes | str | dict, *, response_topic: str | None = None,
                correlation: bytes | None = None, qos: int = 1, retain: bool = False) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = None
        if self.v5 and (response_topic or correlation):
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        self.client.publish(topic, payload, qos=qos, retain=retain, properties=props).wait_for_publish(5)

    def on(self, topic: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, predicate, timeout: float = 5.0) -> list[Received]:
        """Wait until predicate(messages) is truthy; returns the messages."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out; got {[(m.topic, m.payload[:200]) for m in self.messages]}")
                self._cond.wait(remaining)
            return list(self.messages)

    def finals(self, topic: str) -> list[dict]:
        return [m.json for m in self.on(topic) if m.json.get("done") is True]

    def wait_final(self, topic: str, timeout: float = 5.0, count: int = 1) -> dict:
        self.wait_for(lambda ms: sum(1 for m in ms if m.topic == topic and _is_final(m)) >= count, timeout)
        return self.finals(topic)[count - 1]

    def wait_status(self, topic: str, state: str, timeout: float = 5.0) -> dict:
        self.wait_for(lambda ms: any(m.topic == topic and m.json.get("state") == state for m in ms), timeout)
        return [m.json for m in self.on(topic) if m.json.get("state") == state][-1]


def _is_final(m: Received) -> bool:
    try:
        return json.loads(m.payload).get("done") is True
    except ValueError:
        return False
