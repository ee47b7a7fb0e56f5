"""Sampler: greedy, seeded reproducibility, top-k / top-p support, parameter validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_runtime.errors import BadRequest
from edge_runtime.sampling import Sampler, greedy, softmax, top_k_candidates, top_p_filter, validate_sampling
from edge_runtime.types import SamplingParams

VOCAB = 2048  # small: the sampler is vocabulary-size agnostic, and the tests draw thousands of times


def logits(seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(VOCAB) * scale).astype(np.float32)


def draws(params: SamplingParams, x: np.ndarray, n: int = 200) -> list[int]:
    s = Sampler(params)
    return [s.sample(x) for _ in range(n)]


def test_greedy_is_argmax() -> None:
    x = logits()
    assert greedy(x) == int(np.argmax(x))
    assert greedy(np.array([1.0, 3.0, 3.0, -np.inf], dtype=np.float32)) == 1  # lowest id on ties


def test_temperature_zero_is_greedy() -> None:
    x = logits(1)
    assert set(draws(SamplingParams(temperature=0.0, top_p=0.9, seed=None), x, 50)) == {int(np.argmax(x))}


@pytest.mark.parametrize("temperature", [1e-320, 1e-30, 1e-8])
def test_a_temperature_near_zero_samples_the_argmax(temperature: float) -> None:
    """Any temperature the protocol accepts (finite, > 0): near 0 the distribution is the
    argmax's, not an error (logits divided by 1e-320 overflow)."""
    x = logits(scale=30.0)
    s = Sampler(SamplingParams(temperature=temperature, top_p=1.0, seed=3))
    assert set(draws(SamplingParams(temperature=temperature, seed=3), x, n=20)) == {greedy(x)}
    assert s.judge(x, greedy(x)) == (True, greedy(x))
    assert s.judge(x, greedy(x) + 1) == (False, greedy(x))


def test_same_seed_same_tokens() -> None:
    x = logits(2, scale=1.0)
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=0, seed=42)
    a, b = draws(p, x), draws(p, x)
    assert a == b
    assert len(set(a)) > 20  # it really samples
    assert draws(SamplingParams(temperature=1.0, top_p=0.95, seed=43), x) != a


def test_seed_none_uses_fresh_entropy() -> None:
    s1, s2 = Sampler(SamplingParams(seed=None)), Sampler(SamplingParams(seed=None))
    assert s1.entropy != s2.entropy
    # the recorded entropy reproduces the run
    x = logits(3, scale=1.0)
    again = Sampler(SamplingParams(seed=s1.entropy))
    assert [s1.sample(x) for _ in range(50)] == [again.sample(x) for _ in range(50)]


def test_top_k_one_is_argmax() -> None:
    x = logits(4, scale=0.1)  # flat: without the restriction many ids would come up
    assert set(draws(SamplingParams(temperature=5.0, top_p=1.0, top_k=1, seed=0), x)) == {int(np.argmax(x))}


def test_tiny_top_p_is_argmax() -> None:
    x = logits(5, scale=0.1)
    assert set(draws(SamplingParams(temperature=5.0, top_p=1e-9, seed=0), x)) == {int(np.argmax(x))}
    assert set(draws(SamplingParams(temperature=5.0, top_p=1e-9, top_k=50, seed=0), x)) == {int(np.argmax(x))}


def test_top_k_restricts_support() -> None:
    x = logits(6, scale=0.1)
    allowed = set(np.argsort(-x)[:5].tolist())
    got = draws(SamplingParams(temperature=1.0, top_p=1.0, top_k=5, seed=0), x, 500)
    assert set(got) == allowed


def test_top_p_restricts_support_to_nucleus() -> None:
    x = np.full(VOCAB, -np.inf, dtype=np.float32)
    x[[10, 20, 30, 40]] = np.log([0.5, 0.3, 0.15, 0.05])
    # Meta's rule: keep while cumsum - p_i <= p -> 0.5, 0.8 (0.5 <= 0.6), not 0.95 (0.8 > 0.6)
    got = draws(SamplingParams(temperature=1.0, top_p=0.6, seed=0), x, 1000)
    assert set(got) == {10, 20}
    assert 0.55 < got.count(10) / len(got) < 0.70  # renormalised: 0.5 / 0.8 = 0.625
    got = draws(SamplingParams(temperature=1.0, top_p=0.85, seed=0), x, 1000)
    assert set(got) == {10, 20, 30}


