"""EdgeClient, `ask` and `serve` against the real service and a real Mosquitto."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time

import pytest
from fake_engine import FakeEngine, expected_text
from mqtt_probe import Probe
from network_cut import NetworkCut
from service_harness import DaemonProcess, make_config, start_service, write_config

from edge_runtime.ask_command import add_ask_arguments, run_ask
from edge_runtime.client import EdgeClient, Generation, RemoteError
from edge_runtime.errors import BadRequest, UnsafePrompt
from edge_runtime.protocol import Topics
from mosquitto_broker import MosquittoBroker

T = Topics("dev1")


@pytest.fixture
def service(broker, tmp_path):
    s = start_service(make_config(broker, tmp_path), FakeEngine(token_delay_s=0.002))
    yield s
    s.stop()


@pytest.fixture
def slow_service(broker, tmp_path):
    s = start_service(make_config(broker, tmp_path), FakeEngine(token_delay_s=0.03))
    yield s
    s.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_complete_infill_chat(broker, service, protocol):
    with EdgeClient(broker.url, "dev1", protocol=protocol) as c:
        assert c.complete("a b c") == "c b a"
        assert c.infill("def f(", "): pass", max_tokens=8) == "pass ): f( def"
        assert c.chat([{"role": "user", "content": "x y"}]) == "y x"


def test_generate_streams_chunks_then_returns_the_final(broker, service):
    with EdgeClient(broker.url, "dev1") as c:
        gen = c.generate(mode="complete", prompt="one two three four", temperature=0, seed=1)
        assert isinstance(gen, Generation)
        chunks = list(gen)
        assert [ch["seq"] for ch in chunks] == [0, 1, 2, 3]
        assert "".join(ch["delta"] for ch in chunks) == gen.final["text"] == gen.text == "four three two one"
        assert gen.final["finish_reason"] == "stop" and gen.result() is gen.final

        def consume():
            final = yield from c.generate(mode="complete", prompt="p q", stop=["never"])
            return final

        it = consume()
        deltas = []
        try:
            while True:
                deltas.append(next(it)["delta"])
        except StopIteration as done:
            assert done.value["text"] == "".join(deltas) == "q p"


def test_requests_use_response_topic_and_correlation(broker, service):
    with Probe(broker.host, broker.port) as spy, EdgeClient(broker.url, "dev1", client_id="cli-7") as c:
        spy.subscribe(T.generate)
        gen = c.generate(mode="complete", prompt="a", request_id="req-1")
        gen.result()
        msg = spy.wait_for(lambda ms: ms)[0]
        assert msg.response_topic == "edge/dev1/v1/reply/cli-7/req-1" and msg.correlation == b"req-1"
        # also in the body: a daemon on MQTT 3.1.1 receives no Response Topic
        assert json.loads(msg.payload)["reply_to"] == "edge/dev1/v1/reply/cli-7/req-1"
    with Probe(broker.host, broker.port) as spy, \
            EdgeClient(broker.url, "dev1", client_id="cli-8", protocol="3.1.1") as c:
        spy.subscribe(T.generate)
        c.generate(mode="complete", prompt="a", request_id="req-2").result()
        msg = spy.wait_for(lambda ms: ms)[0]
        assert json.loads(msg.payload)["reply_to"] == "edge/dev1/v1/reply/cli-8/req-2"


def test_the_repetition_penalties_go_out_as_the_protocols_fields(broker, service):
    """EdgeClient's and `ask`'s penalties are the request's fields of the same names; the
    daemon takes them, and refuses one out of range naming it."""
    with Probe(broker.host, broker.port) as spy, EdgeClient(broker.url, "dev1") as c:
        spy.subscribe(T.generate)
        c.complete("a b", repeat_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5, repeat_last_n=-1)
        body = json.loads(spy.wait_for(lambda ms: ms)[0].payload)
        assert (body["repeat_penalty"], body["presence_penalty"], body["frequency_penalty"],
                body["repeat_last_n"]) == (1.1, 0.5, -0.5, -1)
        with pytest.raises(BadRequest, match="presence_penalty"):
            c.complete("a b", presence_penalty=3)
    parser = argparse.ArgumentParser()
    add_ask_arguments(parser)
    args = parser.parse_args(["--broker", broker.url, "--device-id", "dev1", "--prompt", "x",
                              "--repeat-penalty", "1.2", "--repeat-last-n", "0"])
    from edge_runtime.ask_command import _ask_request
    request = _ask_request(args)
    assert request["repeat_penalty"] == 1.2 and request["repeat_last_n"] == 0 and "presence_penalty" not in request
    assert "min_p" not in request  # not given: the daemon's default (off)


def test_min_p_goes_out_as_the_protocols_field(broker, service):
    """EdgeClient's and `ask`'s min_p is the request's field of that name; out of range, the
    daemon refuses it naming it."""
    with Probe(broker.host, broker.port) as spy, EdgeClient(broker.url, "dev1") as c:
        spy.subscribe(T.generate)
        c.complete("a b", min_p=0.05)
        assert json.loads(spy.wait_for(lambda ms: ms)[0].payload)["min_p"] == 0.05
        with pytest.raises(BadRequest, match="min_p"):
            c.complete("a b", min_p=2)
    parser = argparse.ArgumentParser()
    add_ask_arguments(parser)
    from edge_runtime.ask_command import _ask_request
    args = parser.parse_args(["--broker", broker.url, "--device-id", "dev1", "--prompt", "x", "--min-p", "0.1"])
    assert _ask_request(args)["min_p"] == 0.1
    with pytest.raises(SystemExit):
        parser.parse_args(["--broker", broker.url, "--device-id", "dev1", "--prompt", "x", "--min-p", "1.5"])


def test_error_reply_raises_remote_error(broker, service):
    with EdgeClient(broker.url, "dev1") as c:
        with pytest.raises(RemoteError) as info:
            c.complete("a <UNSAFE> b")
        assert info.value.code == "unsafe_prompt" and info.value.request_id
        with pytest.raises(RemoteError) as info:
            list(c.generate(mode="complete", prompt="x", max_tokens=10**9))
        assert info.value.code == "bad_request" and "max_tokens" in info.value.message
        assert isinstance(info.value, BadRequest)  # the local error class of its code, as the engine raises
        with pytest.raises(UnsafePrompt):
            c.complete("a <UNSAFE> b")
        assert c.complete("still ok") == "ok still"



@pytest.mark.parametrize("request_fields, says", [
    (dict(mode="chat", messages=[("user", "hi")]), "messages[0] must be a {role, content} dict or a Message, got tuple"),
    (dict(mode="chat", messages="hi"), "messages must be a list of {role, content} dicts"),
    (dict(mode="complete", prompt="x", stop=5), "stop must be a string or a list of strings, got int"),
    (dict(mode="complete", prompt="x", temperature=float("nan")), "temperature must be a finite number, got nan"),
    (dict(mode="complete", prompt=b"x"), "the request cannot be sent as JSON: Object of type bytes"),
])
def test_a_request_that_cannot_be_sent_is_a_bad_request_that_says_why(broker, service, request_fields, says):
    with EdgeClient(broker.url, "dev1") as c:
        with pytest.raises(BadRequest) as info:
            c.generate(**request_fields)
        assert says in str(info.value)
        assert c.complete("a b") == "b a"  # still usable: nothing of the refused one was kept


@pytest.mark.parametrize("timeout", [None, "30", 0, -1, float("nan")])
def test_a_timeout_that_is_no_number_of_seconds_is_refused_before_the_request_is_sent(broker, service, timeout):
    """timeout=None (Python's "wait forever") raised TypeError after the request was published:
    the device generated it for nobody, and the client kept it in flight, sending it again at
    every reconnect."""
    with Probe(broker.host, broker.port) as spy, EdgeClient(broker.url, "dev1") as c:
        spy.subscribe(T.generate)
        with pytest.raises(ValueError, match=r"timeout must be a number of seconds > 0 .*got " + repr(timeout)):
            c.generate(mode="complete", prompt="a b", timeout=timeout, request_id="refused")
        assert c.generate(mode="complete", prompt="a b", request_id="sent").result()["text"] == "b a"
        assert [m.json["id"] for m in spy.wait_for(lambda ms: ms)] == ["sent"]


def test_timeout_raises_and_cancels(broker):
    with Probe(broker.host, broker.port) as spy, EdgeClient(broker.url, "ghost") as c:
        spy.subscribe("edge/ghost/v1/cancel")
        gen = c.generate(mode="complete", prompt="x", timeout=0.3, request_id="lost-1")
        with pytest.raises(TimeoutError, match="no reply to request lost-1 for 0.3 s; no device 'ghost' has "
                                               "published a status"):
            list(gen)
        assert spy.wait_for(lambda ms: ms)[0].json == {"id": "lost-1"}



def test_a_timeout_while_the_broker_is_gone_says_so(tmp_path):
    """Not "no device has published a status": the client could not ask the broker."""
    from mosquitto_broker import free_port

    b = MosquittoBroker(tmp_path / "b", port=free_port()).start()
    try:
        with EdgeClient(b.url, "dev1", connect_timeout=5) as c:
            gen = c.generate(mode="complete", prompt="x", timeout=1)
            b.stop()
            with pytest.raises(TimeoutError, match=f"the connection to the broker at {b.url} is lost"):
                list(gen)
    finally:
        b.stop()



def test_a_fleet_request_nobody_answers_says_what_a_fleet_needs(broker):
    with EdgeClient(broker.url, "fleet") as c:
        with pytest.raises(TimeoutError, match=r"no reply to request \w+ for 0.3 s; no device of a fleet group "
                                               r"answered \(is a daemon with \[mqtt\] fleet_group"):
            c.complete("x", timeout=0.3)



def test_an_oversized_request_from_an_mqtt_3_1_1_client_is_refused_and_the_timeout_says_why(broker, service):
    """The daemon refuses a payload over its limit unread: an MQTT 5 client gets the bad_request at
    its Response Topic, an MQTT 3.1.1 one nothing, and its timeout names the size."""
    prompt = "\U0001F600" * 65536  # within max_prompt_chars, 4 bytes each: over the 256 KiB payload limit
    with EdgeClient(broker.url, "dev1") as c:
        with pytest.raises(BadRequest, match="payload is [0-9]+ bytes, the limit is 262144"):
            c.complete(prompt)
    with EdgeClient(broker.url, "dev1", protocol="3.1.1") as c:
        with pytest.raises(TimeoutError, match="the request is [0-9]+ bytes: a daemon refuses one over its "
                                               r"\[limits\] max_payload_bytes \(default 262144\)"):
            c.complete(prompt, timeout=1)


def test_the_timeout_is_for_silence_so_a_long_stream_is_not_cut_off(broker, slow_service):
    words = " ".join(f"w{i}" for i in range(40))  # 40 tokens at 30 ms: 1.2 s in all, a chunk every 30 ms
    with EdgeClient(broker.url, "dev1") as c:
        started = time.monotonic()
        gen = c.generate(mode="complete", prompt=words, timeout=0.6)
        assert len(list(gen)) == 40 and gen.final["finish_reason"] == "stop"
        assert time.monotonic() - started > 0.6



def test_a_long_answer_that_keeps_coming_is_not_cut_off_by_complete_or_ask_json(broker, slow_service, capsys):
    """complete()/infill()/chat() and `ask --json` return only the final reply, but the device
    still shows its progress: the timeout is for silence there too, not for the whole answer
    (a slow board's long answer took longer than the default 120 s, and was cancelled)."""
    words = " ".join(f"w{i}" for i in range(40))  # 1.2 s in all, a token every 30 ms
    with EdgeClient(broker.url, "dev1") as c:
        assert c.complete(words, timeout=0.6) == expected_text(words)
        assert c.chat([{"role": "user", "content": words}], timeout=0.6) == expected_text(words)
    assert ask(broker, "--prompt", words, "--json", "--timeout", "0.6") == 0
    assert json.loads(capsys.readouterr().out)["text"] == expected_text(words)


def test_asyncio_streams_awaits_and_a_cancelled_task_cancels_on_the_device(broker, slow_service):
    import asyncio

    words = " ".join(f"w{i}" for i in range(40))

    async def main(c: EdgeClient) -> None:
        streamed = [chunk["delta"] async for chunk in c.generate(mode="complete", prompt="a b c")]
        assert "".join(streamed) == "c b a"
        results = await asyncio.gather(c.generate(mode="complete", prompt="x y").aresult(),
                                       c.generate(mode="complete", prompt="p q").aresult())
        assert [r["text"] for r in results] == ["y x", "q p"]

        async def read_all(gen: Generation) -> None:
            async for _ in gen:
                pass

        gen = c.generate(mode="complete", prompt=words)
        task = asyncio.create_task(read_all(gen))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the device got the cancel: its final reply says so, long before 40 tokens
        for _ in range(50):
            if gen.final is not None:
                break
            await asyncio.sleep(0.1)
        assert gen.final is not None and gen.final["finish_reason"] == "cancelled"

    with EdgeClient(broker.url, "dev1") as c:
        asyncio.run(main(c))



def test_async_with_connects_and_closes_without_blocking_the_loop(broker, slow_service):
    import asyncio

    async def main() -> list[str]:
        ticks: list[float] = []

        async def tick() -> None:  # runs while the client connects, streams and closes
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        async with EdgeClient(broker.url, "dev1") as c:
            deltas = [chunk["delta"] async for chunk in c.generate(mode="complete", prompt="a b c")]
        ticker.cancel()
        assert len(ticks) > 5
        with pytest.raises(RuntimeError, match="not connected"):  # closed on the way out
            c.generate(mode="complete", prompt="x")
        return deltas

    assert "".join(asyncio.run(main())) == "c b a"


def test_a_generation_dropped_unread_is_forgotten_and_cancelled(broker):
    import gc

    with Probe(broker.host, broker.port) as spy, EdgeClient(broker.url, "ghost2") as c:
        spy.subscribe("edge/ghost2/v1/cancel")
        for i in range(3):
            c.generate(mode="complete", prompt="x", request_id=f"dropped-{i}")  # never read
        gc.collect()
        c.generate(mode="complete", prompt="x", request_id="kept")  # the next request cancels the dropped ones
        assert list(c._inboxes) == ["kept"]
        cancels = spy.wait_for(lambda ms: len(ms) >= 3)
        assert sorted(m.json["id"] for m in cancels) == ["dropped-0", "dropped-1", "dropped-2"]


def test_remote_errors_copy_and_pickle_as_their_class():
    import copy
    import pickle

    from edge_runtime.errors import ContextLengthExceeded, RateLimited

    error = RemoteError("rate_limited", "slow down", "r7", retry_after_s=12.5)
    for again in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert isinstance(again, RateLimited) and isinstance(again, RemoteError)
        assert (again.code, again.message, again.request_id, again.retry_after_s) == ("rate_limited", "slow down",
                                                                                      "r7", 12.5)
    too_long = RemoteError.from_reply({"code": "context_length_exceeded", "message": "m", "prompt_tokens": 300,
                                       "max_tokens": 24, "context_limit": 256}, "r8")
    for again in (copy.copy(too_long), pickle.loads(pickle.dumps(too_long))):
        assert isinstance(again, ContextLengthExceeded) and isinstance(again, RemoteError)
        assert (again.prompt_tokens, again.max_tokens, again.context_limit) == (300, 24, 256)


def replies_by_hand(broker, device: str, request_id: str, *messages: dict) -> Generation:
    """A request to a device no daemon serves, answered by `messages` published by hand."""
    c = EdgeClient(broker.url, device).connect()
    gen = c.generate(mode="complete", prompt="x", request_id=request_id, timeout=5)
    with Probe(broker.host, broker.port) as daemon:
        for m in messages:
            daemon.publish(Topics(device).reply_topic(c.client_id, request_id), {"id": request_id, **m})
    return gen


def test_chunks_lost_on_the_way_come_from_the_final_text(broker):
    """QoS 0 chunks lost (a broker restart): the deltas still add up to the final text."""
    gen = replies_by_hand(broker, "hand1", "gap-1", {"seq": 0, "delta": "ab", "done": False},
                          {"seq": 2, "delta": "ef", "done": False},  # seq 1 ("cd") never arrives
                          {"done": True, "text": "abcdef", "finish_reason": "stop"})
    try:
        chunks = list(gen)
        assert [c["delta"] for c in chunks] == ["ab", "cdef"] and chunks[-1]["recovered"] is True
        assert [c["seq"] for c in chunks] == [0, 1] and not gen.stream_diverged
    finally:
        gen.client.close()


def test_a_stream_that_is_not_the_final_texts_start_is_flagged(broker):
    gen = replies_by_hand(broker, "hand2", "div-1", {"seq": 0, "delta": "ab", "done": False},
                          {"done": True, "text": "xyz", "finish_reason": "stop"})
    try:
        assert [c["delta"] for c in gen] == ["ab"]
        assert gen.stream_diverged and gen.final["text"] == gen.text == "xyz"
    finally:
        gen.client.close()


def test_a_run_generated_again_with_other_tokens_stops_the_stream_at_once(broker):
    # after a daemon restart the request runs again from seq 0: the copy of seq 0 matches
    # what was streamed, seq 1 does not, so neither it nor what follows is streamed
    gen = replies_by_hand(broker, "hand3", "div-2", {"seq": 0, "delta": "ab", "done": False},
                          {"seq": 1, "delta": "cd", "done": False},
                          {"seq": 0, "delta": "ab", "done": False}, {"seq": 1, "delta": "XY", "done": False},
                          {"seq": 2, "delta": "ZW", "done": False},
                          {"done": True, "text": "abXYZW", "finish_reason": "stop"})
    try:
        assert [c["delta"] for c in gen] == ["ab", "cd"]
        assert gen.stream_diverged and gen.final["text"] == gen.text == "abXYZW"
    finally:
        gen.client.close()
    odd = replies_by_hand(broker, "hand5", "odd-1", {"seq": 0, "done": False}, {"seq": 1, "delta": "ab", "done": False},
                          {"seq": 1, "delta": "ab", "done": False}, {"done": True, "text": "ab", "finish_reason": "stop"})
    try:  # a chunk without a delta still takes its seq's place: the copy of seq 1 is compared with seq 1
        assert [c.get("delta") for c in odd] == [None, "ab"] and not odd.stream_diverged
    finally:
        odd.client.close()
    # run A lost seq 1 (its seq 2 waits); run B, generated after a restart, fills the gap: what
    # follows is run B's, never A's waiting seq 2; a late chunk of A is dropped
    gap = replies_by_hand(broker, "hand6", "gap-2", {"seq": 0, "delta": "ab", "done": False, "run": "A"},
                          {"seq": 2, "delta": "OLD", "done": False, "run": "A"},
                          {"seq": 0, "delta": "ab", "done": False, "run": "B"},
                          {"seq": 1, "delta": "cd", "done": False, "run": "B"},
                          {"seq": 3, "delta": "late", "done": False, "run": "A"},
                          {"seq": 2, "delta": "NEW", "done": False, "run": "B"},
                          {"done": True, "text": "abcdNEW", "finish_reason": "stop"})
    try:
        assert [c["delta"] for c in gap] == ["ab", "cd", "NEW"] and not gap.stream_diverged
    finally:
        gap.client.close()
    # without run ids (an older daemon): two deltas for one waiting seq stop the stream, the rest
    # comes from the final text; a negative seq is no chunk at all
    two = replies_by_hand(broker, "hand7", "two-1", {"seq": -1, "delta": "?", "done": False},
                          {"seq": 0, "delta": "ab", "done": False}, {"seq": 2, "delta": "OLD", "done": False},
                          {"seq": 2, "delta": "NEW", "done": False}, {"seq": 1, "delta": "cd", "done": False},
                          {"done": True, "text": "abcdNEW", "finish_reason": "stop"})
    try:
        assert [c["delta"] for c in two] == ["ab", "cdNEW"] and two.text == "abcdNEW" and not two.stream_diverged
    finally:
        two.client.close()
    same = replies_by_hand(broker, "hand4", "dup-1", {"seq": 0, "delta": "ab", "done": False},
                           {"seq": 0, "delta": "ab", "done": False}, {"seq": 1, "delta": "cd", "done": False},
                           {"done": True, "text": "abcd", "finish_reason": "stop"})
    try:
        assert [c["delta"] for c in same] == ["ab", "cd"] and not same.stream_diverged
    finally:
        same.client.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_replies_lost_while_the_client_was_cut_off_come_after_it_reconnects(tmp_path, protocol):
    # The network between client and broker fails after the first chunk and the device
    # finishes meanwhile. A broker queues at most max_queued_messages for an MQTT 5
    # session (5 here, Mosquitto's default is 1000: one message per token) and drops
    # the rest, the final reply last of all; an MQTT 3.1.1 client has no session at all.
    # The client sends the request again when it reconnects and the device answers from
    # its reply store.
    broker = MosquittoBroker(tmp_path / "broker", extra_config="max_queued_messages 5\n").start()
    engine = FakeEngine(token_delay_s=0.004)  # 120 tokens in 0.5 s, less than paho's 1 s before reconnecting
    service = start_service(make_config(broker, tmp_path), engine)
    prompt = " ".join(f"w{i}" for i in range(120))
    try:
        with NetworkCut(broker.host, broker.port) as net, EdgeClient(net.url, "dev1", protocol=protocol) as c:
            gen = c.generate(mode="complete", prompt=prompt, max_tokens=128, timeout=15)
            stream = iter(gen)
            chunks = [next(stream)]
            net.cut()
            chunks += list(stream)
            assert net.connections == 2
        assert gen.final["text"] == expected_text(prompt) == "".join(ch["delta"] for ch in chunks)
        assert chunks[-1].get("recovered") is True
        assert len(engine.calls) == 1  # answered from the reply store, not generated again
    finally:
        service.stop()
        broker.stop()


def test_an_mqtt5_client_is_answered_by_a_daemon_on_mqtt_3_1_1(broker, tmp_path):
    service = start_service(make_config(broker, tmp_path, **{"mqtt.protocol": "3.1.1"}), FakeEngine())
    try:
        with EdgeClient(broker.url, "dev1", protocol="5") as c:
            assert c.status()["mqtt_version"] == "3.1.1"
            gen = c.generate(mode="complete", prompt="x y z", timeout=10)
            assert [ch["delta"] for ch in gen] == ["z", " y", " x"] and gen.final["text"] == "z y x"
    finally:
        service.stop()


def test_a_request_that_does_not_stream_yields_its_text_as_one_chunk_not_marked_recovered(broker, service):
    """stream=False: the final reply alone comes back; iterating still gives the text (the
    deltas add up to it), but nothing was lost, so the chunk is not flagged `recovered`."""
    with EdgeClient(broker.url, "dev1") as c:
        gen = c.generate(mode="complete", prompt="a b c", stream=False)
        chunks = list(gen)
        assert [ch["delta"] for ch in chunks] == ["c b a"] == [gen.final["text"]]
        assert "recovered" not in chunks[0] and not gen.stream_diverged


def test_an_answered_request_is_not_sent_again_on_a_reconnect_even_unread(broker, service):
    with NetworkCut(broker.host, broker.port) as net, Probe(broker.host, broker.port) as spy, \
            EdgeClient(net.url, "dev1") as c:
        spy.subscribe(T.generate)
        gen = c.generate(mode="complete", prompt="a b", stream=False)
        spy.wait_for(lambda ms: len(ms) == 1)
        deadline = time.monotonic() + 5
        while gen._inbox.empty() and time.monotonic() < deadline:  # the final reply has come, unread
            time.sleep(0.01)
        net.cut()
        while net.connections < 2 and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        time.sleep(0.5)  # time for a copy to reach the broker, were one sent
        assert net.connections == 2 and len(spy.on(T.generate)) == 1
        assert gen.result()["text"] == "b a"


def test_leaving_the_loop_or_the_client_cancels_the_request(broker, slow_service):
    prompt = " ".join(f"w{i}" for i in range(60))
    with Probe(broker.host, broker.port) as spy:
        spy.subscribe(T.cancel)
        with EdgeClient(broker.url, "dev1") as c:
            gen = c.generate(mode="complete", prompt=prompt, request_id="left-1")
            for _ in gen:
                break  # the consumer stops reading: the device should stop generating
            spy.wait_for(lambda ms: [m for m in ms if m.json == {"id": "left-1"}])
            c.generate(mode="complete", prompt=prompt, request_id="left-2")  # never read
        spy.wait_for(lambda ms: [m for m in ms if m.json == {"id": "left-2"}])
        ids = [m.json["id"] for m in spy.on(T.cancel)]
        assert sorted(ids) == ["left-1", "left-2"]  # one cancel each


@pytest.mark.parametrize("leave", ["reads-one-chunk", "never-reads"])
def test_a_script_that_ends_without_closing_its_client_cancels_what_it_left(broker, slow_service, leave):
    """A script that exits with a request unanswered (no `with`, no close()) stops it on the
    device, as leaving the `with` block does: nobody will read the rest."""
    words = " ".join(f"w{i}" for i in range(60))  # 1.8 s at 30 ms a token
    script = (f"from edge_runtime import EdgeClient\n"
              f"c = EdgeClient({broker.url!r}, 'dev1', client_id='leaver').connect()\n"
              f"g = c.generate(mode='complete', prompt={words!r}, request_id='left-1')\n"
              + ("next(iter(g))\n" if leave == "reads-one-chunk" else "c.generate(mode='complete', prompt='x')\n"))
    with Probe(broker.host, broker.port) as spy:
        spy.subscribe("edge/dev1/v1/reply/leaver/left-1")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        final = spy.wait_final("edge/dev1/v1/reply/leaver/left-1", timeout=10)
    # stopped while generating, or (never read, gone at once) before it started
    assert final.get("finish_reason") == "cancelled" and len(final["text"].split()) < 60 or \
        final.get("error", {}).get("code") == "cancelled"



def test_closing_the_client_ends_the_wait_of_a_reader_in_another_thread(broker):
    import threading

    with Probe(broker.host, broker.port) as spy:
        spy.subscribe("edge/ghost3/v1/cancel")
        c = EdgeClient(broker.url, "ghost3").connect()
        gen = c.generate(mode="complete", prompt="x", timeout=30, request_id="waiting-1")
        raised: list[BaseException] = []

        def read() -> None:
            try:
                list(gen)
            except BaseException as exc:
                raised.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.3)
        started = time.monotonic()
        c.close()
        reader.join(10)
        assert not reader.is_alive() and time.monotonic() - started < 5  # not after its 30 s timeout
        assert isinstance(raised[0], ConnectionError) and "the client was closed" in str(raised[0])
        assert [m.json for m in spy.wait_for(lambda ms: ms)] == [{"id": "waiting-1"}]  # cancelled once


def test_cancel_from_the_client(broker, slow_service):
    with EdgeClient(broker.url, "dev1") as c:
        gen = c.generate(mode="complete", prompt=" ".join(f"w{i}" for i in range(40)))
        it = iter(gen)
        next(it)
        gen.cancel()
        rest = list(it)
        assert gen.final["finish_reason"] == "cancelled" and len(rest) < 39



def test_two_scripts_of_one_user_do_not_take_over_each_others_connection(broker, slow_service, caplog):
    """The client id defaults to the username (the reply topics' level the sample ACL binds to
    it), but each client connects with its own MQTT client id: a second script of the same user
    does not make the broker close the first one's connection, again and again."""
    words = " ".join(f"w{i}" for i in range(30))  # ~1 s at 30 ms a token
    with caplog.at_level("INFO", logger="edge_runtime.client"), \
            EdgeClient(broker.url, "dev1", username="alice") as a, EdgeClient(broker.url, "dev1", username="alice") as b:
        assert a.client_id == b.client_id == "alice"
        ga = a.generate(mode="complete", prompt=words)
        gb = b.generate(mode="complete", prompt="b " + words)
        assert "".join(ch["delta"] for ch in ga) == expected_text(words)
        assert "".join(ch["delta"] for ch in gb) == expected_text("b " + words)
    assert not [r for r in caplog.records if "reconnected" in r.getMessage()]
    assert "already connected" not in broker.log_path.read_text(errors="replace")



def test_two_clients_with_one_client_id_are_told_what_closes_their_connections(broker, caplog):
    """Two connections with one MQTT client id close each other's, and both reconnect, over and
    over (Mosquitto 2.0.11 tells neither why): the client says what that looks like."""
    with caplog.at_level("WARNING", logger="edge_runtime.client"), \
            EdgeClient(broker.url, "dev1", client_id="twin") as a, EdgeClient(broker.url, "dev1", client_id="twin"):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(caplog.records) < 2:  # each of the two says it
            time.sleep(0.2)
        assert any("another client connected with the MQTT client id 'twin'" in r.getMessage()
                   for r in caplog.records)
        with pytest.raises(TimeoutError, match="another client connected with the MQTT client id 'twin'"):
            a.generate(mode="complete", prompt="x", timeout=0.5).result()


def test_status(broker, service):
    with EdgeClient(broker.url, "dev1") as c:
        status = c.status()
        assert status["state"] == "online" and status["model"] == "fake-codellama"


def test_connection_failure(broker):
    from mosquitto_broker import free_port

    with pytest.raises(ConnectionError, match="no broker answers at 127.0.0.1:[0-9]+: no TCP connection to port .*"
                                              r"\(is the broker running"):
        with EdgeClient(f"mqtt://127.0.0.1:{free_port()}", "dev1", connect_timeout=30):
            pass  # refused at once, not after the 30 s
    with pytest.raises(ValueError):
        EdgeClient("http://127.0.0.1:1", "dev1")
    with pytest.raises(ValueError):
        EdgeClient(broker.url, "bad/device")
    with pytest.raises(RuntimeError):
        EdgeClient(broker.url, "dev1").generate(mode="complete", prompt="x")



def test_connect_again_after_a_failure_or_a_close_connects_afresh(broker, service, tmp_path):
    """A script that retries `connect()` until its broker is up gets through once it is; the
    reason of the failed attempt is not kept."""
    from mosquitto_broker import free_port

    late = MosquittoBroker(tmp_path / "late", port=free_port())
    c = EdgeClient(late.url, "dev1", connect_timeout=5)
    with pytest.raises(ConnectionError, match="no broker answers"):
        c.connect()
    late.start()
    try:
        with c:  # the broker is up now
            assert c.status(timeout=0.5) is None  # no daemon on that broker: it answers, nothing is retained
    finally:
        late.stop()
    with EdgeClient(broker.url, "dev1") as again:
        assert again.complete("a b") == "b a"
    for _ in range(3):  # closed and opened again: each time subscribed before the first request goes out
        with again:
            assert again.complete("x y z") == "z y x"



def test_a_connection_failure_says_whether_the_name_the_port_or_tls_failed(broker):
    with pytest.raises(ConnectionError, match="the name 'no-such-broker.invalid' does not resolve"):
        EdgeClient("mqtt://no-such-broker.invalid:1883", "dev1", connect_timeout=30).connect()
    with pytest.raises(ConnectionError, match=r"TCP connects, so the TLS handshake failed \(check the CA file"):
        EdgeClient(f"mqtts://127.0.0.1:{broker.port}", "dev1", connect_timeout=30).connect()  # a plain listener



def test_ctrl_c_while_connecting_leaves_no_network_thread_behind(tmp_path):
    """Interrupted while it waits for a broker that does not answer (here one stopped with
    SIGSTOP), connect() stops its network thread: a REPL or notebook is not left with a client
    that reconnects in the background and connects whenever the broker is back."""
    import os
    import threading

    from mosquitto_broker import free_port

    b = MosquittoBroker(tmp_path / "b", port=free_port()).start()
    os.kill(b.process.pid, signal.SIGSTOP)  # TCP connects (the kernel accepts), nothing answers
    try:
        c = EdgeClient(b.url, "dev1", client_id="interrupted", connect_timeout=30)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            c.connect()
        assert time.monotonic() - started < 10
        assert not [t for t in threading.enumerate() if t.name == "paho-mqtt-client-interrupted"]
    finally:
        os.kill(b.process.pid, signal.SIGCONT)
        b.stop()


# ------------------------------------------------------------------ ask


def ask(broker, *flags: str) -> int:
    parser = argparse.ArgumentParser()
    add_ask_arguments(parser)
    return run_ask(parser.parse_args(["--broker", broker.url, "--device-id", "dev1", *flags]))


def test_ask_streams_text(broker, service, capsys):
    assert ask(broker, "--prompt", "a b c") == 0
    out = capsys.readouterr()
    assert out.out == "c b a\n" and "[stop;" in out.err


def test_ask_json_infill_and_chat(broker, service, capsys, tmp_path):
    assert ask(broker, "--prefix", "x", "--suffix", "y", "--suffix-first", "--json", "--max-tokens", "4") == 0
    final = json.loads(capsys.readouterr().out)
    assert final["text"] == "y x" and final["done"] is True
    messages = tmp_path / "m.json"
    messages.write_text(json.dumps([{"role": "user", "content": "hello there"}]))
    assert ask(broker, "--messages", str(messages), "--temperature", "0", "--top-p", "0.5", "--top-k", "3",
               "--seed", "1", "--stop", "zzz", "--protocol", "3.1.1") == 0
    assert capsys.readouterr().out == "there hello\n"


def test_ask_no_cache_prompt_opts_the_request_out_of_the_prompt_cache(broker, tmp_path, capsys):
    engine = FakeEngine()
    s = start_service(make_config(broker, tmp_path), engine)
    try:
        assert ask(broker, "--prompt", "a b", "--client-id", "desk-1") == 0
        assert ask(broker, "--prompt", "a b", "--client-id", "desk-1", "--no-cache-prompt") == 0
    finally:
        s.stop()
    assert [r.cache_prompt for r in engine.calls] == [True, False]


def test_ask_error_reply_and_bad_flags(broker, service, capsys):
    assert ask(broker, "--prompt", "bad <UNSAFE>") == 1
    assert capsys.readouterr().err.startswith("error: unsafe_prompt: ")
    assert ask(broker, "--prompt", "bad <UNSAFE>", "--json") == 1
    out = capsys.readouterr()
    assert json.loads(out.out)["error"]["code"] == "unsafe_prompt" and out.err.startswith("error: unsafe_prompt: ")
    assert ask(broker, "--prefix", "x") == 2
    assert "--suffix" in capsys.readouterr().err
    assert ask(broker, "--prompt", "x", "--suffix", "y") == 2
    assert ask(broker, "--messages", "/nonexistent.json") == 2


@pytest.mark.parametrize("flags, named", [
    (("--temperature", "nan"), "--temperature"), (("--top-p", "0"), "--top-p"), (("--max-tokens", "0"), "--max-tokens"),
    (("--seed", "-1"), "--seed"), (("--timeout", "0"), "--timeout"), (("--deadline-ms", "-5"), "--deadline-ms"),
])
def test_ask_refuses_out_of_range_flags_before_calling_the_broker(flags, named, capsys):
    out = subprocess.run([sys.executable, "-m", "edge_runtime", "ask", "--broker", "mqtt://127.0.0.1:9",
                          "--device-id", "d", "--prompt", "x", *flags], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"argument {named}: expected" in out.stderr and "Traceback" not in out.stderr


def test_ask_names_a_tls_file_it_cannot_use(tmp_path, capsys):
    (tmp_path / "ca.pem").write_text("junk\n")
    parser = argparse.ArgumentParser()
    add_ask_arguments(parser)
    for ca, why in ((tmp_path / "ca.pem", "not a PEM CA certificate"), (tmp_path / "nope.pem", "no such file")):
        args = parser.parse_args(["--broker", "mqtts://127.0.0.1:9", "--device-id", "d", "--prompt", "x",
                                  "--tls-ca", str(ca)])
        assert run_ask(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: bad_request: --tls-ca {ca}: {why}") and err.count("\n") == 1



def test_a_password_without_a_username_is_refused_not_dropped(broker, tmp_path, capsys):
    """MQTT carries no password without a user name: the client would connect anonymously,
    and a broker that allows it would never say the password went unused."""
    with pytest.raises(ValueError, match="needs a username"):
        EdgeClient(broker.url, "dev1", password="secret")
    (tmp_path / "pw").write_text("secret\n")
    assert ask(broker, "--prompt", "x", "--password-file", str(tmp_path / "pw")) == 2
    assert "--password-file needs --username" in capsys.readouterr().err



def test_tls_files_with_a_plain_broker_url_are_refused_not_ignored(broker, tmp_path, capsys):
    """A plain connection to a TLS port gets no answer: it waited out the connect timeout."""
    with pytest.raises(ValueError, match="tls_ca given, but mqtt://.* is a plain connection: TLS needs an mqtts://"):
        EdgeClient(broker.url, "dev1", tls_ca=tmp_path / "ca.pem")
    assert ask(broker, "--prompt", "x", "--tls-ca", str(tmp_path / "ca.pem")) == 2
    assert "--tls-ca given, but --broker mqtt://" in capsys.readouterr().err


def test_ask_with_the_cli_request_flags(broker, service, capsys):
    from edge_runtime.cli import add_request_arguments

    parser = argparse.ArgumentParser()
    add_request_arguments(parser)  # the flags `generate` has
    add_ask_arguments(parser, request_arguments=False)
    args = parser.parse_args(["--broker", broker.url, "--device-id", "dev1", "--prompt", "p q", "--json"])
    assert run_ask(args) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "q p"


def test_ask_timeout_says_what_the_devices_status_says(broker, capsys, tmp_path):
    parser = argparse.ArgumentParser()
    add_ask_arguments(parser)

    def ask_device(device: str, *flags: str) -> int:
        return run_ask(parser.parse_args(["--broker", broker.url, "--device-id", device, "--prompt", "x",
                                          "--timeout", "0.3", *flags]))

    assert ask_device("nobody-here") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: timeout: ") and "no device 'nobody-here' has published a status" in err
    with Probe(broker.host, broker.port) as p:
        p.publish(Topics("gone-1").status, {"state": "offline", "ts": 1_700_000_000.0}, retain=True)
    assert ask_device("gone-1", "--json") == 1
    out = capsys.readouterr()
    assert "device 'gone-1' is offline since 2023-11-" in out.err
    reply = json.loads(out.out)  # --json: the error as a final reply, for scripts that parse stdout
    assert reply["done"] is True and reply["error"]["code"] == "timeout" and reply["id"]
    with Probe(broker.host, broker.port) as p:  # the will of a daemon that died: its ts is when it connected
        p.publish(Topics("gone-2").status, {"state": "offline", "running": False, "reason": "connection lost",
                                            "ts": 1_700_000_000.0}, retain=True)
    assert ask_device("gone-2") == 1
    err = capsys.readouterr().err
    assert "device 'gone-2' is offline: the broker lost its connection" in err
    assert "the daemon had started at 2023-11-" in err and "since" not in err
    # a status stamped years after this machine's clock: the device's clock (or this one) is wrong, said so
    ahead = time.time() + 3 * 365 * 86400
    with Probe(broker.host, broker.port) as p:
        p.publish(Topics("gone-3").status, {"state": "offline", "ts": ahead}, retain=True)
    assert ask_device("gone-3") == 1
    err = capsys.readouterr().err
    assert (f"device 'gone-3' is offline since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ahead))} by the "
            "device's clock, 1095 days ahead of this machine's: one of the two clocks is wrong") in err


def test_a_request_given_up_on_while_the_device_was_away_is_cancelled_when_it_is_back(broker, tmp_path, capsys):
    config = make_config(broker, tmp_path)
    start_service(config, FakeEngine()).stop()  # the daemon's session on the broker keeps what comes meanwhile
    parser = argparse.ArgumentParser()
    add_ask_arguments(parser)
    with Probe(broker.host, broker.port) as spy:
        spy.subscribe(T.client_reply_filter("desk"))
        assert run_ask(parser.parse_args(["--broker", broker.url, "--device-id", "dev1", "--prompt", "a b c d e f g h",
                                          "--client-id", "desk", "--timeout", "0.3"])) == 1
        err = capsys.readouterr().err
        assert "device 'dev1' is offline since" in err and "gets both and stops the request at once" in err
        engine = FakeEngine(token_delay_s=0.05)
        s = start_service(config, engine)
        try:
            got = spy.wait_for(lambda ms: [m for m in ms if m.json.get("done")])
        finally:
            s.stop()
    final = [m.json for m in got if m.json.get("done")]
    # stopped while generating (finish_reason) or while still queued (the error): either way cancelled
    assert [f.get("finish_reason") or f.get("error", {}).get("code") for f in final] == ["cancelled"], final


def test_ask_leaves_max_tokens_to_the_device(broker, tmp_path, capsys):
    s = start_service(make_config(broker, tmp_path, **{"limits.max_tokens": 3}), FakeEngine())
    try:
        assert ask(broker, "--prompt", "a b c d e f", "--json") == 0  # the device's default: its limit, 3
        assert json.loads(capsys.readouterr().out)["text"] == "f e d"
        assert ask(broker, "--prompt", "a b c d e f", "--max-tokens", "2") == 0
        assert capsys.readouterr().out == "f e\n"
    finally:
        s.stop()


# ------------------------------------------------------------------ serve


def test_serve_with_config_file_and_flag_overrides(broker, tmp_path):
    config = write_config(tmp_path / "serve.toml", broker, tmp_path / "state", device_id="from-file")
    daemon = DaemonProcess(config, run_serve=True, extra=["--device-id", "from-flag"])
    try:
        with EdgeClient(broker.url, "from-flag") as c:
            status = c.status(timeout=10)
            assert status and status["state"] == "online" and status["device_id"] == "from-flag"
            assert c.complete("served by run_serve") == "run_serve by served"
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(10) == 0, daemon.log
    finally:
        daemon.stop()


def test_serve_reports_config_errors(tmp_path, broker):
    (tmp_path / "bad.toml").write_text(f'[model]\nbundle = "."\n[mqtt]\nbroker = "{broker.url}"\n'
                                       'device_id = "d"\nkeepalive = "soon"\n')
    daemon = DaemonProcess(tmp_path / "bad.toml", run_serve=True)
    try:
        assert daemon.wait(10) != 0
        assert "mqtt.keepalive" in daemon.log
    finally:
        daemon.stop()


def test_serve_that_cannot_run_a_first_request_says_so_before_it_reports_ready(tiny_bundle, tmp_path, capsys,
                                                                               monkeypatch):
    from edge_runtime.cli import main
    from edge_runtime.engine import Engine

    def out_of_memory(self):
        raise RuntimeError("Failed to allocate memory for requested buffer of size 4294967296")

    monkeypatch.setattr(Engine, "warm_up", out_of_memory)
    assert main(["serve", "--bundle", str(tiny_bundle), "--broker", "mqtt://127.0.0.1:9", "--device-id", "d",
                 "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err
    assert "could not run a first request (RuntimeError: Failed to allocate memory" in err
    assert "edge-runtime fit" in err and "Traceback" not in err


def test_serve_logs_the_config_and_bundle_it_loads_before_the_hashing(tiny_bundle, tmp_path, caplog, capsys):
    """The start-up log (docs/deployment.md: "bundle, execution provider, broker") named no bundle
    folder nor config file, and said nothing until the bundle was hashed and loaded: a copy that
    fails its check was not named in the journal before the error."""
    import logging
    import shutil

    from edge_runtime.cli import main

    caplog.set_level(logging.INFO, logger="edge_runtime")
    bundle = shutil.copytree(tiny_bundle, tmp_path / "copied-bundle")
    (bundle / "tokenizer.json").write_bytes(b"x" + (bundle / "tokenizer.json").read_bytes()[1:])
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\nbundle = "{bundle}"\n[mqtt]\nbroker = "mqtt://127.0.0.1:9"\ndevice_id = "d"\n'
                      f'[service]\nstate_dir = "{tmp_path / "state"}"\n')
    assert main(["serve", "--config", str(config)]) == 2
    assert "tokenizer.json" in capsys.readouterr().err  # the check failed, after the line below
    first = [r.getMessage() for r in caplog.records if r.name.startswith("edge_runtime")][0]
    assert first == (f"config {config}; loading bundle {bundle} (profile the bundle's own): checking the size "
                     "and SHA-256 of each file first")


def test_serve_without_a_broker_names_the_flag(tmp_path, capsys):
    from edge_runtime.cli import main

    assert main(["serve", "--bundle", str(tmp_path), "--device-id", "d"]) == 2
    assert ("mqtt.broker: missing key (give --broker, or broker in the [mqtt] table of --config FILE)"
            in capsys.readouterr().err)
    assert main(["serve"]) == 2  # nothing at all: the first table missing, with its required flags
    assert "model: missing key (give --bundle BUNDLE, or a [model] table in --config FILE)" in capsys.readouterr().err
    assert main(["serve", "--bundle", str(tmp_path)]) == 2
    assert "(give --broker BROKER and --device-id DEVICE_ID, or a [mqtt] table" in capsys.readouterr().err


def test_serve_takes_log_level_after_the_subcommand_too(tmp_path, capsys):
    """`edge-runtime serve ... --log-level DEBUG` (as an operator adds it to ExecStart=) stopped
    with argparse's 'unrecognized arguments': it was a flag of the command before `serve` only."""
    from edge_runtime.cli import build_parser, main

    assert main(["serve", "--log-level", "debug", "--bundle", str(tmp_path), "--device-id", "d"]) == 2
    err = capsys.readouterr().err
    assert "mqtt.broker: missing key" in err and "unrecognized" not in err
    parser = build_parser()
    assert parser.parse_args(["serve", "--log-level", "debug"]).log_level == "DEBUG"
    assert parser.parse_args(["--log-level", "error", "serve"]).log_level == "ERROR"  # before it, as before
    assert parser.parse_args(["--log-level", "error", "serve", "--log-level", "info"]).log_level == "INFO"
    assert parser.parse_args(["serve"]).log_level is None  # the config's [service] log_level then
    # docs/config.example.toml: log_level takes "DEBUG, INFO, WARNING, ERROR or CRITICAL (`serve --log-level
    # LEVEL` wins over it)": the flag takes every level the key does (CRITICAL was refused)
    from edge_runtime import cli, config
    assert cli.LOG_LEVELS == config.LOG_LEVELS
    assert parser.parse_args(["serve", "--log-level", "critical"]).log_level == "CRITICAL"


# ------------------------------------------------------------------ fleet and the sample ACL


def test_fleet_requests_from_the_client(broker, tmp_path):
    services = [start_service(make_config(broker, tmp_path, device_id=d, **{"mqtt.fleet_group": "lab"}))
                for d in ("dev-a", "dev-b")]
    try:
        with Probe(broker.host, broker.port) as spy, EdgeClient(broker.url, "fleet", client_id="cli") as c:
            spy.subscribe("edge/fleet/v1/reply/#")
            assert [c.complete(f"x{i} y") for i in range(4)] == [f"y x{i}" for i in range(4)]
            assert all(m.topic.startswith("edge/fleet/v1/reply/cli/") for m in spy.messages)
            assert c.status(timeout=0.1) is None
    finally:
        for s in services:
            s.stop()


def test_daemon_and_client_through_the_sample_acl(tmp_path):
    """Usernames as identities, a password file and the ACL's pattern lines from
    deploy/mosquitto/acl (plain TCP here; TLS is covered by tests/system)."""
    from mosquitto_broker import secured_broker

    b = secured_broker(tmp_path, users={"dev1": "dev-pw", "client-01": "client-pw"},
                       acl_lines="user client-01\ntopic write edge/+/v1/generate\ntopic write edge/+/v1/cancel\n"
                                 "topic read edge/+/v1/status\nuser dev1\ntopic read edge/fleet/v1/generate\n"
                                 "topic write edge/fleet/v1/reply/#\n")
    (tmp_path / "dev.pw").write_text("dev-pw\n")
    service = None
    try:
        service = start_service(make_config(b, tmp_path, **{"mqtt.username": "dev1",
                                                            "mqtt.password_file": str(tmp_path / "dev.pw"),
                                                            "mqtt.fleet_group": "lab"}))
        with EdgeClient(b.url, "dev1", username="client-01", password="client-pw") as c:
            assert c.client_id == "client-01"
            assert c.status()["state"] == "online"
            assert c.complete("through the acl") == "acl the through"
            gen = c.generate(mode="complete", prompt="a b", stream=True)
            assert "".join(ch["delta"] for ch in gen) == "b a"
        with EdgeClient(b.url, "fleet", username="client-01", password="client-pw", protocol="3.1.1") as c:
            assert c.complete("fleet request") == "request fleet"
        with pytest.raises(ConnectionError):
            with EdgeClient(b.url, "dev1", username="client-01", password="wrong", connect_timeout=2):
                pass
        # a client id other than the username: the ACL delivers none of the replies, and the timeout says why
        with EdgeClient(b.url, "dev1", username="client-01", password="client-pw", client_id="desk-2") as c:
            with pytest.raises(TimeoutError, match="its replies go under the client id 'desk-2', not the "
                                                   "username 'client-01'"):
                c.complete("x", timeout=1)
    finally:
        if service is not None:
            service.stop()
        b.stop()


def test_the_summary_line_names_kept_drafts_only_when_there_are_some():
    from edge_runtime.ask_command import drafted_note

    assert drafted_note(None) == drafted_note(0) == ""
    assert drafted_note(9) == ", 9 of them confirmed drafts"
