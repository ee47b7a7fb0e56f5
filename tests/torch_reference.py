"""Independent reference: greedy decoding with the torch model of the same
checkpoint (transformers' LlamaForCausalLM), no code of ours involved."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np


@lru_cache(maxsize=4)
def load_model(checkpoint: str):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def prompt_logits(checkpoint: Path, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return load_model(str(checkpoint))(torch.tensor([ids])).logits[0].numpy()


def greedy(checkpoint: Path, ids: list[int], n: int, stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """Greedy continuation without a KV cache (the whole sequence every step)."""
    import torch

    model = load_model(str(checkpoint))
    seq, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if token in stop_ids:
                break
            out.append(token)
            seq.append(token)
    return out


def greedy_penalized(checkpoint: Path, ids: list[int], n: int, *, repetition_penalty: float = 1.0,
                     presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                     stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """Greedy continuation with the penalties over the whole sequence (prompt and output):
    transformers' RepetitionPenaltyLogitsProcessor for the repetition penalty, then the
    presence and frequency penalties spelled out (each seen token: minus presence once and
    frequency times its count)."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    model = load_model(str(checkpoint))
    repeat = RepetitionPenaltyLogitsProcessor(repetition_penalty)
    seq, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            input_ids = torch.tensor([seq])
            scores = repeat(input_ids, model(input_ids).logits[:, -1].clone())[0]
            tokens, counts = torch.unique(input_ids[0], return_counts=True)
            scores[tokens] -= presence_penalty + frequency_penalty * counts.to(scores.dtype)
            token = int(scores.argmax())
            if token in stop_ids:
                break
            out.append(token)
            seq.append(token)
    return out
