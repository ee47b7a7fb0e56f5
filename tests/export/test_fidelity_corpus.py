"""The corpus half of the fidelity measurement: KL divergence of next-token
distributions, and the corpus read in BOS-led windows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_export import fidelity
from edge_runtime.tokenizer import CodeLlamaTokenizer


def test_kl_divergence_matches_the_definition():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    # logits are log-probabilities up to a constant per row: the constant must not matter
    ref, got = np.log(p)[None] + 3.0, np.log(q)[None] - 7.0
    assert fidelity.kl_divergence(ref, got)[0] == pytest.approx(expected, rel=1e-9)
    assert fidelity.kl_divergence(got, ref)[0] != pytest.approx(expected, rel=1e-3)  # not symmetric


def test_kl_divergence_is_zero_for_equal_logits_and_positive_otherwise():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 32016)).astype(np.float32) * 4
    assert np.all(fidelity.kl_divergence(logits, logits) < 1e-12)
    noisy = logits + rng.normal(size=logits.shape).astype(np.float32) * 0.1
    kl = fidelity.kl_divergence(logits, noisy)
    assert kl.shape == (5,) and np.all(kl > 1e-4)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return CodeLlamaTokenizer.from_file(tiny_checkpoint / "tokenizer.json")


def test_corpus_windows_cover_the_first_tokens_each_after_bos(tokenizer):
    ids = tokenizer.encode(fidelity.CORPUS.read_text(encoding="utf-8"))
    assert len(ids) > 1500  # enough positions to tell close recipes apart
    windows = fidelity.corpus_windows(tokenizer, 600, window=256)
    assert [len(w) for w in windows] == [256, 256, 91]
    assert all(w[0] == tokenizer.bos_id for w in windows)
    assert [t for w in windows for t in w[1:]] == ids[:600]


def test_corpus_windows_refuse_a_window_without_room_for_a_token(tokenizer):
    with pytest.raises(ValueError, match="window"):
        fidelity.corpus_windows(tokenizer, 10, window=1)
