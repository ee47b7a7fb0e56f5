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
