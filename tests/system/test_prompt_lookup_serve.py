"""Prompt lookup through the real daemon (`edge-runtime serve`, real Mosquitto, EdgeClient):
a greedy request whose answer repeats its context streams the text that one step per token
gives, the final reply says how many drafts were confirmed, and `[model] prompt_lookup =
false` turns drafting off."""

from __future__ import annotations

import subprocess
import sys
import time

from edge_runtime.client import EdgeClient
from edge_runtime.engine import Engine
from edge_runtime.types import GenerationRequest, SamplingParams

PROMPT = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n\n\ndef add("
TOKENS = 48


def serve_and_ask(broker, bundle, tmp_path, device: str, lookup: bool) -> tuple[str, dict]:
    config = tmp_path / f"{device}.toml"
    config.write_text(f'[model]\nbundle = "{bundle}"\nprompt_lookup = {str(lookup).lower()}\n'
                      f'[mqtt]\nbroker = "{broker.url}"\ndevice_id = "{device}"\n'
                      f'[service]\nstate_dir = "{tmp_path / device}"\n')
    log = open(tmp_path / f"{device}.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "edge_runtime", "serve", "--config", str(config)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        with EdgeClient(broker.url, device, client_id="editor") as client:
            deadline = time.monotonic() + 60
            while (client.status(1.0) or {}).get("state") != "online":  # subscribed: a request is not lost
                assert time.monotonic() < deadline and daemon.poll() is None, (tmp_path / f"{device}.log").read_text()
            gen = client.generate(mode="complete", prompt=PROMPT, max_tokens=TOKENS, temperature=0.0, timeout=120)
            streamed = "".join(c["delta"] for c in gen)
            return streamed, gen.result()
    finally:
        daemon.terminate()
        assert daemon.wait(60) == 0, (tmp_path / f"{device}.log").read_text()[-2000:]
        log.close()


def test_the_daemon_streams_greedy_text_with_confirmed_drafts_and_the_config_turns_them_off(
        broker, demo_int4_bundle, tmp_path):
    plain = Engine.from_bundle(demo_int4_bundle, prompt_lookup=False).complete(
        GenerationRequest(mode="complete", prompt=PROMPT, max_tokens=TOKENS, sampling=SamplingParams(temperature=0.0)))
    streamed, final = serve_and_ask(broker, demo_int4_bundle, tmp_path, "lookup-on", True)
    assert streamed == final["text"] == plain.text
    usage = final["usage"]
    assert 0 < usage["accepted_draft_tokens"] <= usage["draft_tokens"], usage
    assert usage["completion_tokens"] == len(plain.token_ids)
    streamed, final = serve_and_ask(broker, demo_int4_bundle, tmp_path, "lookup-off", False)
    assert streamed == final["text"] == plain.text
    assert final["usage"]["draft_tokens"] == final["usage"]["accepted_draft_tokens"] == 0
