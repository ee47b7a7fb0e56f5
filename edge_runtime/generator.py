"""The token loop, in the spirit of gpt-fast's generate.py: prefill the prompt,
then decode one token at a time, sampling from the last position's logits.

The loop owns no policy: stop tokens, limits, cancellation and deadlines are
decided by the small callables it is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .kv_cache import KVCache


@dataclass
class TokenEvent:
    token: int
    is_stop_token: bool  # the model's end token (eos / EOT / <step>): not part of the output
    elapsed_s: float  # since generation started


def prefill(decoder, cache: KVCache, prompt_ids: np.ndarray) -> np.ndarray:
    """Prompt [S] -> logits of the last position [V]."""
    return decoder.prefill(cache, prompt_ids)[-1]


def decode_one_token(decoder, cache: KVCache, token: int) -> np.ndarray:
    """One token in -> next-token logits [V]."""
    return decoder.decode(cache, token)


def generate(decoder, cache: KVCache, prompt_ids: np.ndarray, *, max_new_tokens: int,
             sample: Callable[[np.ndarray], int], stop_ids: frozenset[int]) -> Iterator[TokenEvent]:
    """Yield generated tokens until a stop token or `max_new_tokens`. The next token
    is computed only when the caller asks for it, so a caller that stops iterating
    (cancel, deadline, stop string) ends generation between two tokens."""
    start = time.perf_counter()
    logits = prefill(decoder, cache, prompt_ids)
    for i in range(max_new_tokens):
        token = sample(logits)
        is_stop = token in stop_ids
        yield TokenEvent(token, is_stop, time.perf_counter() - start)
        if is_stop or i == max_new_tokens - 1:
            return
        logits = decode_one_token(decoder, cache, token)
