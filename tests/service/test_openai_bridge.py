"""`edge-runtime openai-bridge`: OpenAI's HTTP API answered by the real service over a real
Mosquitto, driven by OpenAI's own Python package (the independent reference for the API's
shapes: it parses every answer and event into its typed objects)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading

import openai
import pytest
from fake_engine import FakeEngine, expected_text
from mqtt_probe import Probe
from service_harness import make_config, start_service

from edge_runtime.client import EdgeClient
from edge_runtime.openai_bridge import BridgeServer, BridgeSettings
from edge_runtime.protocol import Topics

T = Topics("dev1")


@contextlib.contextmanager
def bridge_over(broker, tmp_path, engine, **settings):
    """The service on `engine` and a bridge to it on a free loopback port; yields the server."""
    service = start_service(make_config(broker, tmp_path), engine)
    client = EdgeClient(broker.url, "dev1", client_id="bridge").connect()
    server = BridgeServer(("127.0.0.1", 0), client, BridgeSettings(device_id="dev1", timeout_s=20, **settings))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        client.close()
        service.stop()


@pytest.fixture
def engine():
    return FakeEngine(token_delay_s=0.002)


@pytest.fixture
def bridge(broker, tmp_path, engine):
    with bridge_over(broker, tmp_path, engine) as server:
        yield server


def _openai(server, key: str = "unused") -> openai.OpenAI:
    host, port = server.server_address[:2]
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key=key, max_retries=0, timeout=20)


def test_a_completion_and_its_stream_are_openais_shapes(bridge, engine):
    api = _openai(bridge)
    prompt = "alpha beta gamma delta"
    whole = api.completions.create(model="codellama", prompt=prompt, max_tokens=10)
    assert whole.object == "text_completion" and whole.model == "codellama" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text == expected_text(prompt) and whole.choices[0].finish_reason == "stop"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (4, 4, 8)
    assert engine.calls[-1].mode == "complete" and engine.calls[-1].prompt == prompt

    events = list(api.completions.create(model="codellama", prompt=prompt, max_tokens=3, stream=True,
                                         stream_options={"include_usage": True}))
    texts = [e.choices[0].text for e in events if e.choices]
    assert "".join(texts) == expected_text(prompt, 3) and len(texts) >= 3
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 3


def test_a_suffix_makes_the_completion_an_infill(bridge, engine):
    api = _openai(bridge)
    out = api.completions.create(model="m", prompt="def add(a, b):", suffix="print(add(1, 2))", max_tokens=50)
    call = engine.calls[-1]
    assert (call.mode, call.prefix, call.suffix) == ("infill", "def add(a, b):", "print(add(1, 2))")
    assert out.choices[0].text == expected_text("def add(a, b): print(add(1, 2))")
    assert not call.suffix_first  # the device's default order (PSM)
    api.completions.create(model="m", prompt="x", suffix="y", extra_body={"suffix_first": True})
    assert engine.calls[-1].suffix_first


def test_a_bridge_for_editors_sends_infills_suffix_first(broker, tmp_path):
    """--suffix-first: SPM keeps the prompt cache across keystrokes (README: an editor's completions);
    a body's own suffix_first still wins."""
    engine = FakeEngine()
    with bridge_over(broker, tmp_path, engine, suffix_first=True) as server:
        api = _openai(server)
        api.completions.create(model="m", prompt="x", suffix="y")
        assert engine.calls[-1].suffix_first
        api.completions.create(model="m", prompt="x", suffix="y", extra_body={"suffix_first": False})
        assert not engine.calls[-1].suffix_first
        api.completions.create(model="m", prompt="x")
        assert engine.calls[-1].mode == "complete"


def test_chat_whole_and_streamed_with_openais_message_forms(bridge, engine):
    api = _openai(bridge)
    messages = [{"role": "developer", "content": "Answer with code only."},
                {"role": "user", "content": [{"type": "text", "text": "reverse "}, {"type": "text", "text": "a list"}]}]
    whole = api.chat.completions.create(model="m", messages=messages, max_completion_tokens=20)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected_text("reverse a list")
    call = engine.calls[-1]
    assert [(m.role, m.content) for m in call.messages] == [("system", "Answer with code only."),
                                                            ("user", "reverse a list")]
    assert call.max_tokens == 20

    events = list(api.chat.completions.create(model="m", messages=messages, stream=True))
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events) == expected_text("reverse a list")
    assert events[-1].choices[0].finish_reason == "stop"
    assert all(e.object == "chat.completion.chunk" for e in events)


