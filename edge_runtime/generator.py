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


def prefill(decoder, cache: KVCache, prompt_ids: np.ndarray,
            interrupted: Callable[[], bool] | None = None) -> np.ndarray | None:
    """Prompt [S] -> logits of the last position [V]; None where `interrupted` said so between
    two of the prompt's chunks (the decoder's `prefill`)."""
    logits = decoder.prefill(cache, prompt_ids, interrupted=interrupted)
    return None if logits is None else logits[-1]


def decode_one_token(decoder, cache: KVCache, token: int) -> np.ndarray:
    """One token in -> next-token logits [V]."""
    return decoder.decode(cache, token)


def generate(decoder, cache: KVCache, prompt_ids: np.ndarray, *, max_new_tokens: int,
             sample: Callable[[np.ndarray], int], stop_ids: frozenset[int],
             drafts: PromptLookup | None = None,
             judge: Callable[[np.ndarray, int], tuple[bool, int]] | None = None,
             interrupted: Callable[[], bool] | None = None) -> Iterator[TokenEvent]:
    """Yield generated tokens until a stop token or `max_new_tokens`. The next token
    is computed only when the caller asks for it, so a caller that stops iterating
    (cancel, deadline, stop string) ends generation between two tokens.

    With `drafts` (and a decoder that can `verify`): after each token, the ids that followed
    the context's last few ids earlier on are fed with it in one run, and `judge` (the
    sampler's: whether to keep a draft after the logits before it, and the token either way)
    keeps a prefix of them, yielded without a step of their own (prompt_lookup.py). Greedy,
    the tokens are greedy decoding's, up to rounding (a run's kernels for several rows sum in
    another order than a one-token step's, which can tip a near-tie); sampled, they have
    `sample`'s distribution, from other draws. A run is judged, counted and its rejected rows
    dropped before the first of its drafts is yielded, so a caller that stops inside a run
    leaves the lookup's counts and the cache as after the whole run.

    `interrupted` (cancel, deadline) is asked between the prompt's chunks: when it says so,
    nothing is yielded and the cache holds the chunks that ran."""
    if max_new_tokens < 1:
        return
    if drafts is not None and judge is None:
        raise ValueError("drafts need a judge (Sampler.judge)")
    start = time.perf_counter()
    logits = prefill(decoder, cache, prompt_ids, interrupted)
    if logits is None:
        return
    token = sample(logits)
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
        kept, ended = 0, False
        for guessed, row in zip(guess, rows):
            keep, token = judge(row, guessed)
            if not keep:
                break  # `token` is the model's own pick in its place
            kept += 1
            if guessed in stop_ids or made + kept >= max_new_tokens:
                ended = True
                break
        else:
            token = sample(rows[kept])  # every draft kept: the next token from the last row
        for guessed in guess[:kept]:
            drafts.push(guessed)
        drafts.confirmed(len(guess), kept, ended=ended)
        # the rows of drafts not kept; after the last token, as after a plain step, the cache
        # ends with the token fed before it
        cache.rewind(len(guess) - kept + int(ended))
        elapsed = time.perf_counter() - start
        for guessed in guess[:kept]:
            made += 1
            yield TokenEvent(guessed, guessed in stop_ids, elapsed, drafted=True)
        if ended:
            return
