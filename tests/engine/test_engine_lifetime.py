"""An Engine's lifetime in a program that loads several: `close()` (or a `with` block)
releases the onnxruntime session and the KV buffers at once, even where something still
holds the engine (a notebook's output history), and a closed engine refuses requests."""

from __future__ import annotations

import gc
import weakref

import pytest

from edge_runtime import Engine, GenerationRequest, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def request(prompt: str, n: int = 6) -> GenerationRequest:
    return GenerationRequest(mode="complete", prompt=prompt, max_tokens=n, sampling=GREEDY)


def test_closing_releases_the_session_and_kv_buffers_while_the_engine_is_still_referenced(tiny_bundle):
    history = []  # what keeps an engine alive in a notebook: Out[n], a list, a closure
    with Engine.from_bundle(tiny_bundle) as engine:
        history.append(engine)
        expected = engine.complete(request("def main():\n")).token_ids
        session, decoder = weakref.ref(engine.session), weakref.ref(engine.decoder)
    gc.collect()
    assert session() is None and decoder() is None
    with pytest.raises(RuntimeError, match="closed"):
        engine.complete(request("def main():\n"))
    engine.close()  # again: nothing happens
    assert history[0].info.model_name  # what it says about itself stays readable
    with Engine.from_bundle(tiny_bundle) as again:  # a new one in the same process gives the same tokens
        assert again.complete(request("def main():\n")).token_ids == expected


def test_an_engine_with_an_open_stream_is_not_closed_under_it(tiny_bundle):
    engine = Engine.from_bundle(tiny_bundle)
    stream = engine.generate(request("def f(x):\n", 12))
    first = next(stream)
    with pytest.raises(RuntimeError, match="stream of this engine is open"):
        engine.close()
    rest = list(stream)  # the stream goes on as if nothing happened
    assert rest[-1].token_ids[:len(first.token_ids)] == first.token_ids
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(engine.generate(request("x")))


def test_an_interrupt_between_a_steps_run_and_its_bookkeeping_leaves_no_row_claimed_for_another_id(
        tiny_bundle, monkeypatch):
    """Ctrl-C lands where it will: here just after a decode step's run has been counted into the
    cache (its length advanced). The ids the cache says it holds must already be the step's, or
    the next prompt that matches the row's stale id reuses a row computed for another token."""
    from edge_runtime.gqa_decoder import SharedKVCache

    engine = Engine.from_bundle(tiny_bundle)
    fresh = Engine.from_bundle(tiny_bundle, prompt_cache="off")
    start, longer = "def main():\n", "def main():\nx = 1\n"
    short = fresh.complete(request(start, 2))
    held = short.usage.prompt_tokens  # rows of `start`; the next row is `longer`'s "x", or the token after `start`
    assert engine.tokenizer.decode([short.token_ids[0]]) != "x"  # else the rows would match anyway
    engine.complete(request(longer))  # the cache's rows: `longer`'s ids

    advance = SharedKVCache.advance

    def interrupted(cache, new_tokens):
        advance(cache, new_tokens)
        if cache.length == held + 1:  # the first decode step after `start`'s prompt
            raise KeyboardInterrupt

    monkeypatch.setattr(SharedKVCache, "advance", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.complete(request(start))
    monkeypatch.setattr(SharedKVCache, "advance", advance)
    again = engine.complete(request(longer))
    assert again.usage.cached_prompt_tokens == held  # not the row computed for the other token
    assert again.token_ids == fresh.complete(request(longer)).token_ids
