"""Draft tokens by looking them up in the context (prompt lookup decoding).

Code that a model writes often repeats the context: a renamed variable, an edited
function, a test that mirrors the code above it, an infill that closes what the prefix
opened. When the last three tokens also occur earlier in the context (prompt and output so
far), the tokens that followed them there are a cheap guess at what comes next. The
generator (generator.py) feeds the guess -- the drafts -- to the model in one run
beside the token just chosen (`decoder.verify`), keeps a prefix of them as the sampler
judges (`Sampler.judge`) and drops the rest. Greedy, a draft is kept when it is the
model's pick, and the output is greedy decoding's (up to rounding: the kernels for several
rows sum in another order than a one-token step's, so a near-tie can tip the other way, as
with the prompt cache); sampled, a draft is kept with its probability and the tokens keep
the sampler's distribution (speculative sampling). Every kept draft saves a decode step.
A run of k+1 tokens reads the weights once, as
one step does, so on bandwidth-bound hardware it costs little more than a step; its
arithmetic grows with k (on two CPU cores a run of 3 costs ~1.6 steps), so the draft
length adapts: it grows after a run whose drafts were all confirmed and shrinks after one
that lost some (the schedule Hugging Face's assisted generation uses), and a context that
offers no match drafts nothing and costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

NGRAM_MAX = 3  # the longest run of last tokens looked up
# the shortest: two ids ("self .", ") :") recur by chance in code: on random weights greedy requests drafted
# 37 ids for 7 kept, three ids 19 for 6 (benchmarks/prompt_lookup.py part 4, --ngram-min 2 and the default)
NGRAM_MIN = 3
DRAFT_START = 2  # drafts of the first run
DRAFT_MAX = 8  # at most this many drafts a run


class PromptLookup:
    """The context's ids (prompt, then every token the generator keeps), and drafts from them.

    For each n-gram size, an index from each n ids to where they last began with at least
    one id after them: a token kept and a draft looked up cost a few dict operations, not a
    search of the context (which took 250 us a token at 4,096 ids of context)."""

    def __init__(self, context: Sequence[int], *, draft_max: int = DRAFT_MAX,
                 ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"n-gram sizes {ngram_min}..{ngram_max}")
        if draft_max < 1:
            raise ValueError(f"draft_max must be at least 1, not {draft_max}")
        self.draft_max = draft_max
        self.draft_len = min(DRAFT_START, draft_max)  # the next run's drafts (adapted by `confirmed`)
        self.ngram_sizes = range(ngram_max, ngram_min - 1, -1)  # the longest first
        self._ids: list[int] = []
        # n -> {the n ids: where they last began, followed by at least one id}
        self._last_start: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.ngram_sizes}
        for token in context:
            self.push(int(token))
        self.drafted = 0  # ids proposed (each one verified), for the result's usage
        # (drafted, confirmed, ended: the run made the request's last token) per run, for the benchmark
        self.runs: list[tuple[int, int, bool]] = []

    @property
    def context(self) -> tuple[int, ...]:
        """The ids drafts come from: the prompt, then every token kept."""
        return tuple(self._ids)

    def push(self, token: int) -> None:
        """A token the generator kept (chosen by the model, or a confirmed draft): the n ids
        before it now have an id after them."""
        ids = self._ids
        for n, last in self._last_start.items():
            if len(ids) >= n:
                last[tuple(ids[-n:])] = len(ids) - n
        ids.append(token)

    def propose(self, limit: int) -> list[int]:
        """Up to min(`limit`, the current draft length) ids that followed the latest earlier
        occurrence of the context's last n ids (the longest n from ngram_max down to
        ngram_min that occurs); [] when none does."""
        k = min(limit, self.draft_len)
        ids = self._ids
        if k < 1:
            return []
        for n in self.ngram_sizes:
            start = self._last_start[n].get(tuple(ids[-n:])) if len(ids) >= n else None
            if start is not None:  # the latest occurrence: the most local repetition
                guess = ids[start + n:start + n + k]
                self.drafted += len(guess)
                return guess
        return []

    def confirmed(self, drafted: int, accepted: int, *, ended: bool = False) -> None:
        """A run's outcome: `accepted` of its `drafted` drafts confirmed (`ended`: the last of
        them was the request's last token). All of them: draft two more next time; some lost:
        one fewer (at least one)."""
        self.runs.append((drafted, accepted, ended))
        if accepted == drafted:
            self.draft_len = min(self.draft_max, self.draft_len + 2)
        else:
            self.draft_len = max(1, self.draft_len - 1)
