"""Broker access. The refusals themselves are proven against the sample secured
configuration (TLS, passwords, ACL) in tests/system/test_secured_broker.py: no
credentials, wrong password, a client publishing to another device's topics, a
client subscribing to other clients' replies. Here the daemon is added: two
clients behind the sample ACL's pattern lines use the same request ids, and
neither ever sees the other's prompt or answer.
"""

from __future__ import annotations

import time

from reliability_kit import Ledger, record_figures
from service_harness import make_config, start_service

from mosquitto_broker import secured_broker


def test_the_daemon_never_echoes_one_clients_prompt_or_answer_to_another(tmp_path):
    b = secured_broker(tmp_path, users={u: f"{u}-pw" for u in ("dev1", "client-a", "client-b")},
                       acl_lines="user client-a\ntopic write edge/+/v1/generate\nuser client-b\n"
                                 "topic write edge/+/v1/generate\n")
    (tmp_path / "dev.pw").write_text("dev1-pw\n")
    service = None
    try:
        # queue of 32: the 10 requests below arrive at once and none may be answered `busy`
        service = start_service(make_config(b, tmp_path, **{"mqtt.username": "dev1", "limits.queue_depth": 32,
                                                            "mqtt.password_file": str(tmp_path / "dev.pw")}))
        a = Ledger(b.host, b.port, client_id="client-a", username="client-a", password="client-a-pw", tag="a")
        bb = Ledger(b.host, b.port, client_id="client-b", username="client-b", password="client-b-pw", tag="b")
        # each client may read only edge/<dev>/v1/reply/<its name>/#
        a.prefix, bb.prefix = "edge/dev1/v1/reply/client-a", "edge/dev1/v1/reply/client-b"
        a.listen()
        bb.listen()
        bb.subscribe("edge/dev1/v1/reply/#")  # accepted by the broker, but the ACL delivers nothing foreign
        bb.subscribe("edge/dev1/v1/generate")  # others' prompts: not readable
        for i in range(5):
            rid = f"same-{i}"  # both clients use the same ids
            a.send("edge/dev1/v1/generate", rid, {"id": rid, "mode": "complete", "prompt": f"secretA{i} alpha"})
            bb.send("edge/dev1/v1/generate", rid, {"id": rid, "mode": "complete", "prompt": f"publicB{i} beta"})
        ids = [f"same-{i}" for i in range(5)]
        assert not a.wait_finals(ids, 10) and not bb.wait_finals(ids, 10)
        # b asks with a's reply topic as its Response Topic: the daemon may publish
        # there (it is the device's own reply prefix), but only b's own answer goes
        # to a, never a's stored answer to b
        bb.client.publish("edge/dev1/v1/generate", b'{"id": "same-0", "mode": "complete", "prompt": "x y"}', qos=1,
                          properties=_response("edge/dev1/v1/reply/client-a/same-0")).wait_for_publish(5)
        time.sleep(1.0)
        b_seen = [m.payload.decode() for m in bb.other] + [
            str(f) for ans in bb.answers.values() for f in (*ans.finals, *ans.chunks)]
        a_texts = {f["text"] for i in ids for f in a.finals(i)}
        b_texts = {f["text"] for i in ids for f in bb.finals(i)}
        leaked = [s for s in b_seen if "secretA" in s]
        record_figures("no_echo", {"requests_per_client": 5, "shared_ids": 5, "a_answers": len(a_texts),
                                   "b_answers": len(b_texts), "foreign_messages_seen_by_b": len(leaked)})
        assert a_texts == {f"alpha secretA{i}" for i in range(5)}, a_texts
        assert b_texts == {f"beta publicB{i}" for i in range(5)}, b_texts
        assert leaked == [], leaked
        a.close()
        bb.close()
    finally:
        if service is not None:
            service.stop()
        b.stop()


def _response(topic: str):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topic
    props.CorrelationData = b"x"
    return props
