"""The prompt cache: a request whose prompt begins as the previous request's ids did
runs only the rest of its prompt, and its tokens are still torch's greedy tokens.

What the cache holds is spelled out here from the loop's contract: the previous
prompt's ids and every generated token that was fed back (all but the last one
sampled when the request ended on its token limit), and at least the new prompt's
last id runs again for its logits."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import torch_reference
from failing_runs import FailingRuns
from edge_runtime.engine import Engine
from edge_runtime.errors import ConfigError, DeadlineExceeded
from edge_runtime.types import Chunk, GenerationRequest, GenerationResult, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def expected_reuse(held: list[int], prompt: list[int]) -> int:
    n = 0
    while n < min(len(held), len(prompt) - 1) and held[n] == prompt[n]:
        n += 1
    return n


def fed_ids(result: GenerationResult) -> list[int]:
    """The ids whose keys and values a finished request leaves in the cache."""
    fed = list(result.token_ids) if result.finish_reason == "stop" else list(result.token_ids[:-1])
    return list(result.prompt_token_ids) + fed


def complete(engine: Engine, prompt: str, n: int = 12, **kw) -> GenerationResult:
    return engine.complete(GenerationRequest(mode="complete", prompt=prompt, max_tokens=n, sampling=GREEDY, **kw))


@pytest.fixture
def engine(tiny_bundle):
    return Engine.from_bundle(tiny_bundle)


def test_a_prompt_that_continues_the_last_request_runs_only_its_new_part_and_matches_torch(engine, tiny_checkpoint):
    first = complete(engine, "def fibonacci(n):\n    ", n=10)
    assert first.usage.cached_prompt_tokens == 0
    # the next request: the first prompt, its answer as text, then more (a chat's next turn does this)
    second = complete(engine, "def fibonacci(n):\n    " + first.text + "\n\ndef main():\n", n=16)
    reused = expected_reuse(fed_ids(first), list(second.prompt_token_ids))
    assert second.usage.cached_prompt_tokens == reused
    assert reused >= len(first.prompt_token_ids) - 1  # at least the first prompt (its last id may merge)
    assert second.usage.prompt_tokens == len(second.prompt_token_ids)
    assert list(second.token_ids) == torch_reference.greedy(tiny_checkpoint, list(second.prompt_token_ids), 16,
                                                            frozenset({2}))


def test_the_daemons_warm_up_leaves_nothing_for_the_first_request(engine, tiny_checkpoint):
    """`serve` warms the engine up before it reports ready; the first request then keeps nothing
    of the warm-up and gives torch's tokens."""
    assert engine.warm_up() > 0
    first = complete(engine, "def main():\n    ", n=10)
    assert first.usage.cached_prompt_tokens == 0
    assert list(first.token_ids) == torch_reference.greedy(tiny_checkpoint, list(first.prompt_token_ids), 10,
                                                           frozenset({2}))


def test_the_same_prompt_again_runs_its_last_id_only_and_gives_the_same_tokens(engine, tiny_checkpoint):
    first = complete(engine, "import numpy as np\n\ndef norm(x):\n", n=16)
    again = complete(engine, "import numpy as np\n\ndef norm(x):\n", n=16)
    assert again.usage.cached_prompt_tokens == len(again.prompt_token_ids) - 1
    assert again.token_ids == first.token_ids
    assert list(again.token_ids) == torch_reference.greedy(tiny_checkpoint, list(again.prompt_token_ids), 16,
                                                           frozenset({2}))


def test_a_prompt_that_parts_early_keeps_only_the_common_start(engine, tiny_checkpoint):
    complete(engine, "class Stack:\n    def push(self, item):\n", n=8)
    other = complete(engine, "class Queue:\n    def put(self, item):\n", n=12)
    held = list(engine.tokenizer.encode("class Stack:\n    def push(self, item):\n"))
    assert 0 < other.usage.cached_prompt_tokens == expected_reuse([1] + held, list(other.prompt_token_ids)) < 4
    assert list(other.token_ids) == torch_reference.greedy(tiny_checkpoint, list(other.prompt_token_ids), 12,
                                                           frozenset({2}))


