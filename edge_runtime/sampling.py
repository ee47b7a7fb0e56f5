"""Next-token sampling on the last position's logits (numpy only).

Follows Meta's reference: temperature 0 is greedy; otherwise softmax of
logits / temperature, then nucleus (top-p) filtering as `sample_top_p` does
(sort descending, cumulative sum, drop tokens where cumsum - p_i > p),
renormalise, draw. Top-k, when set, is applied before top-p; min-p, when set, after it
(transformers' order: a token under min_p times the most likely one's probability is dropped).

Before all of them, the repetition penalties where a request asks for them, as llama.cpp's
and Ollama's samplers apply them (`repeat_penalty`, `presence_penalty`, `frequency_penalty`
over the last `repeat_last_n` tokens of prompt and output; `RepeatWindow`).
"""

from __future__ import annotations

import secrets
from collections import Counter, deque
from collections.abc import Sequence

import numpy as np

from .errors import BadRequest
from .types import MAX_PENALTY, MAX_SEED, SamplingParams, is_int, is_number


def validate_sampling(params: SamplingParams) -> SamplingParams:
    """Check the ranges; BadRequest naming the field. Returns `params` unchanged."""
    if not isinstance(params, SamplingParams):  # a dict of the wire's fields, from Python code
        raise BadRequest(f"sampling must be a SamplingParams, got {type(params).__name__}")
    t, p, k, seed = params.temperature, params.top_p, params.top_k, params.seed
    if not is_number(t) or t < 0:
        raise BadRequest(f"temperature must be a finite number >= 0 (0 means greedy), got {_shown(t)}")
    if not is_number(p) or not 0 < p <= 1:
        raise BadRequest(f"top_p must be a number in (0, 1], got {_shown(p)}")
    if not is_int(k) or k < 0:
        raise BadRequest(f"top_k must be an integer >= 0 (0 disables), got {_shown(k)}")
    if not is_number(params.min_p) or not 0 <= params.min_p <= 1:
        raise BadRequest(f"min_p must be a number in [0, 1] (0 disables), got {_shown(params.min_p)}")
    if seed is not None and (not is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise BadRequest(f"seed must be an integer between 0 and {MAX_SEED}, or null, got {_shown(seed)}")
    r = params.repeat_penalty
    if not is_number(r) or r <= 0:
        raise BadRequest(f"repeat_penalty must be a finite number > 0 (1 disables), got {_shown(r)}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if not is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
            raise BadRequest(f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0 disables), got {_shown(value)}")
    n = params.repeat_last_n
    if not is_int(n) or n < -1:
        raise BadRequest(f"repeat_last_n must be an integer >= -1 (0: no penalty, -1: the whole context), got {_shown(n)}")
    return params


def _shown(value: object, limit: int = 40) -> str:
    """A bad value as an error message quotes it: its repr, cut to `limit` characters (a
    request's field may hold a long string)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------ small functions
def greedy(logits: np.ndarray) -> int:
    """Argmax (the lowest id among ties). logits: [vocab]."""
    return int(np.argmax(logits))


def top_k_candidates(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits, ascending by id (argpartition, no full sort). [vocab] -> [k]."""
    if k <= 0 or k >= logits.shape[0]:
        return np.arange(logits.shape[0])
    return np.sort(np.argpartition(logits, -k)[-k:])


def softmax(scores: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """float64 probabilities; -inf scores get probability 0. [n] -> [n]. `in_place`: `scores`
    (float64) is worked on and returned, no other array made."""
    out = scores if in_place else scores.astype(np.float64)
    top = out.max()
    if not np.isfinite(top):
        raise ValueError("logits have no finite maximum")
    np.subtract(out, top, out=out)
    np.exp(out, out=out)
    np.divide(out, out.sum(), out=out)
    return out


NUCLEUS_FLOOR = 2.0 ** -16  # top_p_filter's first look: tokens at least this share of the most likely one's probability
NUCLEUS_SORT_MAX = 4096  # ... when they are at most this many


def top_p_filter(probs: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Meta's nucleus rule: `(order, kept probs)`, the smallest descending prefix whose mass reaches p.

    Keeps token i (in descending order) while cumsum_i - p_i <= p, so the most
    likely token is always kept; ties go to the lower index. `order` indexes into
    `probs`. Sorts only the top m candidates (m = 64, 512, 4096, all) until their mass
    exceeds p, since everything after them is then dropped. [n] -> [m'], [m'].
    """
    n = probs.shape[0]
    # Most often the nucleus lies among the tokens within a factor NUCLEUS_FLOOR of the most
    # likely one: they rank above all the others, so when their mass exceeds p the nucleus is a
    # prefix of them, found without partitioning the vocabulary
    likely = np.flatnonzero(probs >= probs.max() * NUCLEUS_FLOOR)
    found = _nucleus_among(probs, likely, p, n) if len(likely) <= NUCLEUS_SORT_MAX else None
    m = min(n, 64)
    while found is None:
        found = _nucleus_among(probs, _at_least_top(probs, m), p, n)
        m = min(n, 8 * m)
    return found


def _nucleus_among(probs: np.ndarray, ids: np.ndarray, p: float, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The nucleus when it lies among `ids` (ascending ids that rank above every other token):
    they are all n tokens, or their mass exceeds p (the next token's cumsum - p_i exceeds p, so
    the rest is dropped); else None."""
    order = ids[np.argsort(-probs[ids], kind="stable")]
    sorted_probs = probs[order]
    cumsum = np.cumsum(sorted_probs)
    if len(ids) < n and cumsum[-1] <= p:
        return None
    keep = cumsum - sorted_probs <= p
    return order[keep], sorted_probs[keep]


def _at_least_top(probs: np.ndarray, m: int) -> np.ndarray:
    """Ascending ids of the m largest values, plus any ties of the m-th (so tie-breaking is by id)."""
    n = probs.shape[0]
    if m >= n:
        return np.arange(n)
    threshold = probs[np.argpartition(probs, n - m)[n - m]]
    return np.flatnonzero(probs >= threshold)


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn from unnormalised non-negative weights. [n] -> int."""
    cdf = np.cumsum(probs, dtype=np.float64)
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), len(cdf) - 1))


# ------------------------------------------------------------------------ penalties
class RepeatWindow:
    """The last `last_n` tokens of a request's context (all of them for -1) and how often each
    occurs, updated a token at a time; `penalize` applies llama.cpp's penalties to logits."""

    def __init__(self, last_n: int, context: Sequence[int] = ()) -> None:
        self._window: deque[int] = deque(maxlen=None if last_n < 0 else last_n)
        self._counts: Counter[int] = Counter()
        self._out: np.ndarray | None = None  # the penalized row, reused token after token
        for token in context:
            self.push(token)

    def push(self, token: int) -> None:
        if self._window.maxlen is not None and len(self._window) == self._window.maxlen:
            old = self._window[0]
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]
        self._window.append(token)
        self._counts[token] += 1

    def penalize(self, logits: np.ndarray, params: SamplingParams) -> np.ndarray:
        """`logits` [V] in which each token of the window has its logit divided by
        repeat_penalty (multiplied when not positive), less frequency_penalty times its count
        and presence_penalty: llama.cpp's `penalties` sampler, the repetition part being
        transformers' RepetitionPenaltyLogitsProcessor over the window. Written into a row
        this window keeps (valid until the next call), never into `logits` (the decoder's
        bound output)."""
        out = self._out
        if out is None or out.shape != logits.shape or out.dtype != logits.dtype:
            out = self._out = np.empty_like(logits)
        np.copyto(out, logits)
        ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
        counts = np.fromiter(self._counts.values(), dtype=np.float64, count=len(self._counts))
        x = out[ids].astype(np.float64)
        r = params.repeat_penalty
        x = np.where(x <= 0, x * r, x / r) - counts * params.frequency_penalty - params.presence_penalty
        out[ids] = x
        return out


# ------------------------------------------------------------------------- sampler
class Sampler:
    """One request's sampler: validated params and a seeded `numpy.random.Generator`.

    `context` is the prompt's ids: with a penalty, `sample` and `judge` see the logits after
    the tokens before them, so each token they return joins the window (they must be called
    for the output's tokens in order, as generator.generate does)."""

    def __init__(self, params: SamplingParams, context: Sequence[int] = ()) -> None:
        self.params = validate_sampling(params)
        self._window = RepeatWindow(params.repeat_last_n, context) if params.penalizes else None
        # seed None: fresh OS entropy, drawn as a seed a request may name (so it replays the run)
        seed = params.seed if params.seed is not None else secrets.randbits(MAX_SEED.bit_length())
        seq = np.random.SeedSequence(seed)
        self.entropy: int = seed  # the seed to reproduce the run
        self._rng = np.random.Generator(np.random.PCG64(seq))

    @property
    def is_greedy(self) -> bool:
        """Whether `sample` is the argmax (temperature 0, or top-k 1): a function of the logits alone."""
        return self.params.temperature == 0 or self.params.top_k == 1

    def _distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The candidate ids and their (unnormalised) probabilities `sample` draws from."""
        p = self.params
        n = logits.shape[0]
        if 0 < p.top_k < n:
            candidates = top_k_candidates(logits, p.top_k)
            scores = logits[candidates].astype(np.float64)
        else:  # the whole vocabulary: no gather, one float64 copy worked on in place
            candidates = None
            scores = logits.astype(np.float64)
        with np.errstate(over="ignore"):  # a tiny temperature: every score but the best ones -inf
            np.subtract(scores, scores.max(), out=scores)
            np.divide(scores, p.temperature, out=scores)
        probs = softmax(scores, in_place=True)
        if p.top_p < 1:
            order, probs = top_p_filter(probs, p.top_p)
            ids = order if candidates is None else candidates[order]
        else:
            ids = np.arange(n) if candidates is None else candidates
        if p.min_p > 0:  # a share of the most likely one's probability: the same before or after renormalising
            keep = probs >= p.min_p * probs.max()
            ids, probs = ids[keep], probs[keep]
        return ids, probs

    def sample(self, logits: np.ndarray) -> int:
        """Next token id from the last position's logits. logits: [vocab] float."""
        logits = self._penalized(logits)
        if self.is_greedy:
            return self._taken(greedy(logits))
        candidates, probs = self._distribution(logits)
        return self._taken(int(candidates[draw(probs, self._rng)]))

    def _penalized(self, logits: np.ndarray) -> np.ndarray:
        return logits if self._window is None else self._window.penalize(logits, self.params)

    def _taken(self, token: int) -> int:
        """`token` as the next of the output: the penalties' window takes it."""
        if self._window is not None:
            self._window.push(token)
        return token

    def judge(self, logits: np.ndarray, draft: int) -> tuple[bool, int]:
        """Whether to keep a drafted id as the token after these logits, and the token either way.

        Greedy: kept when it is the argmax. Sampled: kept with its probability p(draft) under
        `sample`'s distribution; otherwise the token is drawn from that distribution without the
        draft. The token is then distributed exactly as `sample`'s is (speculative sampling with
        a draft that is one id for sure: accept with min(1, p/q) = p(draft), else draw from the
        normalised max(0, p - q)), so drafting changes which draws are made, not the odds."""
        logits = self._penalized(logits)
        if self.is_greedy:
            token = self._taken(greedy(logits))
            return token == draft, token
        candidates, probs = self._distribution(logits)
        at = np.flatnonzero(candidates == draft)
        total = float(probs.sum())
        if at.size and self._rng.random() * total < float(probs[at[0]]):
            return True, self._taken(draft)
        if at.size:
            probs = probs.copy()
            probs[at[0]] = 0.0
        return False, self._taken(int(candidates[draw(probs, self._rng)]))
