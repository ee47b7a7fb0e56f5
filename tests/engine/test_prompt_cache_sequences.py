"""A seeded random sequence of requests on one engine -- a file edited, extended, cut and sent
again, a chat that grows and takes a turn back, infills, prompts at the prefill chunk and the
int8 kernel's follow-up size, stop strings, cancels, closed streams, a failed run, refused
requests, seeded sampling with penalties -- gives each request the tokens and text a fresh
engine gives it (no prompt cache, no prompt lookup), and the prompt cache keeps exactly the
rows the earlier requests left: their prompts and the tokens that were fed back.

The tiny fp32 bundle keeps a float cache, so the equality is exact (its random weights have no
near-ties on these prompts); torch's greedy tokens check the fresh engine itself."""

from __future__ import annotations

import random
import threading

import pytest

import torch_reference
from failing_runs import FailingRuns
from edge_runtime.engine import Engine
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.types import GenerationRequest, GenerationResult, Message, SamplingParams

UNKNOWN = "unknown"
TEXT = "".join(f"def f{i}(x, y={i}):\n    z = x * {i} + y\n    return z - {i % 7}\n\n" for i in range(60))


def piece(rng: random.Random, tokens: int) -> str:
    start = rng.randrange(0, len(TEXT) - 4 * tokens - 1)
    return TEXT[start:start + 3 * tokens]


def requests(rng: random.Random, n: int):
    """(request, how to run it): "full", ("cancel", k), ("close", k), ("fail", k), "precancel"."""
    prompt, messages = piece(rng, 40), []
    for _ in range(n):
        kind = rng.choice(["extend", "extend", "edit", "cut", "again", "new", "chat", "infill", "bad"])
        if kind == "extend":
            prompt += piece(rng, rng.choice([1, 3, 30, 34, 90]))
        elif kind == "edit":
            at = rng.randrange(len(prompt))
            prompt = prompt[:at] + "q" + prompt[at + 1:]
        elif kind == "cut":
            prompt = prompt[:rng.randrange(1, len(prompt))]
        elif kind == "new":
            prompt = piece(rng, rng.choice([20, 170]))
        r = rng.random()
        sampling = (SamplingParams(temperature=0.0) if r < 0.5 else
                    SamplingParams(temperature=0.0, repeat_penalty=1.3, frequency_penalty=0.2) if r < 0.65 else
                    SamplingParams(temperature=0.8, top_p=0.9, top_k=rng.choice([0, 20]), seed=rng.randrange(99)))
        common = dict(max_tokens=rng.choice([1, 4, 12, 20]), sampling=sampling, client_id=rng.choice("aab"),
                      cache_prompt=rng.random() > 0.1, stop=("\n\n",) if rng.random() < 0.2 else ())
        if kind == "chat":
            if messages and messages[-1].role == "user":
                messages = messages[:-1] if rng.random() < 0.3 else [*messages, Message("assistant", "ok")]
            messages = [*messages, Message("user", piece(rng, rng.choice([5, 33])))]
            request = GenerationRequest(mode="chat", messages=tuple(messages), **common)
        elif kind == "infill":
            request = GenerationRequest(mode="infill", prefix=prompt, suffix=piece(rng, 8),
                                        suffix_first=rng.random() < 0.5, **common)
        elif kind == "bad":
            request = GenerationRequest(mode="complete", prompt=prompt, **{**common, "max_tokens": 5000})
        else:
            request = GenerationRequest(mode="complete", prompt=prompt, **common)
        how = rng.choices(["full", "cancel", "close", "fail", "precancel"], [20, 3, 2, 2, 1])[0]
        yield request, (how if how in ("full", "precancel") else (how, rng.randint(1, 3)))


def run(engine: Engine, request: GenerationRequest, how):
    """(token ids, text, finish reason, cached prompt tokens, ids fed back) -- or the error's name
    for a refused request; the ids fed are None where they cannot be told from outside."""
    cancel = threading.Event()
    if how == "precancel":
        cancel.set()
    session = engine.decoder.session
    if how[0] == "fail":
        engine.decoder.session = FailingRuns(session, how[1])
    stream = engine.generate(request, cancel)
    tokens: list[int] = []
    try:
        for item in stream:
            if isinstance(item, GenerationResult):
                fed = list(item.token_ids) if item.finish_reason == "stop" and not request.stop else \
                    list(item.token_ids[:-1]) if not request.stop else None
                return list(item.token_ids), item.text, item.finish_reason, item.usage.cached_prompt_tokens, fed
            tokens.extend(item.token_ids)
            if how[0] == "cancel" and len(tokens) >= how[1]:
                cancel.set()
            if how[0] == "close" and len(tokens) >= how[1]:
                stream.close()
                return tokens, None, "closed", None, None if request.stop else tokens[:-1]
    except EdgeRuntimeError as exc:
        return type(exc).__name__
    except RuntimeError as exc:
        assert how[0] == "fail", exc
        return "failed"
    finally:
        engine.decoder.session = session
    raise AssertionError("no result")


@pytest.mark.parametrize("seed", [0, 1])
def test_requests_on_one_engine_give_what_a_fresh_engine_gives(tiny_bundle, tiny_checkpoint, seed):
    rng = random.Random(seed)
    warm = {lookup: Engine.from_bundle(tiny_bundle, prompt_lookup=lookup) for lookup in (True, False)}
    fresh = Engine.from_bundle(tiny_bundle, prompt_cache="off", prompt_lookup=False)
    # the lookup-free engine's (owner, ids) as its requests left them; UNKNOWN after a failed run or a stop string
    held: tuple[str | None, list[int]] | str = (None, [])
    torch_checked = 0
    for index, (request, how) in enumerate(requests(rng, 40)):
        want = run(fresh, request, "full")
        if isinstance(want, str):  # refused: by every engine alike, and nothing changes
            assert all(run(e, request, how) == want for e in warm.values())
            continue
        plan = fresh.plan(request)
        owner = request.client_id if request.cache_prompt else None
        for lookup, engine in warm.items():
            got = run(engine, request, how)
            where = f"request {index} {how} lookup={lookup}: {request}"
            if got == "failed" or how == "precancel":
                assert got == "failed" or got[:3] == ([], "", "cancelled"), where
                continue
            tokens, text, finish, cached, fed = got
            if finish in ("cancelled", "closed"):
                assert tokens == want[0][:len(tokens)], where
            else:
                assert (tokens, text, finish) == want[:3], where
            if lookup:
                continue
            if cached is not None and held != UNKNOWN:  # the rows kept: the common start of what was left
                expected = 0
                if owner is not None and held[0] == owner:
                    ids = held[1]
                    while expected < min(len(ids), len(plan.ids) - 1) and ids[expected] == plan.ids[expected]:
                        expected += 1
                assert cached == expected, where
        if how == "precancel":
            continue
        held = UNKNOWN if how[0] == "fail" or fed is None else (owner, list(plan.ids) + fed)
        if request.sampling.temperature == 0 and not request.sampling.penalizes and how == "full" and torch_checked < 3:
            assert want[0] == torch_reference.greedy(
                tiny_checkpoint, list(plan.ids), plan.max_new_tokens, plan.stop_ids)[:len(want[0])], index
            torch_checked += 1
    assert torch_checked == 3