def test_a_long_prompt_kept_in_part_runs_its_rest_in_prefill_chunks(tiny_bundle, tiny_checkpoint):
    engine = Engine.from_bundle(tiny_bundle)
    engine.decoder.prefill_chunk = 64  # the rest (over 100 ids) runs in several chunks, the first one partial
    body = "".join(f"    total += values[{i}] * {i}\n" for i in range(40))
    complete(engine, "def weighted(values):\n    total = 0\n", n=4)
    long = complete(engine, "def weighted(values):\n    total = 0\n" + body, n=12)
    assert 5 < long.usage.cached_prompt_tokens < 64 < long.usage.prompt_tokens - long.usage.cached_prompt_tokens
    assert list(long.token_ids) == torch_reference.greedy(tiny_checkpoint, list(long.prompt_token_ids), 12,
                                                          frozenset({2}))


def test_the_cache_is_kept_per_client_unless_shared_or_off(tiny_bundle):
    prompt = "def quicksort(items):\n"
    per_client = Engine.from_bundle(tiny_bundle)
    complete(per_client, prompt, client_id="line-3-hmi")
    assert complete(per_client, prompt, client_id="qa-laptop").usage.cached_prompt_tokens == 0
    assert complete(per_client, prompt, client_id="qa-laptop").usage.cached_prompt_tokens > 0

    shared = Engine.from_bundle(tiny_bundle, prompt_cache="shared")
    complete(shared, prompt, client_id="line-3-hmi")
    assert complete(shared, prompt, client_id="qa-laptop").usage.cached_prompt_tokens > 0

    off = Engine.from_bundle(tiny_bundle, prompt_cache="off")
    complete(off, prompt)
    assert complete(off, prompt).usage.cached_prompt_tokens == 0


def test_an_unknown_scope_is_a_config_error_naming_the_key(tiny_bundle):
    with pytest.raises(ConfigError, match="prompt_cache must be one of client, shared, off") as info:
        Engine.from_bundle(tiny_bundle, prompt_cache="everyone")
    assert info.value.key == "model.prompt_cache"


def test_after_a_cancelled_or_timed_out_request_only_what_ran_is_reused(engine, tiny_checkpoint):
    prompt = "def parse(line):\n    "
    cancel = threading.Event()
    stream = engine.generate(GenerationRequest(mode="complete", prompt=prompt, max_tokens=30, sampling=GREEDY),
                             cancel)
    for item in stream:
        if isinstance(item, Chunk) and len(item.token_ids) >= 1:
            cancel.set()
    cancelled = item
    assert cancelled.finish_reason == "cancelled"
    again = complete(engine, prompt + cancelled.text + "\n", n=12)
    # the token sampled when the cancel was seen was never fed back
    held = list(cancelled.prompt_token_ids) + list(cancelled.token_ids[:-1])
    assert again.usage.cached_prompt_tokens == expected_reuse(held, list(again.prompt_token_ids))
    assert list(again.token_ids) == torch_reference.greedy(tiny_checkpoint, list(again.prompt_token_ids), 12,
                                                           frozenset({2}))

    with pytest.raises(DeadlineExceeded):
        list(engine.generate(GenerationRequest(mode="complete", prompt=prompt, max_tokens=30, sampling=GREEDY,
                                               deadline=0.0)))
    after = complete(engine, prompt, n=12)
    assert after.usage.cached_prompt_tokens == len(after.prompt_token_ids) - 1
    assert list(after.token_ids) == torch_reference.greedy(tiny_checkpoint, list(after.prompt_token_ids), 12,
                                                           frozenset({2}))


def test_the_optimum_graph_keeps_nothing_between_requests(tiny_checkpoint, tmp_path, exporter):
    bundle = exporter(tiny_checkpoint, tmp_path / "optimum", graph="optimum")
    engine = Engine.from_bundle(bundle)
    complete(engine, "def f(x):\n")
    again = complete(engine, "def f(x):\n")
    assert again.usage.cached_prompt_tokens == 0
    assert list(again.token_ids) == torch_reference.greedy(tiny_checkpoint, list(again.prompt_token_ids), 12,
                                                           frozenset({2}))


