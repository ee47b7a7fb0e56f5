"""Prompt lookup: greedy requests draft tokens from their own context and verify a token and
its drafts in one run (prompt_lookup.py, generator.py, SharedKVDecoder.verify).

The references are independent of the drafting: torch greedy decoding of the same
checkpoint, the engine with prompt lookup off, and the decoder's own one-token steps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import torch_reference
from edge_runtime.engine import Engine
from edge_runtime.prompt_lookup import PromptLookup
from edge_runtime.types import GenerationRequest, SamplingParams

GREEDY = SamplingParams(temperature=0.0)
# a context that repeats itself: the model's answer tends to repeat it too
REPEATING = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n\n\ndef add("


# -- drafting ---------------------------------------------------------------------------------
def test_drafts_follow_the_latest_earlier_occurrence_of_the_longest_matching_tail():
    d = PromptLookup([5, 6, 7, 8, 1, 6, 7, 9, 3, 6, 7], draft_max=8, ngram_min=2)
    d.draft_len = 8
    # tail (9, 3, 6, 7) -> 3-gram (3, 6, 7) occurs nowhere earlier; 2-gram (6, 7): latest at index 5
    assert d.propose(8) == [9, 3, 6, 7]
    assert d.propose(2) == [9, 3]  # the limit (tokens left to make)
    d.push(8)  # tail (6, 7, 8): the 3-gram at index 1, followed by 1, 6, 7, ...
    assert d.propose(3) == [1, 6, 7]


def test_no_draft_without_a_repeat_of_the_last_three_ids():
    assert PromptLookup([1, 2, 3, 4, 2]).propose(8) == []  # only the single id 2 repeats
    assert PromptLookup([1, 2, 3, 4, 2, 3]).propose(8) == []  # (2, 3) repeats: two ids are not enough
    assert PromptLookup([1, 2, 3, 4, 1, 2, 3]).propose(8) == [4, 1]
    assert PromptLookup([7]).propose(4) == []
    assert PromptLookup([1, 2, 1, 2]).propose(0) == []


def test_the_draft_length_grows_after_all_confirmed_and_shrinks_after_a_loss():
    d = PromptLookup([1, 2, 3], draft_max=5)
    assert d.draft_len == 2
    d.confirmed(2, 2)
    assert d.draft_len == 4
    d.confirmed(4, 4)
    assert d.draft_len == 5  # at most draft_max
    d.confirmed(5, 1)
    d.confirmed(4, 0)
    d.confirmed(3, 0)
    d.confirmed(2, 0)
    d.confirmed(1, 0, ended=True)
    assert d.draft_len == 1  # at least one
    assert d.runs[0] == (2, 2, False) and d.runs[-1] == (1, 0, True) and len(d.runs) == 7


def test_drafted_counts_every_id_proposed():
    d = PromptLookup([5, 6, 7, 8, 5, 6, 7], draft_max=4)
    assert d.propose(8) == [8, 5] and d.drafted == 2  # draft length 2 at first
    assert PromptLookup([1, 2, 3]).propose(4) == [] and d.drafted == 2


def test_every_kept_token_extends_the_context_drafts_come_from():
    d = PromptLookup([1, 2, 3])
    for t in [4, 1, 2, 3]:
        d.push(t)
    d.draft_len = 4
    assert d.propose(4) == [4, 1, 2, 3]


# -- one run for a token and its drafts ---------------------------------------------------------
def test_verify_gives_each_positions_logits_as_one_token_steps_do_and_rewinds(tiny_bundle):
    """Row i of `verify` is the logits one-token steps give after the same ids; after `rewind`
    the next step is as if the dropped ids had never been fed."""
    d = Engine.from_bundle(tiny_bundle).decoder
    assert d.verify_rows_max > 1
    prompt, fed = np.asarray([1, 822, 18755, 29898, 29876, 1125, 13]), [1678, 565, 302, 529, 29871]
    cache = d.new_cache(32)
    d.prefill(cache, prompt)
    stepped = [np.array(d.decode(cache, t)) for t in fed]
    cache = d.new_cache(32)
    d.prefill(cache, prompt)
    rows = np.array(d.verify(cache, np.asarray(fed)))
    assert rows.shape == (len(fed), 32016) and cache.length == len(prompt) + len(fed)
    np.testing.assert_allclose(rows, np.stack(stepped), atol=1e-4)
    cache.rewind(3)  # keep prompt + fed[:2]
    np.testing.assert_allclose(d.decode(cache, fed[2]), stepped[2], atol=1e-4)
    with pytest.raises(ValueError, match="verify takes 1 to"):
        d.verify(cache, np.arange(d.verify_rows_max + 1))


def test_a_graph_without_the_logits_start_input_decodes_one_token_a_step(tiny_bundle, tmp_path):
    """Bundles exported before the input: no drafts, the same tokens."""
    import shutil

    import onnx

    from edge_runtime.bundle import MANIFEST_NAME, load_bundle, sha256_file

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    graph = load_bundle(old).graph_path
    model = onnx.load(str(graph), load_external_data=False)
    kept = [i for i in model.graph.input if i.name != "logits_start"]
    del model.graph.input[:]
    model.graph.input.extend(kept)  # the initializer stays: a constant -1, as before the input existed
    onnx.save(model, str(graph))
    import json

    manifest = json.loads((old / MANIFEST_NAME).read_text())
    for entry in manifest["files"]:
        if entry["path"] == graph.name:
            entry["sha256"], entry["size"] = sha256_file(graph), graph.stat().st_size
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    engine = Engine.from_bundle(old)
    assert engine.decoder.verify_rows_max == 0 and not engine.prompt_lookup
    request = GenerationRequest(mode="complete", prompt=REPEATING, max_tokens=24, sampling=GREEDY)
    result = engine.complete(request)
    assert result.usage.draft_tokens == 0
    assert result.token_ids == Engine.from_bundle(tiny_bundle).complete(request).token_ids


# -- the engine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_fp32(demo_checkpoint, tmp_path_factory, exporter):
    return exporter(demo_checkpoint, tmp_path_factory.mktemp("lookup") / "demo-fp32", precision="fp32",
                    skip_fidelity=True)


@pytest.mark.parametrize("max_tokens", [48, 9])
def test_greedy_tokens_with_drafts_are_torchs(demo_fp32, demo_checkpoint, max_tokens):
    """Drafts confirmed or not, the tokens are torch's greedy ones (the trained demo model at fp32),
    and no more than max_tokens of them (a run of confirmed drafts stops at the limit)."""
    engine = Engine.from_bundle(demo_fp32)
    assert engine.prompt_lookup
    result = engine.complete(GenerationRequest(mode="complete", prompt=REPEATING, max_tokens=max_tokens,
                                               sampling=GREEDY))
    assert result.usage.accepted_draft_tokens > 0, result.usage
    stop = frozenset(engine.plan(GenerationRequest(mode="complete", prompt=REPEATING)).stop_ids)
    assert list(result.token_ids) == torch_reference.greedy(demo_checkpoint, list(result.prompt_token_ids),
                                                            max_tokens, stop)
    assert len(result.token_ids) == max_tokens or result.finish_reason == "stop"


def test_the_demo_model_gives_the_same_tokens_with_and_without_drafts(demo_int4_bundle):
    """A trained model on code that repeats itself confirms many drafts; its tokens are those of
    one decode step per token."""
    on, off = Engine.from_bundle(demo_int4_bundle), Engine.from_bundle(demo_int4_bundle, prompt_lookup=False)
    accepted = 0
    for prompt in (REPEATING, "import os\nimport sys\n\n\ndef main():\n", "class Stack:\n    def push(self, x):\n"):
        request = GenerationRequest(mode="complete", prompt=prompt, max_tokens=64, sampling=GREEDY)
        a, b = on.complete(request), off.complete(request)
        assert a.token_ids == b.token_ids and a.text == b.text
        assert b.usage.draft_tokens == 0
        accepted += a.usage.accepted_draft_tokens
    assert accepted > 0


def test_a_sampled_request_drafts_too_and_replays_with_its_seed(demo_int4_bundle):
    """Sampling keeps a draft with its probability (Sampler.judge): the demo model, which loops,
    keeps some; the same seed gives the same tokens again."""
    engine = Engine.from_bundle(demo_int4_bundle)
    request = GenerationRequest(mode="complete", prompt=REPEATING, max_tokens=48, cache_prompt=False,
                                sampling=SamplingParams(temperature=0.6, top_p=0.9, seed=7))
    a, b = engine.complete(request), engine.complete(request)
    assert a.token_ids == b.token_ids and a.usage.completion_tokens == 48
    assert 0 < a.usage.accepted_draft_tokens <= a.usage.draft_tokens


@pytest.mark.parametrize("params, draft", [
    (SamplingParams(temperature=0.8, top_p=0.9, top_k=5), 1),  # a likely draft
    (SamplingParams(temperature=0.8, top_p=0.9, top_k=5), 3),  # a less likely one
    (SamplingParams(temperature=1.2, top_p=1.0, top_k=0), 5),  # the least likely
    (SamplingParams(temperature=0.8, top_p=0.5, top_k=5), 4),  # outside the nucleus: never kept
])
def test_judging_a_draft_gives_the_tokens_sampling_gives(params, draft):
    """Kept with its probability, else drawn without it: the token's distribution is `sample`'s.
    Checked over 30,000 seeded draws each against the distribution `sample` draws from."""
    from edge_runtime.sampling import Sampler

    logits = np.array([2.0, 1.6, 0.3, 1.1, -0.5, -1.5, -3.0], dtype=np.float32)
    n = 30_000
    judged = np.zeros(len(logits))
    sampled = np.zeros(len(logits))
    kept = 0
    for seed in range(n):
        keep, token = Sampler(dataclasses.replace(params, seed=seed)).judge(logits, draft)
        kept += keep
        assert keep == (token == draft) or not keep
        judged[token] += 1
        sampled[Sampler(dataclasses.replace(params, seed=n + seed)).sample(logits)] += 1
    expected = sampled / n
    sigma = np.sqrt(expected * (1 - expected) / n) + 1e-9
    assert np.all(np.abs(judged / n - expected) < 5 * sigma * np.sqrt(2) + 1e-3), (judged / n, expected)
    if expected[draft] == 0:
        assert kept == 0


@pytest.mark.parametrize("at", [0.3, 0.5, 0.8])
def test_a_stop_string_inside_a_run_of_drafts_ends_the_text_as_without_them(demo_int4_bundle, at):
    """The engine stops reading mid-run: the text and tokens are those without drafts, and the
    confirmed drafts counted are among the tokens kept (never the first, which no run made)."""
    on, off = Engine.from_bundle(demo_int4_bundle), Engine.from_bundle(demo_int4_bundle, prompt_lookup=False)
    prompt = "import os\nimport sys\n\n\ndef main():\n"  # the demo model answers it with self.path.path...
    full = off.complete(GenerationRequest(mode="complete", prompt=prompt, max_tokens=64, sampling=GREEDY)).text
    cut = int(len(full) * at)
    stop = full[cut:cut + 4]
    assert stop.strip(), full
    request = GenerationRequest(mode="complete", prompt=prompt, max_tokens=64, sampling=GREEDY, stop=(stop,))
    a, b = on.complete(request), off.complete(request)
    assert a.text == b.text and a.token_ids == b.token_ids and a.finish_reason == b.finish_reason == "stop"
    assert a.usage.accepted_draft_tokens <= a.usage.completion_tokens - 1


def test_the_prompt_cache_keeps_rows_a_run_of_drafts_wrote(demo_int4_bundle):
    """A chat's next turn reuses the rows the previous answer's runs wrote (rejected drafts'
    rows dropped): the same tokens as an engine that drafted nothing."""
    tokens = []
    for lookup in (True, False):
        engine = Engine.from_bundle(demo_int4_bundle, prompt_lookup=lookup)

        def ask(prompt):
            return engine.complete(GenerationRequest(mode="complete", prompt=prompt, max_tokens=40, sampling=GREEDY,
                                                     client_id="editor"))
        first = ask(REPEATING)
        second = ask(REPEATING + first.text + "\n\n\ndef sub(")
        assert second.usage.cached_prompt_tokens >= len(first.prompt_token_ids) - 1
        if lookup:
            assert first.usage.accepted_draft_tokens > 0
        tokens.append((first.token_ids, second.token_ids))
    assert tokens[0] == tokens[1]


def test_no_token_is_asked_for_none(tiny_bundle):
    from edge_runtime import generator

    d = Engine.from_bundle(tiny_bundle).decoder
    events = generator.generate(d, d.new_cache(8), np.asarray([1, 2, 3]), max_new_tokens=0, sample=np.argmax,
                                stop_ids=frozenset(), drafts=PromptLookup([1, 2, 3]))
    assert list(events) == []


class _CycleModel:
    """A decoder whose next token after t is t % 5 + 1 (1 2 3 4 5 1 2 ...), with a cache
    that only counts its rows: what the loop feeds, verifies and rewinds."""

    vocab = 8

    def __init__(self):
        self.length = 0

    def _logits(self, ids):
        rows = np.zeros((len(ids), self.vocab), np.float32)
        rows[np.arange(len(ids)), np.asarray(ids) % 5 + 1] = 1.0
        return rows

    def prefill(self, cache, ids, interrupted=None):
        self.length += len(ids)
        return self._logits(ids)

    def decode(self, cache, token):
        self.length += 1
        return self._logits([token])[0]

    def verify(self, cache, ids):
        self.length += len(ids)
        return self._logits(ids)

    def rewind(self, n):
        self.length -= n


@pytest.mark.parametrize("stop_early", [False, True])
def test_a_run_ending_on_a_drafted_stop_token_is_counted_whole_even_if_the_caller_stops_inside_it(stop_early):
    """The run that drafts the end token: counted as ended (the benchmark prices its tokens as
    one run), and the cache ends with the last token fed, also when the caller stops reading
    inside the run (a stop string does that)."""
    from edge_runtime import generator
    from edge_runtime.sampling import Sampler

    model = _CycleModel()
    prompt = [1, 2, 3, 4, 5, 1, 2, 3]
    drafts = PromptLookup(prompt)
    sampler = Sampler(GREEDY)
    events = generator.generate(model, model, np.asarray(prompt), max_new_tokens=20, sample=sampler.sample,
                                stop_ids=frozenset({1}), drafts=drafts, judge=sampler.judge)
    seen = []
    for event in events:
        seen.append(event)
        if stop_early and event.drafted:
            events.close()
            break
    if not stop_early:
        # 4, then the drafts 5 and 1 kept in one run; 1 is the end token
        assert [(e.token, e.drafted, e.is_stop_token) for e in seen] == [(4, False, False), (5, True, False),
                                                                       (1, True, True)]
    assert drafts.runs == [(2, 2, True)]
    assert model.length == len(prompt) + 2  # prompt, 4, 5 fed; the end token never is


def test_penalties_give_the_same_tokens_with_and_without_drafts(demo_int4_bundle):
    """A penalized request judges each draft after the tokens before it (Sampler.judge takes
    them into the window in order): its tokens are those of one decode step per token."""
    on, off = Engine.from_bundle(demo_int4_bundle), Engine.from_bundle(demo_int4_bundle, prompt_lookup=False)
    sampling = SamplingParams(temperature=0.0, repeat_penalty=1.1, frequency_penalty=0.1, repeat_last_n=64)
    request = GenerationRequest(mode="complete", prompt=REPEATING, max_tokens=64, sampling=sampling)
    a, b = on.complete(request), off.complete(request)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.usage.draft_tokens > 0
    assert a.token_ids != on.complete(dataclasses.replace(request, sampling=GREEDY)).token_ids
