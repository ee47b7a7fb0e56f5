"""EdgeService against a real Mosquitto, with the FakeEngine test double.

In-process services for the request paths; real subprocesses
(tests/service/fake_daemon.py) for SIGKILL / SIGTERM behaviour.
"""

from __future__ import annotations

import json
import logging
import signal
import time

import pytest
from fake_engine import FakeEngine, expected_text
from mosquitto_broker import MosquittoBroker
from mqtt_probe import Probe
from service_harness import DaemonProcess, make_config, start_service, wait_until, write_config

from edge_runtime.protocol import FLEET_GENERATE_TOPIC, Topics
from edge_runtime.service import EdgeService

T = Topics("dev1")
WORDS40 = " ".join(f"w{i}" for i in range(40))


@pytest.fixture
def probe(broker):
    with Probe(broker.host, broker.port) as p:
        p.subscribe("replies/#")
        yield p


@pytest.fixture
def probe311(broker):
    with Probe(broker.host, broker.port, protocol="3.1.1") as p:
        p.subscribe("replies/#")
        yield p


@pytest.fixture
def services():
    started = []

    def make(config, engine=None, **kw):
        service = start_service(config, engine, **kw)
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


def send(probe: Probe, obj, reply: str, *, correlation: bytes | None = None, topic: str = T.generate):
    """A request over MQTT 5 with a Response Topic (or reply_to for a 3.1.1 probe)."""
    if probe.v5:
        probe.publish(topic, obj, response_topic=reply, correlation=correlation)
    else:
        obj = dict(obj, reply_to=reply)
        probe.publish(topic, obj)


def chunks_and_final(probe: Probe, reply: str, timeout: float = 5.0):
    final = probe.wait_final(reply, timeout)
    msgs = [m.json for m in probe.on(reply)]
    return [m for m in msgs if m.get("done") is False], final