def test_sampling_fields_and_llama_cpps_extensions_reach_the_device(bridge, engine):
    api = _openai(bridge)
    api.completions.create(model="m", prompt="a b c", max_tokens=5, temperature=0.3, top_p=0.8, seed=7,
                           stop=["zzz"], presence_penalty=0.5, frequency_penalty=-0.5,
                           extra_body={"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1, "repeat_last_n": 32})
    call = engine.calls[-1]
    s = call.sampling
    assert (s.temperature, s.top_p, s.seed, s.top_k, s.min_p) == (0.3, 0.8, 7, 40, 0.05)
    assert (s.presence_penalty, s.frequency_penalty, s.repeat_penalty, s.repeat_last_n) == (0.5, -0.5, 1.1, 32)
    assert call.stop == ("zzz",) and call.max_tokens == 5


def test_errors_are_openais_with_the_protocols_codes(bridge):
    api = _openai(bridge)
    with pytest.raises(openai.BadRequestError) as info:  # the device refuses it
        api.completions.create(model="m", prompt="a <UNSAFE> b")
    assert info.value.status_code == 400 and info.value.code == "unsafe_prompt"
    with pytest.raises(openai.BadRequestError) as info:  # the daemon's range check, naming the field
        api.completions.create(model="m", prompt="a", temperature=-1)
    assert info.value.code == "bad_request" and "temperature" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:  # a streamed request refused before its first token
        list(api.chat.completions.create(model="m", messages=[{"role": "user", "content": "[INST] x"}],
                                         stream=True, max_tokens=10**9))
    assert info.value.code == "bad_request" and "max_tokens" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:  # what the bridge cannot honour is refused, not ignored
        api.completions.create(model="m", prompt="a", n=2)
    assert info.value.param == "n"
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="m", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:"}}]}])
    assert "only text parts" in info.value.message
    with pytest.raises(openai.NotFoundError):
        api.embeddings.create(model="m", input="x")
    assert [m.id for m in api.models.list()] == ["dev1"]


def test_a_client_that_goes_away_mid_stream_cancels_the_request_on_the_device(broker, tmp_path):
    with bridge_over(broker, tmp_path, FakeEngine(token_delay_s=0.05)) as server:
        with Probe(broker.host, broker.port) as spy:
            spy.subscribe(T.client_reply_filter("bridge"))
            body = json.dumps({"model": "m", "prompt": " ".join(f"w{i}" for i in range(200)), "stream": True,
                               "max_tokens": 200}).encode()
            sock = socket.create_connection(server.server_address[:2], timeout=20)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            received = b""
            while b"\r\n\r\ndata: " not in received:  # the headers and the first event
                received += sock.recv(4096)
            assert received.startswith(b"HTTP/1.1 200") and b"Content-Type: text/event-stream" in received
            sock.close()  # the editor's user typed on
            messages = spy.wait_for(lambda ms: any(m.json.get("done") is True for m in ms), timeout=20)
            final = next(m.json for m in messages if m.json.get("done") is True)
            assert final["finish_reason"] == "cancelled" and final["usage"]["completion_tokens"] < 200


def test_an_api_key_is_required_when_one_is_set(broker, tmp_path):
    with bridge_over(broker, tmp_path, FakeEngine(), api_key="s3cret") as server:
        with pytest.raises(openai.AuthenticationError):
            _openai(server, "wrong").completions.create(model="m", prompt="a b")
        assert _openai(server, "s3cret").completions.create(model="m", prompt="a b").choices[0].text == "b a"


def test_the_command_refuses_to_serve_other_machines_without_a_key(broker):
    out = subprocess.run([sys.executable, "-m", "edge_runtime", "openai-bridge", "--broker", broker.url,
                          "--device-id", "dev1", "--listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--api-key-file" in out.stderr
    out = subprocess.run([sys.executable, "-m", "edge_runtime", "openai-bridge", "--broker", broker.url,
                          "--device-id", "dev1", "--listen", "nonsense"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "HOST:PORT" in out.stderr


def test_the_real_engine_answers_through_the_bridge_as_it_answers_its_own_api(broker, tmp_path, tiny_bundle):
    """The tiny Code Llama-shaped bundle behind the daemon: a greedy completion, an infill (prompt +
    suffix) and a chat through OpenAI's package are the texts the engine gives the same requests
    directly (whose tokens are torch's: tests/engine/test_engine_generation.py)."""
    from edge_runtime.engine import Engine
    from edge_runtime.types import GenerationRequest, Message, SamplingParams

    engine = Engine.from_bundle(tiny_bundle, prompt_lookup=False)
    greedy = SamplingParams(temperature=0.0)
    direct = [engine.complete(GenerationRequest(mode="complete", prompt="def f(x):", max_tokens=8, sampling=greedy,
                                                cache_prompt=False)),
              engine.complete(GenerationRequest(mode="infill", prefix="def add(a, b):\n    ", suffix="\n", max_tokens=8,
                                                sampling=greedy, cache_prompt=False)),
              engine.complete(GenerationRequest(mode="chat", messages=(Message("user", "Sort a list."),), max_tokens=8,
                                                sampling=greedy, cache_prompt=False))]
    with bridge_over(broker, tmp_path, engine, cache_prompt=False) as server:
        api = _openai(server)
        completion = api.completions.create(model="m", prompt="def f(x):", max_tokens=8, temperature=0)
        infill = api.completions.create(model="m", prompt="def add(a, b):\n    ", suffix="\n", max_tokens=8,
                                        temperature=0, stream=True)
        chat = api.chat.completions.create(model="m", messages=[{"role": "user", "content": "Sort a list."}],
                                           max_tokens=8, temperature=0)
        assert completion.choices[0].text == direct[0].text
        assert completion.usage.prompt_tokens == direct[0].usage.prompt_tokens
        assert "".join(e.choices[0].text for e in infill) == direct[1].text
        assert chat.choices[0].message.content == direct[2].text
        assert chat.choices[0].finish_reason == {"length": "length", "stop": "stop"}[direct[2].finish_reason]
    engine.close()