def test_masked_logits_never_sampled() -> None:
    x = np.full(VOCAB, -np.inf, dtype=np.float32)
    x[[7, 9]] = 0.0
    assert set(draws(SamplingParams(temperature=1.0, top_p=1.0, seed=1), x)) == {7, 9}


def test_small_functions() -> None:
    x = np.array([0.0, 5.0, 1.0, 4.0, -1.0], dtype=np.float32)
    assert top_k_candidates(x, 2).tolist() == [1, 3]
    assert top_k_candidates(x, 0).tolist() == [0, 1, 2, 3, 4]
    probs = softmax(x)
    assert math.isclose(float(probs.sum()), 1.0) and probs.dtype == np.float64
    order, kept = top_p_filter(probs, 0.5)
    assert order.tolist() == [1] and kept.shape == (1,)


def test_defaults_are_valid() -> None:
    assert validate_sampling(SamplingParams()) == SamplingParams()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(temperature=-0.1), "temperature"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(temperature=float("inf")), "temperature"),
        (SamplingParams(temperature="hot"), "temperature"),  # type: ignore[arg-type]
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_p=float("nan")), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(top_k=2.5), "top_k"),  # type: ignore[arg-type]
        (SamplingParams(top_k=True), "top_k"),
        (SamplingParams(seed=-3), "seed"),
        (SamplingParams(seed=1.5), "seed"),  # type: ignore[arg-type]
    ],
)
def test_validation_names_the_field(params: SamplingParams, field: str) -> None:
    with pytest.raises(BadRequest, match=field):
        validate_sampling(params)
    with pytest.raises(BadRequest, match=field):
        Sampler(params)


def _reference_top_p(probs: np.ndarray, p: float) -> np.ndarray:
    """Meta's sample_top_p mask over a full stable sort."""
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    return order[np.cumsum(sorted_probs) - sorted_probs <= p]


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0, 12.0])
@pytest.mark.parametrize("p", [1e-9, 0.3, 0.9, 0.99, 0.9999999])
def test_partial_sort_top_p_equals_full_sort(scale: float, p: float) -> None:
    rng = np.random.default_rng(int(scale * 100) + int(p * 1000))
    for ties in (False, True):
        x = (rng.standard_normal(32016) * scale).astype(np.float32)
        if ties:
            x = np.round(x, 1)  # many equal probabilities: ties go to the lower id
        probs = softmax(x)
        order, kept = top_p_filter(probs, p)
        assert order.tolist() == _reference_top_p(probs, p).tolist()
        assert np.array_equal(kept, probs[order])


# ------------------------------------------------------------------------------ min-p
def test_min_p_keeps_transformers_min_p_support_with_its_odds() -> None:
    """After temperature and top-k, min_p drops what transformers' MinPLogitsWarper drops, and
    the draws follow the probabilities its warpers leave (the independent reference)."""
    torch = pytest.importorskip("torch")
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper

    x = logits(11, scale=1.5)
    scores = torch.tensor(x[None].astype(np.float64))
    for warper in (TemperatureLogitsWarper(0.8), TopKLogitsWarper(40), MinPLogitsWarper(0.2)):
        scores = warper(None, scores)
    reference = torch.softmax(scores[0], -1).numpy()
    support = set(np.flatnonzero(reference > 0).tolist())
    assert 3 <= len(support) < 40  # min_p cut some of the 40 (the test would not tell otherwise)
    got = draws(SamplingParams(temperature=0.8, top_p=1.0, top_k=40, min_p=0.2, seed=3), x, 4000)
    assert set(got) == support
    freq = np.bincount(got, minlength=VOCAB) / len(got)
    assert np.abs(freq - reference).max() < 0.03