MODE_CASES = {
    "complete": ({"mode": "complete", "prompt": "alpha beta gamma delta"}, "delta gamma beta alpha"),
    "infill": ({"mode": "infill", "prefix": "def f(", "suffix": "): pass", "suffix_first": True},
               expected_text("def f( ): pass")),
    "chat": ({"mode": "chat", "messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "one two three"}]}, "three two one"),
}


# ------------------------------------------------------------------ modes


@pytest.mark.parametrize("mode", sorted(MODE_CASES))
def test_each_mode_over_mqtt5(broker, tmp_path, services, probe, mode):
    services(make_config(broker, tmp_path), FakeEngine(token_delay_s=0.002))
    fields, expected = MODE_CASES[mode]
    send(probe, {"id": f"r-{mode}", **fields}, f"replies/{mode}", correlation=b"\x00corr")
    chunks, final = chunks_and_final(probe, f"replies/{mode}")
    assert [c["seq"] for c in chunks] == list(range(len(chunks))) and len(chunks) > 1
    assert all(c["id"] == f"r-{mode}" and set(c) == {"id", "seq", "delta", "done", "run"} for c in chunks)
    assert len({c["run"] for c in chunks}) == 1  # one generation of the request
    assert "".join(c["delta"] for c in chunks) == final["text"] == expected
    assert final["id"] == f"r-{mode}" and final["finish_reason"] == "stop"
    assert final["usage"]["completion_tokens"] == len(expected.split())
    assert set(final["timings"]) == {"ttft_ms", "decode_tokens_per_s", "total_ms"}
    assert "warnings" not in final and "error" not in final
    assert all(m.correlation == b"\x00corr" for m in probe.on(f"replies/{mode}"))


@pytest.mark.parametrize("daemon_protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("mode", sorted(MODE_CASES))
def test_each_mode_over_mqtt311_reply_to(broker, tmp_path, services, probe311, mode, daemon_protocol):
    services(make_config(broker, tmp_path, **{"mqtt.protocol": daemon_protocol}))
    fields, expected = MODE_CASES[mode]
    send(probe311, {"id": f"r-{mode}", **fields}, f"replies/{mode}")
    chunks, final = chunks_and_final(probe311, f"replies/{mode}")
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["delta"] for c in chunks) == final["text"] == expected


def test_stream_false_sends_only_the_final_with_warnings(broker, tmp_path, services, probe):
    services(make_config(broker, tmp_path))
    send(probe, {"id": "ns", "mode": "complete", "prompt": "a b <WARN> c", "stream": False}, "replies/ns")
    final = probe.wait_final("replies/ns")
    time.sleep(0.1)
    assert len(probe.on("replies/ns")) == 1
    assert final["text"] == "c <WARN> b a" and final["warnings"] == ["fake warning"]


def test_max_tokens_and_stop(broker, tmp_path, services, probe):
    services(make_config(broker, tmp_path))
    send(probe, {"id": "mt", "mode": "complete", "prompt": "a b c d e", "max_tokens": 2}, "replies/mt")
    send(probe, {"id": "st", "mode": "complete", "prompt": "a b c d e", "stop": [" c"]}, "replies/st")
    assert probe.wait_final("replies/mt")["finish_reason"] == "length"
    assert probe.wait_final("replies/mt")["text"] == "e d"
    assert probe.wait_final("replies/st")["text"] == "e d"
    assert probe.wait_final("replies/st")["finish_reason"] == "stop"


# ------------------------------------------------------------------ cancel, busy, deadline


def test_cancel_mid_stream(broker, tmp_path, services, probe):
    services(make_config(broker, tmp_path), FakeEngine(token_delay_s=0.03))
    send(probe, {"id": "c1", "mode": "complete", "prompt": WORDS40}, "replies/c1")
    probe.wait_for(lambda ms: sum(m.topic == "replies/c1" for m in ms) >= 2)
    probe.publish(T.cancel, {"id": "c1"})
    chunks, final = chunks_and_final(probe, "replies/c1", timeout=3)
    assert final["finish_reason"] == "cancelled"
    assert 2 <= len(chunks) < 40 and "".join(c["delta"] for c in chunks) == final["text"]


def test_cancel_queued_request_is_answered_at_once(broker, tmp_path, services, probe):
    services(make_config(broker, tmp_path), FakeEngine(token_delay_s=0.03))
    send(probe, {"id": "q1", "mode": "complete", "prompt": WORDS40}, "replies/q1")
    send(probe, {"id": "q2", "mode": "complete", "prompt": "x y"}, "replies/q2")
    probe.wait_for(lambda ms: any(m.topic == "replies/q1" for m in ms))
    probe.publish(T.cancel, {"id": "q2"})
    final = probe.wait_final("replies/q2", timeout=1)
    assert final == {"id": "q2", "done": True, "error": {"code": "cancelled", "message": final["error"]["message"]}}
    assert probe.finals("replies/q1") == []  # q1 still running
    assert probe.wait_final("replies/q1", timeout=5)["finish_reason"] == "stop"
    assert len(probe.on("replies/q2")) == 1  # q2 never started


def test_a_count_is_answered_at_once_while_a_generation_runs_and_is_not_stored(broker, tmp_path, services, probe):
    """"count_tokens": true counts without generating, before the queue: a chat client sizing its
    history does not wait for another client's answer; an error in it comes at once too."""
    engine = FakeEngine(token_delay_s=0.05, context_limit=20)
    services(make_config(broker, tmp_path), engine)
    send(probe, {"id": "long", "mode": "complete", "prompt": " ".join(["w"] * 12), "max_tokens": 8}, "replies/long")
    probe.wait_for(lambda ms: any(m.topic == "replies/long" for m in ms))  # generating
    history = [{"role": "user", "content": "one two three four five"}]
    send(probe, {"id": "n1", "mode": "chat", "messages": history, "max_tokens": 16, "count_tokens": True},
         "replies/n1")
    assert probe.wait_final("replies/n1", timeout=1) == {"id": "n1", "done": True, "count": {
        "prompt_tokens": 5, "max_tokens": 16, "context_limit": 20, "fits": False}}
    assert probe.finals("replies/long") == []  # still generating when the count came
    send(probe, {"id": "n2", "mode": "chat", "messages": history, "count_tokens": True}, "replies/n2")
    assert probe.wait_final("replies/n2", timeout=1)["count"] == {"prompt_tokens": 5, "max_tokens": 15,
                                                                  "context_limit": 20, "fits": True}
    send(probe, {"id": "n3", "mode": "complete", "prompt": "<BADREQ>", "count_tokens": True}, "replies/n3")
    assert probe.wait_final("replies/n3", timeout=1)["error"]["code"] == "bad_request"
    assert probe.wait_final("replies/long", timeout=5)["finish_reason"] == "length"
    assert [r.id for r in engine.calls] == ["long"]  # nothing generated for the counts
    # not stored: the same request again is counted again (a stored reply would come back as it was)
    send(probe, {"id": "n1", "mode": "chat", "messages": history, "max_tokens": 4, "count_tokens": True},
         "replies/n1")
    probe.wait_for(lambda ms: len([m for m in ms if m.topic == "replies/n1"]) >= 2)
    assert [m.json["count"]["fits"] for m in probe.on("replies/n1")] == [False, True]


def test_cancel_of_unknown_id_and_bad_cancel_are_harmless(broker, tmp_path, services, probe):
    services(make_config(broker, tmp_path))
    probe.publish(T.cancel, {"id": "nobody"})
    probe.publish(T.cancel, b"garbage")
    send(probe, {"id": "ok", "mode": "complete", "prompt": "a b"}, "replies/ok")
    assert probe.wait_final("replies/ok")["text"] == "b a"


def test_queue_full_is_busy_at_once(broker, tmp_path, services, probe):
    engine = FakeEngine(token_delay_s=0.03)
    services(make_config(broker, tmp_path, **{"limits.queue_depth": 1}), engine)
    send(probe, {"id": "b1", "mode": "complete", "prompt": " ".join(["w"] * 30)}, "replies/b1")
    probe.wait_for(lambda ms: any(m.topic == "replies/b1" for m in ms))  # b1 running
    send(probe, {"id": "b2", "mode": "complete", "prompt": "x y"}, "replies/b2")  # queued
    send(probe, {"id": "b3", "mode": "complete", "prompt": "x y"}, "replies/b3")  # queue full
    busy = probe.wait_final("replies/b3", timeout=1)
    assert busy["error"]["code"] == "busy" and busy["id"] == "b3"
    assert probe.finals("replies/b1") == []
    assert probe.wait_final("replies/b2", timeout=5)["text"] == "y x"
    # busy is not stored: the same id is served once there is room
    send(probe, {"id": "b3", "mode": "complete", "prompt": "x y"}, "replies/b3")
    assert probe.wait_final("replies/b3", count=2)["text"] == "y x"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_queue_deeper_than_the_brokers_in_flight_window_fills_and_a_cancel_is_not_held_behind_it(
        broker, tmp_path, services, caplog, protocol):
    """Mosquitto sends a client at most 20 unacknowledged QoS 1 messages (max_inflight_messages)
    unless its MQTT 5 CONNECT asks for more (Receive Maximum), and the daemon acknowledges a
    request only with its final reply: with queue_depth 30, requests past the 19th queued
    waited at the broker, with no `busy`, not in the status's queue_depth, and a cancel
    waited behind them, reaching the running request only after it had ended by itself.
    A 3.1.1 connection cannot ask: the daemon warns, and docs/protocol.md's remedy (the
    broker's max_inflight_messages 0) works."""
    if protocol == "3.1.1":
        broker.stop()
        broker = MosquittoBroker(tmp_path / "broker-311", extra_config="max_inflight_messages 0").start()
    try:
        service = services(make_config(broker, tmp_path, **{"limits.queue_depth": 30, "mqtt.protocol": protocol}),
                           FakeEngine(token_delay_s=0.05))
        with Probe(broker.host, broker.port, protocol=protocol) as probe:
            probe.subscribe("replies/#")
            probe.subscribe(T.status)
            long_prompt = " ".join(f"w{i}" for i in range(2000))  # 100 s of tokens: ended by the cancel
            send(probe, {"id": "long", "mode": "complete", "prompt": long_prompt}, "replies/long")
            probe.wait_for(lambda ms: any(m.topic == "replies/long" for m in ms), 10)
            for i in range(35):
                send(probe, {"id": f"q{i}", "mode": "complete", "prompt": "a b"}, f"replies/q{i}")
            for i in range(30, 35):  # the queue holds 30: the rest are refused at once
                assert probe.wait_final(f"replies/q{i}", timeout=15)["error"]["code"] == "busy"
            probe.wait_for(lambda ms: any(m.topic == T.status and m.json.get("queue_depth") == 30 for m in ms), 15)
            assert service.health().queue_depth == 30
            probe.publish(T.cancel, {"id": "long"})
            assert probe.wait_final("replies/long", timeout=15)["finish_reason"] == "cancelled"
            for i in range(30):
                assert probe.wait_final(f"replies/q{i}", timeout=30)["text"] == "b a"
        service.stop()
    finally:
        if protocol == "3.1.1":
            broker.stop()
    assert ("queue_depth 30 with MQTT 3.1.1" in caplog.text) == (protocol == "3.1.1")


def test_deadline_while_running(broker, tmp_path, services, probe):
    services(make_config(broker, tmp_path), FakeEngine(token_delay_s=0.03))
    send(probe, {"id": "d1", "mode": "complete", "prompt": WORDS40, "deadline_ms": 200}, "replies/d1")
    chunks, final = chunks_and_final(probe, "replies/d1", timeout=3)
    assert final["error"]["code"] == "deadline_exceeded" and final["id"] == "d1"
    assert 0 < len(chunks) < 40


def test_deadline_while_queued(broker, tmp_path, services, probe):
    services(make_config(broker, tmp_path), FakeEngine(token_delay_s=0.03))
    send(probe, {"id": "long", "mode": "complete", "prompt": WORDS40}, "replies/long")
    send(probe, {"id": "d2", "mode": "complete", "prompt": "a b", "deadline_ms": 150}, "replies/d2")
    final = probe.wait_final("replies/d2", timeout=1)
    assert final["error"]["code"] == "deadline_exceeded"
    assert probe.finals("replies/long") == []  # answered while the long one still runs


def test_default_deadline_from_config(broker, tmp_path, services, probe):
    services(make_config(broker, tmp_path, **{"limits.default_deadline_ms": 100}), FakeEngine(token_delay_s=0.03))
    send(probe, {"id": "dd", "mode": "complete", "prompt": WORDS40}, "replies/dd")
    assert probe.wait_final("replies/dd", timeout=3)["error"]["code"] == "deadline_exceeded"


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("prompt, code", [
    ("please <UNSAFE> thing", "unsafe_prompt"),
    ("tags [INST] inside", "unsafe_prompt"),
    ("engine says <BADREQ>", "bad_request"),
    ("secret <BOOM> here", "internal"),
    (" ".join(["w"] * 300), "context_length_exceeded"),
])
def test_engine_errors_map_to_codes(broker, tmp_path, services, probe, prompt, code):
    services(make_config(broker, tmp_path), FakeEngine(context_limit=256))
    send(probe, {"id": "e", "mode": "complete", "prompt": prompt, "max_tokens": 8}, "replies/e")
    final = probe.wait_final("replies/e")
    assert final["id"] == "e" and final["error"]["code"] == code
    assert "secret" not in final["error"]["message"]  # internal errors do not leak details
    send(probe, {"id": "after", "mode": "complete", "prompt": "still here", "max_tokens": 8}, "replies/after")
    assert probe.wait_final("replies/after")["text"] == "here still"


def test_unsupported_infill(broker, tmp_path, services, probe):
    services(make_config(broker, tmp_path), FakeEngine(supports_infill=False))
    send(probe, {"id": "i", "mode": "infill", "prefix": "a", "suffix": "b"}, "replies/i")
    assert probe.wait_final("replies/i")["error"]["code"] == "unsupported_mode"


def test_bad_payloads_each_get_an_error_reply(broker, tmp_path, services, probe, probe311):
    services(make_config(broker, tmp_path, **{"limits.max_payload_bytes": 1024}))
    cases = {
        "notjson": (b"this is not json", None, "bad_request"),
        "notutf8": (b"\xff\xfe\x00", None, "bad_request"),
        "array": (b"[1, 2, 3]", None, "bad_request"),
        "noid": ({"mode": "complete", "prompt": "x"}, None, "bad_request"),
        "numid": ({"id": 7, "mode": "complete", "prompt": "x"}, None, "bad_request"),
        "oversize": ({"id": "big", "mode": "complete", "prompt": "x" * 2000}, None, "bad_request"),
        "mode": ({"id": "m", "mode": "translate", "prompt": "x"}, "m", "unsupported_mode"),
        "types": ({"id": "t", "mode": "complete", "prompt": "x", "max_tokens": "many"}, "t", "bad_request"),
        "nan": (b'{"id": "n", "mode": "complete", "prompt": "x", "temperature": NaN}', None, "bad_request"),
    }
    for name, (payload, _, _) in cases.items():
        send(probe, payload, f"replies/{name}", correlation=name.encode())
    for name, (_, expected_id, code) in cases.items():
        final = probe.wait_final(f"replies/{name}")
        assert final["error"]["code"] == code, name
        assert final["id"] == expected_id, name
        assert [m.correlation for m in probe.on(f"replies/{name}")] == [name.encode()]
    # MQTT 3.1.1: the reply topic comes from the JSON even when the id is missing
    probe311.publish(T.generate, {"mode": "complete", "prompt": "x", "reply_to": "replies/311"})
    final = probe311.wait_final("replies/311")
    assert final["id"] is None and final["error"]["code"] == "bad_request"
    # no usable reply topic: dropped (nothing to answer), and the daemon keeps serving
    probe.subscribe("edge/+/v1/#")
    probe.publish(T.generate, {"id": "lost", "mode": "complete", "prompt": "x"})
    probe.publish(T.generate, b"junk without reply topic")
    send(probe, {"id": "evil", "mode": "complete", "prompt": "x"}, "edge/dev2/v1/cancel")
    send(probe311, {"id": "evil2", "mode": "complete", "prompt": "x"}, "edge/dev2/v1/generate")
    send(probe, {"id": "fine", "mode": "complete", "prompt": "a b c"}, "replies/fine")
    assert probe.wait_final("replies/fine")["text"] == "c b a"
    assert probe.on("edge/dev2/v1/cancel") == [] and probe.on("edge/dev2/v1/generate") == []


@pytest.mark.parametrize("daemon_protocol", ["5", "3.1.1"])
def test_reply_topics_a_broker_refuses_and_numbers_beyond_floats_get_no_daemon_off_the_broker(
        broker, tmp_path, services, probe311, daemon_protocol):
    """A JSON reply_to with a control character, a noncharacter or a lone surrogate: Mosquitto
    drops a client that publishes there (and again at each reconnect while the publish is
    queued). Such a request has no reply topic, so it is dropped, and the daemon keeps
    answering; a number no float holds is a bad_request with the field named, not silence."""
    services(make_config(broker, tmp_path, **{"mqtt.protocol": daemon_protocol}))
    for i, bad in enumerate(["replies/x\u0001y", "replies/\ufdd0", "replies/x\ud800", "replies/x\u007f"]):
        probe311.publish(T.generate, {"id": f"bad{i}", "mode": "complete", "prompt": "a b", "reply_to": bad})
    probe311.publish(T.generate, {"id": "big", "mode": "complete", "prompt": "a b", "deadline_ms": 10**400,
                                  "reply_to": "replies/big"})
    send(probe311, {"id": "fine", "mode": "complete", "prompt": "a b c"}, "replies/fine")
    big = probe311.wait_final("replies/big")
    assert big["id"] == "big" and big["error"]["code"] == "bad_request" and "deadline_ms" in big["error"]["message"]
    assert probe311.wait_final("replies/fine", timeout=5.0)["text"] == "c b a"


# ------------------------------------------------------------------ redelivery / reply store


def test_answered_id_gets_the_stored_final_not_a_second_generation(broker, tmp_path, services, probe):
    engine = FakeEngine()
    config = make_config(broker, tmp_path)
    service = services(config, engine)
    req = {"id": "once", "mode": "complete", "prompt": "a b c"}
    send(probe, req, "replies/once")
    first = probe.wait_final("replies/once")
    send(probe, req, "replies/once")  # e.g. redelivered after a reconnect
    again = probe.wait_final("replies/once", count=2)
    assert again == first and len(engine.calls) == 1
    # only the final is sent again, not the chunks
    assert len(probe.on("replies/once")) == 3 + 1 + 1
    # the same id from another reply topic is another request
    send(probe, req, "replies/other")
    probe.wait_final("replies/other")
    assert len(engine.calls) == 2
    # the store survives a restart
    service.stop()
    engine2 = FakeEngine()
    services(config, engine2)
    send(probe, req, "replies/once")
    assert probe.wait_final("replies/once", count=3) == first
    assert engine2.calls == []


def test_duplicate_delivery_while_pending_is_generated_once(broker, tmp_path, services, probe):
    engine = FakeEngine(token_delay_s=0.02)
    services(make_config(broker, tmp_path), engine)
    req = {"id": "dup", "mode": "complete", "prompt": "a b c d e", "stream": False}
    send(probe, req, "replies/dup")
    send(probe, req, "replies/dup")
    assert probe.wait_final("replies/dup")["text"] == "e d c b a"
    time.sleep(0.3)
    assert len(probe.finals("replies/dup")) == 1 and len(engine.calls) == 1


def test_an_id_sent_again_with_another_body_while_pending_is_answered_for_the_first(
        broker, tmp_path, services, probe, caplog):
    engine = FakeEngine(token_delay_s=0.02)
    services(make_config(broker, tmp_path), engine)
    send(probe, {"id": "same", "mode": "complete", "prompt": "a b c d e", "stream": False}, "replies/same")
    send(probe, {"id": "same", "mode": "complete", "prompt": "other words", "stream": False}, "replies/same")
    assert probe.wait_final("replies/same")["text"] == "e d c b a"
    time.sleep(0.3)
    assert len(probe.finals("replies/same")) == 1 and len(engine.calls) == 1
    assert "came again with another body while it is pending" in caplog.text


def test_a_retained_request_is_not_served_again_at_each_restart(broker, tmp_path, services, probe, caplog):
    engine = FakeEngine()
    config = make_config(broker, tmp_path)
    service = services(config, engine)
    req = {"id": "kept", "mode": "complete", "prompt": "a b", "stream": False}
    probe.publish(T.generate, req, response_topic="replies/kept", retain=True)  # served once, live
    assert probe.wait_final("replies/kept")["text"] == "b a"
    service.stop()
    engine2 = FakeEngine()
    services(config, engine2)  # subscribing, it is handed the retained copy
    send(probe, {"id": "next", "mode": "complete", "prompt": "c d", "stream": False}, "replies/next")
    assert probe.wait_final("replies/next")["text"] == "d c"
    assert len(probe.finals("replies/kept")) == 1 and [r.id for r in engine2.calls] == ["next"]
    assert "ignored a retained message on edge/dev1/v1/generate" in caplog.text
    probe.publish(T.generate, b"", retain=True)  # clear it


def test_a_client_id_with_spaces_or_an_equals_sign_is_quoted_in_the_log(broker, tmp_path, services, probe, caplog):
    """Reply topics may hold spaces: a client level "x mode=chat" must not read as two fields."""
    caplog.set_level(logging.INFO, logger="edge_runtime")
    services(make_config(broker, tmp_path), FakeEngine())
    probe.subscribe(f"{T.reply_prefix}/#")
    odd, plain = f"{T.reply_prefix}/x mode=chat/q1", f"{T.reply_prefix}/plain-1/q2"
    send(probe, {"id": "q1", "mode": "complete", "prompt": "a b", "stream": False}, odd)
    send(probe, {"id": "q2", "mode": "complete", "prompt": "a b", "stream": False}, plain)
    assert probe.wait_final(odd)["text"] == "b a" and probe.wait_final(plain)["text"] == "b a"
    assert "queued: client='x mode=chat' mode=complete" in caplog.text
    assert "done: client='x mode=chat' mode=complete" in caplog.text
    assert "queued: client=plain-1 mode=complete" in caplog.text


def test_the_empty_message_that_clears_a_retained_request_or_cancel_is_ignored_without_a_warning(
        broker, tmp_path, services, probe, caplog):
    """The daemon's warning about a retained request says to clear it with `mosquitto_pub -r -n`;
    the broker hands that empty message to the daemon too, which must not warn about it."""
    caplog.set_level(logging.INFO, logger="edge_runtime")
    services(make_config(broker, tmp_path), FakeEngine())
    probe.publish(T.generate, b"", retain=True)
    probe.publish(T.cancel, b"", retain=True)
    send(probe, {"id": "after", "mode": "complete", "prompt": "a b", "stream": False}, "replies/after")
    assert probe.wait_final("replies/after")["text"] == "b a"  # handled in order: the empty ones came first
    assert "ignored an empty message on edge/dev1/v1/generate" in caplog.text
    assert "ignored an empty message on edge/dev1/v1/cancel" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings


# ------------------------------------------------------------------ status, drain, reconnect


def test_status_online_draining_offline_and_redelivery_after_drain(broker, tmp_path, services, probe):
    config = make_config(broker, tmp_path)
    service = services(config, FakeEngine(token_delay_s=0.03))
    probe.subscribe(T.status)
    online = probe.wait_status(T.status, "online")
    assert online["model"] == "fake-codellama" and online["profile"] == "test-profile"
    assert online["bundle_sha256"] == "0" * 64 and online["queue_depth"] == 0 and online["version"]
    send(probe, {"id": "run", "mode": "complete", "prompt": " ".join(["w"] * 15)}, "replies/run")
    send(probe, {"id": "queued", "mode": "complete", "prompt": "q r"}, "replies/queued")
    probe.wait_for(lambda ms: any(m.topic == "replies/run" for m in ms))
    assert service.health().ok and service.health().running == "run"
    service.request_drain()
    probe.wait_status(T.status, "draining", timeout=1)
    send(probe, {"id": "late", "mode": "complete", "prompt": "l m"}, "replies/late")
    assert probe.wait_final("replies/run", timeout=3)["finish_reason"] == "stop"
    probe.wait_status(T.status, "offline", timeout=3)
    assert service.wait_stopped(5) and service.state == "offline"
    assert probe.finals("replies/queued") == [] and probe.finals("replies/late") == []
    with Probe(broker.host, broker.port) as fresh:  # retained
        fresh.subscribe(T.status)
        fresh.wait_for(lambda ms: ms and json.loads(ms[-1].payload)["state"] == "offline")
        assert fresh.messages[-1].retain
    # the next daemon with the same device id gets the unanswered requests
    engine = FakeEngine()
    services(config, engine)
    assert probe.wait_final("replies/queued")["text"] == "r q"
    assert probe.wait_final("replies/late")["text"] == "m l"
    time.sleep(0.2)
    assert len(probe.finals("replies/run")) == 1 and sorted(r.id for r in engine.calls) == ["late", "queued"]


def test_a_qos_0_request_queued_or_arriving_at_a_drain_is_answered_busy_not_dropped(broker, tmp_path, services,
                                                                                     probe):
    """The broker delivers a QoS 0 request once: left unacknowledged at a drain, as a QoS 1 one
    is for the next start, it would be lost without a word. Answered `busy` (not stored: the
    same request sent again is served); QoS 1 ones are still left for redelivery."""
    config = make_config(broker, tmp_path)
    service = services(config, FakeEngine(token_delay_s=0.03))
    probe.subscribe(T.status)
    send(probe, {"id": "run", "mode": "complete", "prompt": " ".join(["w"] * 15)}, "replies/run")
    probe.wait_for(lambda ms: any(m.topic == "replies/run" for m in ms))
    probe.publish(T.generate, {"id": "q0", "mode": "complete", "prompt": "a b"}, response_topic="replies/q0", qos=0)
    send(probe, {"id": "q1", "mode": "complete", "prompt": "c d"}, "replies/q1")
    wait_until(lambda: service.health().queue_depth == 2, 3)
    service.request_drain()
    probe.wait_status(T.status, "draining", timeout=1)
    probe.publish(T.generate, {"id": "late0", "mode": "complete", "prompt": "e f"}, response_topic="replies/late0",
                  qos=0)
    probe.publish(T.generate, {"id": "bad0", "mode": "complete"}, response_topic="replies/bad0", qos=0)
    for name in ("q0", "late0"):
        error = probe.wait_final(f"replies/{name}", timeout=3)["error"]
        assert error["code"] == "busy" and "stopping" in error["message"], error
    assert probe.wait_final("replies/bad0", timeout=3)["error"]["code"] == "bad_request"
    assert probe.wait_final("replies/run", timeout=3)["finish_reason"] == "stop"
    assert service.wait_stopped(5)
    assert probe.finals("replies/q1") == []
    engine = FakeEngine()
    services(config, engine)  # the next start: the QoS 1 one comes again, the QoS 0 one is sent again
    assert probe.wait_final("replies/q1")["text"] == "d c"
    send(probe, {"id": "q0", "mode": "complete", "prompt": "a b"}, "replies/q0")
    assert probe.wait_final("replies/q0", count=2)["text"] == "b a"


def test_a_cancel_during_a_drain_reaches_the_request_the_drain_left_for_the_next_daemon(
        broker, tmp_path, services, probe, caplog):
    """A request that arrives while the daemon drains is left unacknowledged, for the next
    daemon; its cancel, arriving then too, matched nothing and was acknowledged, so the next
    daemon generated the cancelled request in full (device time for a reply nobody reads,
    ahead of the requests still wanted). The cancel is left for redelivery too now: the
    broker hands both to the next daemon, in order."""
    caplog.set_level(logging.INFO, logger="edge_runtime.service")
    config = make_config(broker, tmp_path)
    service = services(config, FakeEngine(token_delay_s=0.05))
    long_prompt = " ".join(f"w{i}" for i in range(2000))  # ended by its cancel below
    send(probe, {"id": "run", "mode": "complete", "prompt": long_prompt}, "replies/run")
    probe.wait_for(lambda ms: any(m.topic == "replies/run" for m in ms), 10)
    service.request_drain()
    wait_until(lambda: service.state == "draining", 10)
    send(probe, {"id": "gone", "mode": "complete", "prompt": "a b c"}, "replies/gone")
    probe.publish(T.cancel, {"id": "gone"})  # the client gave up (Ctrl-C on ask)
    wait_until(lambda: "cancel 'gone'" in caplog.text, 10)
    probe.publish(T.cancel, {"id": "run"})
    assert probe.wait_final("replies/run", timeout=15)["finish_reason"] == "cancelled"
    assert service.wait_stopped(15)
    services(config, FakeEngine(token_delay_s=0.05))
    final = probe.wait_final("replies/gone", timeout=15)
    # cancelled while queued, or (the worker may take it first) at its first token
    assert final.get("error", {}).get("code") == "cancelled" or (
        final["finish_reason"] == "cancelled" and final["text"] != "c b a"), final
    time.sleep(0.3)
    assert len(probe.finals("replies/gone")) == 1


def test_status_reports_queue_depth(broker, tmp_path, services, probe):
    services(make_config(broker, tmp_path), FakeEngine(token_delay_s=0.03))
    probe.subscribe(T.status)
    probe.wait_status(T.status, "online")
    send(probe, {"id": "r", "mode": "complete", "prompt": " ".join(["w"] * 10)}, "replies/r")
    for i in range(2):
        send(probe, {"id": f"q{i}", "mode": "complete", "prompt": "a"}, f"replies/q{i}")
    probe.wait_for(lambda ms: any(m.topic == T.status and m.json.get("queue_depth") == 2 for m in ms), 2)
    probe.wait_final("replies/q1", timeout=3)
    probe.wait_for(lambda ms: [m for m in ms if m.topic == T.status][-1].json["queue_depth"] == 0, 2)


def test_the_systemd_status_line_says_the_model_and_the_queue(broker, tmp_path, services, probe):
    """docs/deployment.md: `systemctl status` shows "the model and queue the daemon reports"; the
    line said only the request topic, or the model, never the queue."""
    lines = []
    services(make_config(broker, tmp_path), FakeEngine(token_delay_s=0.03), on_status=lines.append)
    assert lines[-1] == "serving fake-codellama (fp32) on CPUExecutionProvider: 0 queued of 8, idle"
    send(probe, {"id": "r", "mode": "complete", "prompt": " ".join(["w"] * 10)}, "replies/r")
    for i in range(2):
        send(probe, {"id": f"q{i}", "mode": "complete", "prompt": "a"}, f"replies/q{i}")
    wait_until(lambda: lines[-1].endswith(": 2 queued of 8, generating"), 3)
    probe.wait_final("replies/q1", timeout=3)
    wait_until(lambda: lines[-1].endswith(": 0 queued of 8, idle"), 3)


def test_reconnects_and_resubscribes_after_broker_restart(broker, tmp_path, services):
    service = services(make_config(broker, tmp_path))
    broker.stop()
    wait_until(lambda: not service.connected, 5)
    assert service.health().ok  # a broker outage is not a health failure
    broker.start()
    wait_until(lambda: service.connected, 10)
    with Probe(broker.host, broker.port) as p:
        p.subscribe("replies/#")
        p.subscribe(T.status)
        p.wait_status(T.status, "online")
        send(p, {"id": "back", "mode": "complete", "prompt": "a b"}, "replies/back")
        assert p.wait_final("replies/back")["text"] == "b a"


def test_a_reconnect_to_a_broker_that_kept_no_session_says_requests_meanwhile_are_lost(broker, tmp_path, caplog,
                                                                                        services):
    """A broker that lost the daemon's session (restarted without persistence; or its session expiry,
    counted on the broker's wall clock, ran out when its clock jumped forward) has dropped what was
    sent meanwhile: the reconnect says so. One that kept it (the persistent `broker`) says nothing."""
    caplog.set_level(logging.INFO, logger="edge_runtime")
    kept = services(make_config(broker, tmp_path, **{"mqtt.session_expiry_s": 600}))
    broker.stop()
    wait_until(lambda: not kept.connected, 5)
    broker.start()
    wait_until(lambda: kept.connected, 10)
    assert "kept no session" not in caplog.text
    forgetful = MosquittoBroker(tmp_path / "forgetful", persistence=False).start()
    try:
        lost = services(make_config(forgetful, tmp_path, device_id="dev2", **{"mqtt.session_expiry_s": 600}))
        forgetful.stop()
        wait_until(lambda: not lost.connected, 5)
        forgetful.start()
        wait_until(lambda: lost.connected, 10)
        warning = next(r for r in caplog.records if "kept no session" in r.getMessage())
        assert warning.levelno == logging.WARNING
        assert "requests sent meanwhile are lost" in warning.getMessage() and "session_expiry_s, 600 s" in warning.getMessage()
    finally:
        forgetful.stop()


def test_an_unreachable_broker_is_logged_then_the_service_connects_when_it_starts(broker, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edge_runtime")
    broker.stop()
    service = EdgeService(make_config(broker, tmp_path), FakeEngine(), status_interval_s=0.1).start()
    try:
        wait_until(lambda: "cannot reach the broker" in caplog.text, 5)
        warning = next(r for r in caplog.records if "cannot reach the broker" in r.getMessage())
        assert warning.levelno == logging.WARNING and broker.url in warning.getMessage()
        assert f"no TCP connection to port {broker.port}: Connection refused" in warning.getMessage()  # why
        assert not service.connected
        broker.start()
        assert service.wait_ready(40), "did not connect once the broker was up"
    finally:
        service.stop()


def test_a_refused_login_is_logged_with_what_to_check_and_not_at_every_retry(tmp_path, caplog):
    from mosquitto_broker import secured_broker

    caplog.set_level(logging.INFO, logger="edge_runtime")
    b = secured_broker(tmp_path / "secured", users={"dev1": "right"}, acl_lines="user dev1\n")
    try:
        (tmp_path / "pw").write_text("wrong\n")
        config = make_config(b, tmp_path, **{"mqtt.username": "dev1", "mqtt.password_file": str(tmp_path / "pw")})
        attempts = []  # systemd's STATUS= line says it at every attempt
        service = EdgeService(config, FakeEngine(), status_interval_s=0.1,
                              on_status=lambda text: attempts.append(text) if "refused" in text else None).start()
        try:
            wait_until(lambda: len(attempts) >= 3, 20)
        finally:
            service.stop()
    finally:
        b.stop()
    refused = [r.getMessage() for r in caplog.records if "refused the connection" in r.getMessage()]
    assert refused and "(1 failed attempt)" in refused[0] and "Not authorized" in refused[0]
    assert "username and password_file" in refused[0] and not service.wait_ready(0)
    assert len(refused) < len(attempts)  # the 1st, 2nd, 4th... attempts, not every one


def test_a_status_the_brokers_acl_refuses_is_logged(tmp_path, caplog):
    """A device whose MQTT username is not its device_id (the sample ACL's rule) connects fine, but
    the broker refuses its status and replies (PUBACK "Not authorized"): the log said only
    "connected" while every client timed out."""
    from mosquitto_broker import secured_broker

    caplog.set_level(logging.INFO, logger="edge_runtime")
    b = secured_broker(tmp_path / "secured", users={"dev1": "pw"}, acl_lines="")
    try:
        (tmp_path / "pw").write_text("pw\n")
        config = make_config(b, tmp_path, device_id="dev2",
                             **{"mqtt.username": "dev1", "mqtt.password_file": str(tmp_path / "pw")})
        service = EdgeService(config, FakeEngine(), status_interval_s=0.1).start()
        try:
            assert service.wait_ready(10)
            wait_until(lambda: "refused a message" in caplog.text, 5)
        finally:
            service.stop()
    finally:
        b.stop()
    refused = [r for r in caplog.records if "refused a message" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR  # once a connection (offline was refused too)
    message = refused[0].getMessage()
    assert "Not authorized" in message and "edge/dev2/v1/status" in message and "'dev1'" in message


def test_a_reply_topic_the_brokers_acl_refuses_is_logged_as_the_clients_not_as_the_daemons_login(tmp_path,
                                                                                                  caplog):
    """A shell user behind the sample ACL picks a reply topic outside edge/<device>/v1/reply/
    (protocol.md: any publishable topic): the broker refuses the daemon's reply. The log blamed
    the daemon's username ("its status and its replies go nowhere") and then said nothing of the
    next refusal; it names the reply topic instead, and the status still gets its own error."""
    import subprocess

    from mosquitto_broker import secured_broker

    caplog.set_level(logging.INFO, logger="edge_runtime")
    b = secured_broker(tmp_path / "secured", users={"dev1": "dev1-pw", "client-01": "client-pw"},
                       acl_lines="user client-01\ntopic write edge/+/v1/generate\ntopic read replies/#\n")
    try:
        (tmp_path / "pw").write_text("dev1-pw\n")
        config = make_config(b, tmp_path, **{"mqtt.username": "dev1", "mqtt.password_file": str(tmp_path / "pw")})
        service = EdgeService(config, FakeEngine(), status_interval_s=0.1).start()

        def rr(request_id: str, reply_topic: str) -> subprocess.CompletedProcess:
            return subprocess.run(["mosquitto_rr", "-h", b.host, "-p", str(b.port), "-u", "client-01", "-P",
                                   "client-pw", "-q", "1", "-W", "3", "-t", T.generate, "-e", reply_topic, "-m",
                                   json.dumps({"id": request_id, "mode": "complete", "prompt": "a b"})],
                                  capture_output=True, text=True, timeout=15)
        try:
            assert service.wait_ready(10)
            assert rr("r1", "replies/x").returncode == 27  # Timed out: refused by the broker
            good = rr("r2", "edge/dev1/v1/reply/client-01/r2")
            assert good.returncode == 0 and json.loads(good.stdout)["id"] == "r2"
        finally:
            service.stop()
    finally:
        b.stop()
    said = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, [r.getMessage() for r in said]
    assert "refused a reply on 'replies/x'" in said[0].getMessage()
    assert "edge/dev1/v1/reply/<client username>/" in said[0].getMessage()


def test_a_plain_connection_to_a_tls_port_is_logged_not_silent(tmp_path, caplog):
    """mqtt:// to a TLS listener: the broker closes the connection before any CONNACK. The
    daemon logged nothing at all and kept retrying silently."""
    import subprocess

    from mosquitto_broker import MosquittoBroker

    caplog.set_level(logging.INFO, logger="edge_runtime")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(tmp_path / "server.key"), "-out", str(tmp_path / "server.crt"),
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    b = MosquittoBroker(tmp_path / "tls", persistence=False)
    b.config_path.write_text(b.config_path.read_text().replace(
        "allow_anonymous true\n", f"allow_anonymous true\ncertfile {tmp_path / 'server.crt'}\n"
                                    f"keyfile {tmp_path / 'server.key'}\n"))
    b.start()
    try:
        service = EdgeService(make_config(b, tmp_path), FakeEngine(), status_interval_s=0.1).start()
        try:
            wait_until(lambda: "before answering its CONNECT" in caplog.text, 10)
        finally:
            service.stop()
    finally:
        b.stop()
    warning = next(r for r in caplog.records if "before answering its CONNECT" in r.getMessage())
    assert warning.levelno == logging.WARNING and b.url in warning.getMessage()
    assert "TLS needs an mqtts:// broker URL" in warning.getMessage()


def test_broker_restart_mid_generation_still_answers_once(broker, tmp_path, services):
    engine = FakeEngine(token_delay_s=0.05)
    service = services(make_config(broker, tmp_path), engine)
    with Probe(broker.host, broker.port, persistent=True) as p:
        p.subscribe("replies/#")
        send(p, {"id": "mid", "mode": "complete", "prompt": WORDS40}, "replies/mid")
        p.wait_for(lambda ms: any(m.topic == "replies/mid" for m in ms))
        broker.stop()
        wait_until(lambda: not service.connected, 5)
        broker.start()
        final = p.wait_final("replies/mid", timeout=10)
        assert final["text"] == expected_text(WORDS40)
        time.sleep(0.3)
        assert len(p.finals("replies/mid")) == 1 and len(engine.calls) == 1
        # the broker's redelivery was acknowledged: a later daemon restart does not see it again
        service.stop()
        engine2 = FakeEngine()
        services(make_config(broker, tmp_path), engine2)
        send(p, {"id": "next", "mode": "complete", "prompt": "a b"}, "replies/next")
        p.wait_final("replies/next")
        time.sleep(0.2)
        assert [r.id for r in engine2.calls] == ["next"] and len(p.finals("replies/mid")) == 1


def test_fleet_group_shared_subscription(broker, tmp_path, services, probe):
    engines = [FakeEngine(), FakeEngine()]
    for name, engine in zip(("dev-a", "dev-b"), engines):
        services(make_config(broker, tmp_path, device_id=name, **{"mqtt.fleet_group": "lab"}), engine)
    for i in range(6):
        send(probe, {"id": f"f{i}", "mode": "complete", "prompt": f"x{i} y"}, f"replies/f{i}",
             topic=FLEET_GENERATE_TOPIC)
    for i in range(6):
        assert probe.wait_final(f"replies/f{i}")["text"] == f"y x{i}"
    time.sleep(0.2)
    assert all(len(probe.finals(f"replies/f{i}")) == 1 for i in range(6))
    assert sum(len(e.calls) for e in engines) == 6


def test_second_daemon_for_the_same_device_is_refused(broker, tmp_path, services):
    from edge_runtime.errors import EdgeRuntimeError
    from edge_runtime.service import EdgeService

    config = make_config(broker, tmp_path)
    services(config)
    with pytest.raises(EdgeRuntimeError, match="another edge-runtime daemon"):
        EdgeService(config, FakeEngine()).start()


def test_two_daemons_with_one_device_id_on_two_machines_are_named_and_slowed(broker, tmp_path, caplog):
    """Two machines (two state directories) with the same device_id: the broker closes
    each connection as the other connects. Each daemon says why, and backs off."""
    caplog.set_level(logging.INFO, logger="edge_runtime")
    first = start_service(make_config(broker, tmp_path / "board-a"))
    second = EdgeService(make_config(broker, tmp_path / "board-b"), FakeEngine(), status_interval_s=0.1).start()
    try:
        wait_until(lambda: "another client is probably using the client id 'edge-runtime-dev1'" in caplog.text, 30)
        error = next(r for r in caplog.records if "another client is probably" in r.getMessage())
        assert error.levelno == logging.ERROR and "a second daemon with device_id 'dev1'" in error.getMessage()
        flips = sum("lost the broker connection" in r.getMessage() for r in caplog.records)
        time.sleep(6)  # slowed to one reconnect in 15 s or more: at most one more flip each
        assert sum("lost the broker connection" in r.getMessage() for r in caplog.records) <= flips + 2
    finally:
        second.stop()
        first.stop()


def test_taking_turns_while_slowed_does_not_count_as_settled(broker, tmp_path):
    """Once slowed, each of two daemons with one client id stays connected until the other
    reconnects (15-60 s): those connections must not restore the fast pace; one that
    lasts well past the slowed backoff does."""
    from edge_runtime.service import LASTING_SESSION_S, SHORT_SESSION_S

    class Client:
        delays: list[tuple[int, int]] = []

        def reconnect_delay_set(self, min_delay: int, max_delay: int) -> None:
            self.delays.append((min_delay, max_delay))

    service = EdgeService(make_config(broker, tmp_path), FakeEngine())
    client = Client()
    for lasted in (0.5, 0.5, 0.5):  # MQTT 3.1.1: no reason code, only short connections
        service._note_session_end(client, None, lasted)
    assert client.delays[-1] == (15, 60)
    service._note_session_end(client, None, SHORT_SESSION_S + 20)  # the other daemon's turn
    assert client.delays[-1] == (15, 60)
    service._note_session_end(client, None, LASTING_SESSION_S + 1)
    assert client.delays[-1] == (1, 30)


def test_a_second_serve_for_the_device_stops_before_loading_the_bundle(broker, tmp_path):
    import argparse

    from edge_runtime.cli import cmd_serve
    from edge_runtime.serve_flags import add_serve_arguments
    from edge_runtime.device_lock import DeviceLock
    from edge_runtime.errors import EdgeRuntimeError

    state = tmp_path / "state"
    config = write_config(tmp_path / "serve.toml", broker, state)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    running = DeviceLock(state, "dev1").acquire()  # the daemon already serving this device
    try:
        with pytest.raises(EdgeRuntimeError, match="another edge-runtime daemon for device 'dev1' is running"):
            cmd_serve(parser.parse_args(["--config", str(config)]),
                      lambda bundle, profile: pytest.fail("loaded the bundle before checking the lock"))
    finally:
        running.release()


def test_a_failed_start_releases_everything(broker, tmp_path, services):
    from edge_runtime.service import EdgeService

    bad = make_config(broker, tmp_path, **{"mqtt.username": "u", "mqtt.password_file": str(tmp_path / "nope")})
    failed = EdgeService(bad, FakeEngine())
    with pytest.raises(OSError):
        failed.start()
    assert failed.state == "offline" and not failed.health().ok
    services(make_config(broker, tmp_path))  # the state dir lock was released


def test_the_watchdog_sees_no_failure_from_before_start_to_after_a_drain(broker, tmp_path, caplog):
    # under systemd the watchdog starts before the service does and stops after it drained
    from edge_runtime.sdnotify import SystemdNotifier, Watchdog
    from edge_runtime.service import EdgeService

    service = EdgeService(make_config(broker, tmp_path), FakeEngine(), status_interval_s=0.1)
    checks: list[bool] = []

    def healthy() -> bool:
        checks.append(bool(service.health()))
        return checks[-1]

    watchdog = Watchdog(SystemdNotifier(None), healthy, 0.01).start()
    try:
        time.sleep(0.05)
        service.start()
        assert service.wait_ready(10)
        time.sleep(0.05)
        service.stop()
        time.sleep(0.05)
    finally:
        watchdog.stop()
    assert len(checks) > 5 and all(checks), checks
    assert "health check failed" not in caplog.text


def test_prompts_and_text_are_not_logged_unless_configured(broker, tmp_path, services, probe, caplog):
    caplog.set_level(logging.DEBUG, logger="edge_runtime")
    service = services(make_config(broker, tmp_path))
    send(probe, {"id": "p1", "mode": "complete", "prompt": "topsecret words"}, "replies/p1")
    probe.wait_final("replies/p1")
    send(probe, {"id": "p2", "mode": "complete", "prompt": "topsecret <BOOM>"}, "replies/p2")
    probe.wait_final("replies/p2")
    text = caplog.text
    assert "'p1'" in text and "completion_tokens=2" in text and "ttft_ms=" in text
    assert "topsecret" not in text and "words" not in text
    service.stop()
    caplog.clear()
    services(make_config(broker, tmp_path, **{"service.log_content": True}))
    send(probe, {"id": "p3", "mode": "complete", "prompt": "topsecret words"}, "replies/p3")
    probe.wait_final("replies/p3")
    assert "topsecret words" in caplog.text and "words topsecret" in caplog.text


def test_health_reports_a_stalled_worker(broker, tmp_path, services, probe):
    service = services(make_config(broker, tmp_path), FakeEngine(token_delay_s=0.4), stall_after_s=0.2)
    assert service.health().ok and bool(service.health())
    send(probe, {"id": "slow", "mode": "complete", "prompt": "a b"}, "replies/slow")
    wait_until(lambda: not service.health().ok, 2)
    h = service.health()
    assert h.running == "slow" and h.stalled_for_s >= 0.2 and h.worker_alive  # rounded to ms
    probe.wait_final("replies/slow", timeout=3)
    wait_until(lambda: service.health().ok, 2)


def test_hooks_on_ready_and_on_status(broker, tmp_path, services):
    events = []
    service = services(make_config(broker, tmp_path), on_ready=lambda: events.append("ready"),
                       on_status=lambda text: events.append(text))
    assert "ready" in events and any(e.startswith("serving") for e in events)
    # the last word is "serving": "connecting to ..." came after it when the broker answered at once,
    # and `systemctl status` said the daemon was connecting while it served
    assert [e for e in events if e != "ready"][-1].startswith("serving"), events
    service.drain()
    assert events[-1] == "stopped" and "draining" in events


# ------------------------------------------------------------------ real processes


@pytest.fixture
def daemons():
    procs = []

    def make(*args, **kw):
        proc = DaemonProcess(*args, **kw)
        procs.append(proc)
        return proc

    yield make
    for proc in procs:
        proc.stop()


def test_will_message_on_sigkill(broker, tmp_path, daemons, probe):
    config = write_config(tmp_path / "d.toml", broker, tmp_path / "state")
    daemon = daemons(config)
    probe.subscribe(T.status)
    probe.wait_status(T.status, "online", timeout=10)
    daemon.kill()
    offline = probe.wait_status(T.status, "offline", timeout=5)
    assert offline["reason"] == "connection lost" and offline["device_id"] == "dev1" and offline["running"] is False
    with Probe(broker.host, broker.port) as fresh:
        fresh.subscribe(T.status)
        fresh.wait_for(lambda ms: ms and json.loads(ms[-1].payload)["state"] == "offline")
        assert fresh.messages[-1].retain


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_sigkill_with_requests_queued_then_restart_answers_each_exactly_once(
        broker, tmp_path, daemons, probe, probe311, protocol):
    config = write_config(tmp_path / "d.toml", broker, tmp_path / "state", protocol=protocol)
    calls = tmp_path / "calls.txt"
    daemon = daemons(config, token_delay=0.03, calls_file=calls)
    probe.subscribe(T.status)
    probe.wait_status(T.status, "online", timeout=10)
    client = probe if protocol == "5" else probe311
    prompts = {f"k{i}": " ".join(f"t{i}{j}" for j in range(30 if i == 0 else 8)) for i in range(5)}
    for rid, prompt in prompts.items():
        send(client, {"id": rid, "mode": "complete", "prompt": prompt}, f"replies/{rid}")
    client.wait_for(lambda ms: any(m.topic == "replies/k0" for m in ms), 5)  # k0 is running
    daemon.kill()
    assert client.finals("replies/k0") == []
    daemons(config, token_delay=0.01, calls_file=calls)
    for rid, prompt in prompts.items():
        assert client.wait_final(f"replies/{rid}", timeout=10)["text"] == expected_text(prompt)
    time.sleep(0.3)
    for rid in prompts:
        assert len(client.finals(f"replies/{rid}")) == 1, rid
    generated = calls.read_text().split()
    assert sorted(set(generated)) == sorted(prompts) and generated.count("k0") == 2
    assert all(generated.count(rid) == 1 for rid in prompts if rid != "k0")


def test_sigterm_drains_then_exits_zero(broker, tmp_path, daemons, probe):
    config = write_config(tmp_path / "d.toml", broker, tmp_path / "state")
    daemon = daemons(config, token_delay=0.03)
    probe.subscribe(T.status)
    probe.wait_status(T.status, "online", timeout=10)
    send(probe, {"id": "s0", "mode": "complete", "prompt": " ".join(["w"] * 25)}, "replies/s0")
    send(probe, {"id": "s1", "mode": "complete", "prompt": "a b"}, "replies/s1")
    send(probe, {"id": "s2", "mode": "complete", "prompt": "c d"}, "replies/s2")
    probe.wait_for(lambda ms: any(m.topic == "replies/s0" for m in ms), 5)
    daemon.signal(signal.SIGTERM)
    probe.wait_status(T.status, "draining", timeout=2)
    assert probe.wait_final("replies/s0", timeout=3)["finish_reason"] == "stop"
    assert daemon.wait(10) == 0, daemon.log
    probe.wait_status(T.status, "offline", timeout=2)
    assert probe.finals("replies/s1") == [] and probe.finals("replies/s2") == []
    assert "Traceback" not in daemon.log
    daemons(config)
    assert probe.wait_final("replies/s1", timeout=10)["text"] == "b a"
    assert probe.wait_final("replies/s2", timeout=10)["text"] == "d c"
    time.sleep(0.2)
    assert len(probe.finals("replies/s0")) == 1


def test_sighup_drains_like_sigterm_and_exits_for_the_unit_to_restart_it(broker, tmp_path, daemons, probe):
    """SIGHUP (a closed terminal, `kill -HUP` from a reload habit) killed the daemon mid-request
    with nothing logged, and systemd takes a SIGHUP death as clean: Restart=on-failure left the
    device down. It drains as SIGTERM does now; then `serve` exited 0, which left the service
    stopped too. It exits 129, on which the unit starts it again (RestartForceExitStatus=)."""
    from edge_runtime.service import SIGHUP_EXIT_STATUS

    config = write_config(tmp_path / "d.toml", broker, tmp_path / "state")
    daemon = daemons(config, token_delay=0.03, run_serve=True)
    probe.subscribe(T.status)
    probe.wait_status(T.status, "online", timeout=10)
    send(probe, {"id": "h0", "mode": "complete", "prompt": " ".join(["w"] * 25)}, "replies/h0")
    probe.wait_for(lambda ms: any(m.topic == "replies/h0" for m in ms), 5)
    daemon.signal(signal.SIGHUP)
    probe.wait_status(T.status, "draining", timeout=2)
    assert probe.wait_final("replies/h0", timeout=3)["finish_reason"] == "stop"
    assert daemon.wait(10) == SIGHUP_EXIT_STATUS == 129, daemon.log
    offline = probe.wait_status(T.status, "offline", timeout=2)
    assert "reason" not in offline  # a clean stop, not the will's "connection lost"
    assert "SIGHUP: stopping (exit status 129: the installed unit starts the daemon again" in daemon.log
    assert "Traceback" not in daemon.log
    from pathlib import Path

    unit = (Path(__file__).resolve().parents[2] / "systemd" / "edge-runtime.service").read_text().splitlines()
    assert f"RestartForceExitStatus={SIGHUP_EXIT_STATUS} SIGHUP" in unit  # and a SIGHUP death, while it loads
    assert f"SuccessExitStatus={SIGHUP_EXIT_STATUS}" in unit


def test_only_requests_that_name_their_client_may_use_the_prompt_cache(broker, tmp_path, services, probe):
    """The engine's prompt cache is scoped by client id (the reply topic's level); a request
    whose replies go elsewhere has none, so it neither reuses nor leaves keys and values."""
    engine = FakeEngine()
    services(make_config(broker, tmp_path), engine)
    send(probe, {"id": "anon", "mode": "complete", "prompt": "a b"}, "replies/anon")
    probe.wait_final("replies/anon", 5.0)
    named = T.reply_topic("ward-7", "named")
    probe.subscribe(named)
    send(probe, {"id": "named", "mode": "complete", "prompt": "a b"}, named)
    probe.wait_final(named, 5.0)
    assert [(c.client_id, c.cache_prompt) for c in engine.calls] == [("", False), ("ward-7", True)]


@pytest.mark.parametrize("client_protocol", ["5", "3.1.1"])
def test_a_reply_topic_over_the_limit_is_a_bad_request_answered_there_and_nothing_is_kept(
        broker, tmp_path, services, client_protocol):
    """A client chooses its reply topic (an MQTT 5 Response Topic or reply_to), up to the 64 KB
    of an MQTT topic: one beyond MAX_REPLY_TOPIC_BYTES would be kept whole in the reply store
    (~2,000 entries) and its client id level in log and audit lines. It is refused bad_request on
    that topic, generating and storing nothing; a topic of exactly the limit is served."""
    from edge_runtime.protocol import MAX_REPLY_TOPIC_BYTES
    engine = FakeEngine()
    service = services(make_config(broker, tmp_path), engine)
    base = f"{T.reply_prefix}/"

    def topic_of(size: int, request_id: str) -> str:  # edge/dev1/v1/reply/<client id>/<request id>, `size` bytes
        client_bytes = size - len(base) - len(request_id) - 1
        return base + "é" * (client_bytes // 2) + "c" * (client_bytes % 2) + "/" + request_id

    at_limit = topic_of(MAX_REPLY_TOPIC_BYTES, "ok")
    over, huge = topic_of(MAX_REPLY_TOPIC_BYTES + 1, "over"), topic_of(60_000, "huge")
    assert [len(t.encode()) for t in (at_limit, over, huge)] == [MAX_REPLY_TOPIC_BYTES, MAX_REPLY_TOPIC_BYTES + 1, 60_000]
    with Probe(broker.host, broker.port, protocol=client_protocol) as probe:
        probe.subscribe(f"{T.reply_prefix}/#")
        for topic in (over, huge, at_limit):
            send(probe, {"id": topic.rsplit("/", 1)[1], "mode": "complete", "prompt": "a b"}, topic)
        assert probe.wait_final(at_limit)["text"] == "b a"
        for topic in (over, huge):
            error = probe.wait_final(topic)["error"]
            assert error["code"] == "bad_request" and str(MAX_REPLY_TOPIC_BYTES) in error["message"], error
    assert len(engine.calls) == 1 and len(service.store) == 1
