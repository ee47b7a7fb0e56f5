"""The token loop, in the spirit of gpt-fast's generate.py: prefill the prompt,
then decode one token at a time, sampling from the last position's logits (or verify
a token and its drafts from the context in one run: prompt_lookup.py).

The loop owns no policy: stop tokens, limits, cancellation and deadlines are
decided by the small callables it is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .kv_cache import KVCache
from .prompt_lookup import PromptLookup


@dataclass
class TokenEvent:
    token: int
    is_stop_token: bool  # the model's end token (eos / EOT / <step>): not part of the output
    elapsed_s: float  # since generation started
    drafted: bool = False  # a draft from the context the model confirmed (prompt_lookup.py)


def prefill(decoder, cache: KVCache, prompt_ids: np.ndarray) -> np.ndarray:
    """Prompt [S] -> logits of the last position [V]."""
    return decoder.prefill(cache, prompt_ids)[-1]


def decode_one_token(decoder, cache: KVCache, token: int) -> np.ndarray:
    """One token in -> next-token logits [V]."""
    return decoder.decode(cache, token)


def generate(decoder, cache: KVCache, prompt_ids: np.ndarray, *, max_new_tokens: int,
             sample: Callable[[np.ndarray], int], stop_ids: frozenset[int],
             drafts: PromptLookup | None = None,
             judge: Callable[[np.ndarray, int], tuple[bool, int]] | None = None) -> Iterator[TokenEvent]:
    """Yield generated tokens until a stop token or `max_new_tokens`. The next token
    is computed only when the caller asks for it, so a caller that stops iterating
    (cancel, deadline, stop string) ends generation between two tokens.

    With `drafts` (and a decoder that can `verify`): after each token, the ids that followed
    the context's last few ids earlier on are fed with it in one run, and `judge` (the
    sampler's: whether to keep a draft after the logits before it, and the token either way)
    keeps a prefix of them, yielded without a step of their own (prompt_lookup.py). Greedy,
    the tokens are greedy decoding's, up to rounding (a run's kernels for several rows sum in
    another order than a one-token step's, which can tip a near-tie); sampled, they have
    `sample`'s distribution, from other draws. A run's kept drafts are computed before the
    first of them is yielded."""
    if max_new_tokens < 1:
        return
    if drafts is not None and judge is None:
        raise ValueError("drafts need a judge (Sampler.judge)")
    start = time.perf_counter()
    token = sample(prefill(decoder, cache, prompt_ids))
    made = 0
    while True:
        made += 1
        yield TokenEvent(token, token in stop_ids, time.perf_counter() - start)
        if token in stop_ids or made >= max_new_tokens:
            return
        guess: list[int] = []
        if drafts is not None:
            drafts.push(token)
            guess = drafts.propose(max_new_tokens - made)
        if not guess:
            token = sample(decode_one_token(decoder, cache, token))
            continue
        rows = decoder.verify(cache, np.asarray([token, *guess]))  # row i: the logits after [token, *guess][i]
        kept = 0
        for guessed, row in zip(guess, rows):
            keep, token = judge(row, guessed)
            if not keep:
                break  # `token` is the model's own pick in its place
            kept += 1
            made += 1
            drafts.push(guessed)
            yield TokenEvent(guessed, guessed in stop_ids, time.perf_counter() - start, drafted=True)
            if guessed in stop_ids or made >= max_new_tokens:
                drafts.confirmed(len(guess), kept, ended=True)
                # as after a plain step: the cache ends with the last token fed, before this one
                cache.rewind(len(guess) - kept + 1)
                return
        else:
            token = sample(rows[kept])  # every draft kept: the next token from the last row
        drafts.confirmed(len(guess), kept)
        cache.rewind(len(guess) - kept)  # the rows of drafts not kept