def test_an_int8_cache_reused_gives_what_running_the_same_steps_gives(tiny_checkpoint, tmp_path, exporter):
    """The cpu-x86_64 int4 bundle keeps an int8 KV cache: the kept rows hold the codes the
    prompt and the decode steps wrote, and the new prompt's rest (up to 32 ids: the int8
    kernel; more: float attention over them) gives what it would have had the same engine
    run those steps itself, and close to what a float cache gives."""
    bundle = exporter(tiny_checkpoint, tmp_path / "int4", precision="int4", skip_fidelity=True)
    warm, fresh = Engine.from_bundle(bundle), Engine.from_bundle(bundle)
    assert warm.decoder.kv_dtype == np.int8
    first = complete(warm, "def area(radius):\n", n=12)
    # ids, not text: random weights' tokens do not come back from their text as the same ids
    held = fed_ids(first)
    ids = np.array(held + warm.tokenizer.encode("\n\ndef volume(radius, height):\n"), dtype=np.int64)
    assert 1 < len(ids) - len(held) <= 32
    cache = warm.decoder.new_cache(len(ids) + 1, ids)
    assert cache.length == len(held) == len(first.prompt_token_ids) + 11  # the rows kept
    reused = warm.decoder.prefill(cache, ids[cache.length:])[-1]
    # a fresh engine that runs what the first request ran -- its prompt, then each fed token as a
    # decode step (whose rows carry the int8 cache's error, unlike a prompt's) -- then the rest
    replay = fresh.decoder.new_cache(len(ids) + 1)
    prompt_len = len(first.prompt_token_ids)
    fresh.decoder.prefill(replay, ids[:prompt_len])
    for token in ids[prompt_len:len(held)]:
        fresh.decoder.decode(replay, int(token))
    np.testing.assert_array_equal(reused, fresh.decoder.prefill(replay, ids[len(held):])[-1])
    # against the same weights with a float cache: within the int8 cache's error (the fidelity
    # figures' order), which a wrong position or mask in the kernel's rows would exceed
    floats = Engine.from_bundle(exporter(tiny_checkpoint, tmp_path / "int4-f32kv", precision="int4",
                                         kv_cache_bits=0, skip_fidelity=True)).decoder
    exact = floats.prefill(floats.new_cache(len(ids) + 1), ids)[-1]
    assert np.abs(reused - exact).max() < 0.05 * float(exact.max() - exact.min())
    assert reused.argmax() == exact.argmax()


def test_an_int8_cache_keeps_no_short_common_start_so_the_prompt_runs_as_a_fresh_engines(
        tiny_checkpoint, tmp_path, exporter):
    """An infill after a completion shares only <s>: keeping that one int8 row saved nothing
    and made the answer differ from a fresh engine's by the int8 cache's error. A common
    start shorter than INT8_MIN_KEPT_ROWS is not kept; the prompt runs in float as a first
    prompt does, to the bit what a fresh engine gives."""
    from edge_runtime.gqa_decoder import INT8_MIN_KEPT_ROWS

    bundle = exporter(tiny_checkpoint, tmp_path / "int4", precision="int4", skip_fidelity=True)
    warm, fresh = Engine.from_bundle(bundle), Engine.from_bundle(bundle)
    assert warm.decoder.kv_dtype == np.int8
    complete(warm, "def area(radius):\n    return 3.14159 * radius * radius\n", n=12)
    ids = np.array(warm.tokenizer.encode("import math\nimport sys\nimport os\n\n\nclass Circle(object):\n"), dtype=np.int64)
    ids = np.concatenate([[warm.tokenizer.bos_id], ids])
    cache = warm.decoder.new_cache(len(ids) + 1, ids)
    assert cache.length == 0  # only <s> in common
    np.testing.assert_array_equal(warm.decoder.prefill(cache, ids)[-1],
                                  fresh.decoder.prefill(fresh.decoder.new_cache(len(ids) + 1), ids)[-1])
    # a common start of INT8_MIN_KEPT_ROWS ids or more is kept
    longer = np.concatenate([ids, np.array(warm.tokenizer.encode("    def __init__(self, radius):\n"
                                                                  "        self.radius = radius\n"))])
    assert len(ids) >= INT8_MIN_KEPT_ROWS
    assert warm.decoder.new_cache(len(longer) + 1, longer).length == len(ids)
    # through the engine: an infill after a completion reports nothing cached
    infill = warm.complete(GenerationRequest(mode="infill", prefix="def f(", suffix="):\n", max_tokens=4,
                                           sampling=GREEDY))
    assert infill.usage.cached_prompt_tokens == 0