def test_min_p_comes_after_top_p_and_judges_drafts_by_the_same_distribution() -> None:
    x = np.full(VOCAB, -np.inf, dtype=np.float32)
    x[[10, 20, 30, 40]] = np.log([0.5, 0.3, 0.15, 0.05])
    # top_p 0.85: {10, 20, 30}; then min_p 0.4: at least 0.4 * 0.5 = 0.2 of the mass -> {10, 20}
    params = SamplingParams(temperature=1.0, top_p=0.85, min_p=0.4, seed=0)
    got = draws(params, x, 1000)
    assert set(got) == {10, 20} and 0.55 < got.count(10) / len(got) < 0.70  # 0.5 / 0.8
    assert set(draws(SamplingParams(temperature=1.0, top_p=1.0, min_p=0.1, seed=0), x, 1000)) == {10, 20, 30}
    sampler = Sampler(params)
    for _ in range(200):  # a draft min_p drops is never kept, and the token drawn instead is in the support
        kept, token = sampler.judge(x, 30)
        assert not kept and token in (10, 20)
    assert Sampler(SamplingParams(min_p=0.0)).params.min_p == 0.0  # the default: off


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, math.inf, "0.1", True])
def test_min_p_out_of_range_is_a_bad_request_naming_it(value: object) -> None:
    with pytest.raises(BadRequest, match="min_p"):
        validate_sampling(SamplingParams(min_p=value))  # type: ignore[arg-type]


# ------------------------------------------------------------------ repetition penalties
def test_the_repeat_penalty_is_transformers_repetition_penalty_over_the_window() -> None:
    """Over the last repeat_last_n tokens of prompt and output: transformers' processor applied to
    the window's ids, and a token that has left the window is no longer penalized."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    x = logits(3)
    context = [5, 9, 9, 17, 5, 301, 44]
    sampler = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.7, repeat_last_n=4), context)
    window = context[-4:]
    reference = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([window]), torch.tensor(x[None]))[0].numpy()
    token = sampler.sample(x)
    assert token == int(np.argmax(reference))
    # the window moves on: the token just sampled joins it and context[-4] (17) leaves
    window = [*window[1:], token]
    y = logits(4)
    reference = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([window]), torch.tensor(y[None]))[0].numpy()
    token = sampler.sample(y)
    assert token == int(np.argmax(reference))
    window = [*window[1:], token]
    boosted = y.copy()
    boosted[17] = 1.2 * y.max()  # wins unpenalized; divided by 1.7 it would lose
    assert 17 not in window and sampler.sample(boosted) == 17


def test_presence_and_frequency_penalties_count_each_token_in_the_window() -> None:
    """OpenAI's rule over the window: minus presence once, minus frequency times the count."""
    x = np.zeros(8, dtype=np.float32)
    x[[1, 2, 3]] = [2.0, 1.9, 1.0]
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3, repeat_last_n=-1)
    # 1 twice: 2.0 - 0.5 - 0.6 = 0.9; 2 once: 1.9 - 0.5 - 0.3 = 1.1; 3 unseen: 1.0
    assert Sampler(params, [1, 1, 2]).sample(x) == 2
    assert Sampler(params, [1, 1, 2, 2]).sample(x) == 3


def test_a_draft_judged_with_penalties_is_the_token_sample_gives_and_joins_the_window() -> None:
    """judge sees the penalized logits and takes its token into the window, as sample does."""
    x = np.zeros(8, dtype=np.float32)
    x[[1, 2]] = [2.0, 1.5]
    params = SamplingParams(temperature=0.0, repeat_penalty=2.0, repeat_last_n=-1)
    sampler = Sampler(params, [0])
    assert sampler.judge(x, 1) == (True, 1)  # 1 unseen: the argmax
    assert sampler.judge(x, 1) == (False, 2)  # 1 now seen: 2.0 / 2 = 1.0 < 1.5
    assert Sampler(params, [0]).sample(x) == 1


@pytest.mark.parametrize("field, value", [
    ("repeat_penalty", 0.0), ("repeat_penalty", -1.0), ("repeat_penalty", math.inf),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("frequency_penalty", math.nan),
    ("repeat_last_n", -2), ("repeat_last_n", 1.5), ("repeat_penalty", True),
])
def test_penalties_out_of_range_are_bad_requests_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(BadRequest, match=field):
        validate_sampling(SamplingParams(**{field: value}))
