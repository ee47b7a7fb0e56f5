"""Fidelity of an exported (quantized) graph against the original torch model.

On a fixed set of code prompts (completion, and infill where the model has the
tokens), both models decode greedily for N tokens from the same prompt ids:
- greedy_agreement: the share of the N tokens before the first token that
  differs, averaged over prompts (what a user sees: identical output until then);
- teacher_forced_agreement: the share of positions where the graph's top token
  equals torch's when both read torch's greedy sequence (robust to one early flip);
- max_logit_diff: the largest absolute logit difference on the prompt positions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_runtime.bundle import FLAVOUR_OPTIMUM_KV_CONCAT, Architecture
from edge_runtime.engine import DECODERS
from edge_runtime.prompts import build_prompt
from edge_runtime.tokenizer import CodeLlamaTokenizer
from edge_runtime.types import GenerationRequest

COMPLETION_PROMPTS = (
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n        ",
    "def read_lines(path):\n    with open(path) as f:\n",
    "    for i in range(len(items)):\n        if ",
    "# Return the sum of a list of numbers\ndef total(values):\n",
    "try:\n    import json\nexcept ImportError:\n",
    "def __repr__(self):\n        return ",
)
INFILL_PROMPTS = (
    ("def add(a, b):\n    return ", "\n"),
    ("def is_even(n):\n    ", "\n    return result\n"),
    ("import ", "\n\nprint(os.getcwd())\n"),
    ("for key, value in ", ".items():\n    print(key, value)\n"),
)


@dataclass(frozen=True)
class FidelityReport:
    n_tokens: int
    prompts: int
    greedy_agreement: float
    greedy_agreement_min: float
    teacher_forced_agreement: float
    max_logit_diff: float
    mean_logit_diff: float
    per_prompt: tuple[dict, ...]

    def as_manifest(self) -> dict:
        d = asdict(self)
        d["per_prompt"] = list(self.per_prompt)
        return d


def fidelity_prompt_ids(tokenizer: CodeLlamaTokenizer, chat_format: str) -> list[tuple[str, list[int]]]:
    reqs = [("complete", GenerationRequest(mode="complete", prompt=p)) for p in COMPLETION_PROMPTS]
    if tokenizer.supports_infill:
        reqs += [("infill", GenerationRequest(mode="infill", prefix=p, suffix=s)) for p, s in INFILL_PROMPTS]
    return [(mode, list(build_prompt(r, tokenizer, chat_format=chat_format).ids)) for mode, r in reqs]


def torch_greedy(model, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding with the torch model; returns (generated ids, logits of the prompt positions)."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        prompt_logits = out.logits[0].float().numpy()
        past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
        tokens = [nxt]
        for _ in range(n - 1):
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            tokens.append(nxt)
    return tokens, prompt_logits


def graph_prompt_logits(decoder, cache, ids: list[int]) -> np.ndarray:
    """Logits [S, V] of every prompt position (a graph that computes only the last
    position's logits is fed one token at a time)."""
    ids_array = np.asarray(ids, dtype=np.int64)
    if hasattr(decoder, "all_position_logits"):
        return decoder.all_position_logits(cache, ids_array)
    return decoder.prefill(cache, ids_array).copy()


def graph_greedy(decoder, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    cache = decoder.new_cache(len(ids) + n)
    prompt_logits = graph_prompt_logits(decoder, cache, ids)
    nxt = int(prompt_logits[-1].argmax())
    tokens = [nxt]
    for _ in range(n - 1):
        nxt = int(decoder.decode(cache, nxt).argmax())
        tokens.append(nxt)
    return tokens, prompt_logits


def graph_teacher_forced(decoder, ids: list[int], continuation: list[int]) -> list[int]:
    """The graph's top token at each position when it reads `continuation` (torch's greedy output)."""
    cache = decoder.new_cache(len(ids) + len(continuation))
    predicted = [int(decoder.prefill(cache, np.asarray(ids, dtype=np.int64))[-1].argmax())]
    for token in continuation[:-1]:
        predicted.append(int(decoder.decode(cache, token).argmax()))
    return predicted


def prefix_agreement(a: list[int], b: list[int]) -> float:
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / max(len(a), 1)


def measure(checkpoint: Path, graph: Path, arch: Architecture, tokenizer_path: Path, chat_format: str, *,
            n_tokens: int = 32, threads: int = 0, flavour: str = FLAVOUR_OPTIMUM_KV_CONCAT,
            progress=None) -> FidelityReport:
    import onnxruntime as ort
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(checkpoint), torch_dtype=torch.float32).eval()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])
    tokenizer = CodeLlamaTokenizer.from_file(tokenizer_path)
    prompts = fidelity_prompt_ids(tokenizer, chat_format)
    max_len = max(len(ids) for _, ids in prompts) + n_tokens
    decoder = DECODERS[flavour](ort, session, arch, device="cpu", max_length=max_len)

    rows = []
    for i, (mode, ids) in enumerate(prompts):
        ref, ref_logits = torch_greedy(model, ids, n_tokens)
        got, got_logits = graph_greedy(decoder, ids, n_tokens)
        forced = graph_teacher_forced(decoder, ids, ref)
        diff = np.abs(ref_logits - got_logits)
        rows.append({
            "mode": mode,
            "prompt_tokens": len(ids),
            "greedy_agreement": prefix_agreement(ref, got),
            "teacher_forced_agreement": float(np.mean(np.asarray(forced) == np.asarray(ref))),
            "max_logit_diff": float(diff.max()),
            "mean_logit_diff": float(diff.mean()),
        })
        if progress:
            progress(f"prompt {i + 1}/{len(prompts)} ({mode}): agreement {rows[-1]['greedy_agreement']:.2f}")
    agreements = [r["greedy_agreement"] for r in rows]
    return FidelityReport(
        n_tokens=n_tokens,
        prompts=len(rows),
        greedy_agreement=float(np.mean(agreements)),
        greedy_agreement_min=float(np.min(agreements)),
        teacher_forced_agreement=float(np.mean([r["teacher_forced_agreement"] for r in rows])),
        max_logit_diff=float(max(r["max_logit_diff"] for r in rows)),
        mean_logit_diff=float(np.mean([r["mean_logit_diff"] for r in rows])),
        per_prompt=tuple(rows),
    )