def test_a_prompt_that_failed_midway_leaves_only_the_chunks_that_ran(tiny_bundle, tiny_checkpoint):
    engine = Engine.from_bundle(tiny_bundle)
    engine.decoder.prefill_chunk = 16
    prompt = "".join(f"x{i} = {i} * {i}\n" for i in range(12))
    session = engine.decoder.session
    engine.decoder.session = FailingRuns(session, fail_at=3)  # the third chunk fails
    with pytest.raises(RuntimeError, match="a kernel failed"):
        complete(engine, prompt)
    engine.decoder.session = session
    again = complete(engine, prompt)
    assert again.usage.cached_prompt_tokens == 32  # two chunks of 16 ran
    assert list(again.token_ids) == torch_reference.greedy(tiny_checkpoint, list(again.prompt_token_ids), 12,
                                                           frozenset({2}))



class SetDuringRun:
    """The session, calling `then` while its `at`-th run runs (a cancel that arrives mid-prompt)."""

    def __init__(self, session, then, at: int) -> None:
        self.session, self.then, self.at, self.runs = session, then, at, 0

    def run_with_iobinding(self, binding, options=None):
        self.runs += 1
        if self.runs == self.at:
            self.then()
        return self.session.run_with_iobinding(binding, options)


def infill_tokens_match_torch(engine: Engine, result: GenerationResult, checkpoint) -> bool:
    """Torch's greedy tokens for the result's prompt, up to the infill's end token (▁<EOT>, </s>)."""
    stops = engine.plan(GenerationRequest(mode="infill", prefix="x", sampling=GREEDY)).stop_ids
    expected = torch_reference.greedy(checkpoint, list(result.prompt_token_ids), len(result.token_ids) + 1)
    if result.finish_reason == "stop":
        return list(result.token_ids) == expected[:len(result.token_ids)] and expected[len(result.token_ids)] in stops
    return list(result.token_ids) == expected[:len(result.token_ids)]


LONG_PREFIX = "".join(f"x{i} = {i} * {i}\n" for i in range(12))  # over 100 ids: 7 chunks of 16


def test_a_cancel_during_a_long_prompt_stops_it_at_the_next_chunk_and_keeps_what_ran(tiny_bundle, tiny_checkpoint):
    """An editor cancels the request of the last keystroke while its long prompt runs: the run
    ends after the chunk that was running (no more chunks, no token), and the next keystroke's
    request keeps the chunks that ran and gives torch's tokens."""
    engine = Engine.from_bundle(tiny_bundle, prompt_lookup=False)
    engine.decoder.prefill_chunk = 16
    session = engine.decoder.session
    cancel = threading.Event()
    engine.decoder.session = SetDuringRun(session, cancel.set, at=2)  # the cancel comes while the 2nd chunk runs
    items = list(engine.generate(GenerationRequest(mode="infill", prefix=LONG_PREFIX, suffix="\n", suffix_first=True,
                                                   max_tokens=8, sampling=GREEDY), cancel))
    engine.decoder.session = session
    result = items[-1]
    assert len(items) == 1  # no chunk
    assert result.finish_reason == "cancelled" and result.token_ids == () and result.text == ""
    # the next keystroke: one more character at the cursor
    after = engine.complete(GenerationRequest(mode="infill", prefix=LONG_PREFIX + "y", suffix="\n",
                                              suffix_first=True, max_tokens=8, sampling=GREEDY))
    assert after.usage.cached_prompt_tokens == 32  # the two chunks that ran, not the whole prompt
    assert infill_tokens_match_torch(engine, after, tiny_checkpoint)


def test_a_deadline_that_passes_during_a_long_prompt_stops_it_at_the_next_chunk(tiny_bundle, tiny_checkpoint):
    engine = Engine.from_bundle(tiny_bundle, prompt_lookup=False)
    engine.decoder.prefill_chunk = 16
    session = engine.decoder.session
    deadline = time.monotonic() + 2.0

    def wait_past_deadline() -> None:
        while time.monotonic() <= deadline:
            time.sleep(0.05)

    engine.decoder.session = SetDuringRun(session, wait_past_deadline, at=2)
    with pytest.raises(DeadlineExceeded, match="while the prompt ran"):
        list(engine.generate(GenerationRequest(mode="complete", prompt=LONG_PREFIX, max_tokens=8, sampling=GREEDY,
                                               deadline=deadline)))
    engine.decoder.session = session
    again = complete(engine, LONG_PREFIX, n=8)
    assert again.usage.cached_prompt_tokens == 32
    assert list(again.token_ids) == torch_reference.greedy(tiny_checkpoint, list(again.prompt_token_ids), 8,
                                                           frozenset({2}))
