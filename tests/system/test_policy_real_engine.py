"""The policy around the real engine (a real bundle, real Mosquitto, EdgeClient):
a `stop` rule ends greedy generation exactly where its pattern completes, and no
part of the match is streamed: the reply holds only what came before it."""

from __future__ import annotations

import re

from edge_runtime.classifier import BundleClassifier
from edge_runtime.client import EdgeClient
from edge_runtime.config import load_config
from edge_runtime.engine import Engine
from edge_runtime.policy import ClassifierSpec, normalize
from edge_runtime.service import EdgeService
from edge_runtime.types import Chunk, GenerationRequest, SamplingParams

PROMPT = "def parse_config(path):"
TOKENS = 24


def test_stop_rule_ends_real_generation_before_its_match_begins(broker, tiny_bundle, tmp_path):
    engine = Engine.from_bundle(tiny_bundle)
    request = GenerationRequest(mode="complete", prompt=PROMPT, max_tokens=TOKENS,
                                sampling=SamplingParams(temperature=0.0))
    chunks = [item.text for item in engine.generate(request) if isinstance(item, Chunk)]
    full = "".join(chunks)
    # A pattern made of two consecutive chunks from the middle of the greedy output,
    # chosen where it first occurs, so the match begins with chunk k and completes with k + 1.
    for k in range(len(chunks) // 3, len(chunks) - 1):
        needle = chunks[k] + chunks[k + 1]
        head = "".join(chunks[:k + 2])
        if needle.strip() and full.find(needle) == len("".join(chunks[:k])) and normalize(head) == head:
            break
    else:  # pragma: no cover - the tiny model's output is fixed by its seed
        raise AssertionError(f"no usable chunk pair in {chunks!r}")
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rules]]\nname = "stop-here"\naction = "stop"\non = ["output"]\ncase_sensitive = true\n'
                      f"patterns = ['''{re.escape(needle)}''']\n")
    config = load_config(None, {"model.bundle": str(tiny_bundle), "mqtt.broker": broker.url, "mqtt.device_id": "pol1",
                                "service.state_dir": str(tmp_path / "state"), "policy.file": str(policy)})
    with EdgeService(config, engine, status_interval_s=0.1) as service:
        assert service.wait_ready(10)
        with EdgeClient(broker.url, "pol1", client_id="tester") as client:
            gen = client.generate(mode="complete", prompt=PROMPT, max_tokens=TOKENS, temperature=0.0, timeout=60)
            streamed = "".join(c["delta"] for c in gen)
            final = gen.result()
    assert final["finish_reason"] == "policy"
    assert streamed == final["text"] == "".join(chunks[:k])  # chunk k began the match: it is held back
    assert any("stop-here" in w for w in final["warnings"])


def test_a_second_bundle_as_the_classifier(tiny_bundle):
    """The classifier's label is the first word the second model generates (greedy):
    blocked when that label is listed, allowed otherwise; a deadline it cannot meet
    fails closed."""
    judge_engine = Engine.from_bundle(tiny_bundle)
    spec = ClassifierSpec(bundle=tiny_bundle, block_labels=("unsafe",), timeout_s=60.0)
    label = BundleClassifier(spec, judge_engine).classify("rm -rf /").label
    assert label and label != "(no label)"
    blocking = ClassifierSpec(bundle=tiny_bundle, block_labels=(label,), timeout_s=60.0)
    assert BundleClassifier(blocking, judge_engine).classify("rm -rf /").blocked
    allowing = ClassifierSpec(bundle=tiny_bundle, block_labels=(label + "-not",), timeout_s=60.0)
    assert not BundleClassifier(allowing, judge_engine).classify("rm -rf /").blocked
    too_long = ClassifierSpec(bundle=tiny_bundle, block_labels=(label,), timeout_s=60.0, max_text_chars=10**6)
    verdict = BundleClassifier(too_long, judge_engine).classify("word " * 100_000)  # beyond the context
    assert verdict.failed and verdict.blocked
