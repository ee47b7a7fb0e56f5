"""Fidelity of an exported (quantized) graph against the original torch model.

On a fixed set of code prompts (completion, and infill where the model has the
tokens), both models decode greedily for N tokens from the same prompt ids:
- greedy_agreement: the share of the N tokens before the first token that
  differs, averaged over prompts (what a user sees: identical output until then),
  where a token the graph ranks first and torch ranks within TIE_LOGITS of its own first
  is a tie, not a difference: torch is indifferent between the two (their probabilities
  within 5 %), so either is the model's greedy answer and fp32 rounding alone can flip
  it; the measure goes on along torch's tokens. (greedy_agreement_strict counts every
  flip: on a small model with flat distributions, one near-tie early in a prompt
  decides it, and which prompts hold near-ties changes with the model's training);
- teacher_forced_agreement: the share of positions where the graph's top token
  equals torch's when both read torch's greedy sequence (robust to one early flip);
- max_logit_diff: the largest absolute logit difference on the prompt positions;
- on a held-out code corpus (``assets/fidelity-corpus.txt``: Python, C, JavaScript,
  SQL, shell, Go; not in the demo model's training data), read in windows: the mean and
  99th percentile of the per-position KL divergence KL(torch || graph) of the next-token
  distributions, and the share of positions where both rank the same token first.
  Thousands of positions instead of a dozen prompts: the number that tells close
  recipes apart (as llama.cpp's ``perplexity --kl-divergence`` does).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_runtime.bundle import FLAVOUR_OPTIMUM_KV_CONCAT, Architecture
from edge_runtime.engine import DECODERS
from edge_runtime.native_paths import native_path
from edge_runtime.prompts import build_prompt
from edge_runtime.tokenizer import CodeLlamaTokenizer
from edge_runtime.types import GenerationRequest

from .checkpoint import torch_config

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
CORPUS = Path(__file__).resolve().parent / "assets" / "fidelity-corpus.txt"
CORPUS_WINDOW = 256  # tokens per window (each starts with BOS and a fresh cache)
INFILL_PROMPTS = (
    ("def add(a, b):\n    return ", "\n"),
    ("def is_even(n):\n    ", "\n    return result\n"),
    ("import ", "\n\nprint(os.getcwd())\n"),
    ("for key, value in ", ".items():\n    print(key, value)\n"),
)


class GraphSessionError(RuntimeError):
    """The graph could not be opened for the measure (the engine could not either)."""


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
    corpus_positions: int = 0  # positions scored on the corpus (its tokens and one BOS per window; 0: none)
    kl_divergence_mean: float | None = None
    kl_divergence_p99: float | None = None
    corpus_top1_agreement: float | None = None
    greedy_agreement_strict: float | None = None  # every flip a difference, ties too
    tie_logits: float = 0.0  # the tolerance greedy_agreement used

    def as_manifest(self) -> dict:
        d = asdict(self)
        d["per_prompt"] = list(self.per_prompt)
        return d


def prompt_positions(tokenizer: CodeLlamaTokenizer, chat_format: str, n_tokens: int,
                     infill: bool | None = None) -> int:
    """The positions the prompts' measure needs: the longest prompt and its ``n_tokens``
    greedy tokens (the corpus windows fit any context: they are cut to it)."""
    return max(len(ids) for _, ids in fidelity_prompt_ids(tokenizer, chat_format, infill)) + n_tokens


def fidelity_prompt_ids(tokenizer: CodeLlamaTokenizer, chat_format: str,
                        infill: bool | None = None) -> list[tuple[str, list[int]]]:
    """The prompts' ids: the completions, and the infills where the model infills (``infill``:
    the family's verdict, as the bundle records it -- a Python variant or a 34B has the
    tokens but was not trained for it; None: where the tokenizer has the tokens)."""
    reqs = [("complete", GenerationRequest(mode="complete", prompt=p)) for p in COMPLETION_PROMPTS]
    if tokenizer.supports_infill and infill is not False:
        reqs += [("infill", GenerationRequest(mode="infill", prefix=p, suffix=s)) for p, s in INFILL_PROMPTS]
    return [(mode, list(build_prompt(r, tokenizer, chat_format=chat_format).ids)) for mode, r in reqs]


TIE_LOGITS = 0.05  # torch's first two tokens this close: a tie (probabilities within 5 %)


def torch_greedy(model, ids: list[int], n: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Greedy decoding with the torch model; returns (generated ids, logits of the prompt
    positions, logits each generated token was chosen from [n, V])."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        prompt_logits = out.logits[0].float().numpy()
        steps = [prompt_logits[-1]]
        past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
        tokens = [nxt]
        for _ in range(n - 1):
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            steps.append(out.logits[0, -1].float().numpy())
            tokens.append(nxt)
    return tokens, prompt_logits, np.stack(steps)


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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def kl_divergence(ref_logits: np.ndarray, got_logits: np.ndarray, *, rows: int = 32) -> np.ndarray:
    """Per position KL(softmax(ref) || softmax(got)) in nats, for logits [S, V]; float64,
    ``rows`` positions at a time (a 256 x 32016 window in float64 is 65 MB an array)."""
    out = np.empty(ref_logits.shape[0], dtype=np.float64)
    for r0 in range(0, ref_logits.shape[0], rows):
        ref, got = log_softmax(ref_logits[r0:r0 + rows]), log_softmax(got_logits[r0:r0 + rows])
        out[r0:r0 + rows] = (np.exp(ref) * (ref - got)).sum(axis=-1)
    return np.maximum(out, 0.0)


def text_windows(tokenizer: CodeLlamaTokenizer, text_file: Path | str, window: int,
                 n_tokens: int | None = None) -> list[list[int]]:
    """The first ``n_tokens`` tokens (all when None) of a text file (or of the text itself,
    given as a ``str``), as windows of at most ``window`` positions, each led by BOS: what the
    corpus measure and the calibrations (kv_cache_quant.py, calibration.py) run through a
    model, one fresh cache per window."""
    if window < 2:
        raise ValueError(f"a window must hold BOS and a token, not {window}")
    text = text_file if isinstance(text_file, str) else text_file.read_text(encoding="utf-8")
    ids = tokenizer.encode(text)[:n_tokens]
    return [[tokenizer.bos_id, *ids[i:i + window - 1]] for i in range(0, len(ids), window - 1)]


def corpus_windows(tokenizer: CodeLlamaTokenizer, n_tokens: int, window: int = CORPUS_WINDOW) -> list[list[int]]:
    """The first ``n_tokens`` tokens of the fidelity corpus, as BOS-led windows."""
    return text_windows(tokenizer, CORPUS, window, n_tokens)


def corpus_divergence(model, decoder, windows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per position KL divergence and top-1 agreement (bool) of the graph against torch."""
    import torch

    kls, same = [], []
    for ids in windows:
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float().numpy()
        got = graph_prompt_logits(decoder, decoder.new_cache(len(ids)), ids)
        kls.append(kl_divergence(ref, got))
        same.append(ref.argmax(axis=-1) == got.argmax(axis=-1))
    return np.concatenate(kls), np.concatenate(same)


def agreement_through_ties(ref: list[int], forced: list[int], ref_step_logits: np.ndarray,
                           tie_logits: float = TIE_LOGITS) -> float:
    """The share of `ref` (torch's greedy tokens) before the first position where the graph,
    reading torch's tokens (`forced`: its first choice at each), ranks first a token torch
    scores more than `tie_logits` below its own choice."""
    same = 0
    for i, (want, got) in enumerate(zip(ref, forced)):
        if want != got and ref_step_logits[i, want] - ref_step_logits[i, got] > tie_logits:
            break
        same += 1
    return same / max(len(ref), 1)


def prefix_agreement(a: list[int], b: list[int]) -> float:
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / max(len(a), 1)


def measure(checkpoint: Path, graph: Path, arch: Architecture, tokenizer_path: Path, chat_format: str, *,
            n_tokens: int = 32, corpus_tokens: int = 512, corpus_window: int = CORPUS_WINDOW, threads: int = 0,
            flavour: str = FLAVOUR_OPTIMUM_KV_CONCAT, progress=None,
            providers: list | None = None, device: str = "cpu", infill: bool | None = None,
            session_config: dict[str, str] | None = None) -> FidelityReport:
    """Greedy agreement, logit differences and corpus KL divergence of ``graph`` against torch
    fp32 on ``checkpoint``. The export measures on the CPU provider; ``providers`` (onnxruntime's
    list, e.g. ``[("CUDAExecutionProvider", {}), "CPUExecutionProvider"]``) with ``device="cuda"``
    measures the graph as a GPU runs it (tests/engine/test_cuda_provider.py). ``infill``: whether
    the model infills (the export passes the family's verdict; None: the tokenizer's tokens).
    ``session_config``: onnxruntime session config entries, the profile's (`DeviceProfile.
    ort_session_config`), so that the graph is measured with the settings the engine runs it with."""
    import onnxruntime as ort
    import torch
    from transformers import LlamaForCausalLM

    config = torch_config(json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8")))
    model = LlamaForCausalLM.from_pretrained(str(checkpoint), config=config, dtype=torch.float32).eval()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the graph's known optimizer warnings are noise in the export's output
    if threads:
        options.intra_op_num_threads = threads
    for key, value in (session_config or {}).items():  # as engine.make_session applies them
        options.add_session_config_entry(key, value)
    try:
        session = ort.InferenceSession(native_path(graph) or str(graph), sess_options=options,
                                       providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own classes (Fail, InvalidArgument, ...)
        raise GraphSessionError(f"onnxruntime {ort.__version__} could not open {Path(graph).name} "
                                f"with session config {session_config or {}}: {exc}") from exc
    tokenizer = CodeLlamaTokenizer.from_file(tokenizer_path)
    prompts = fidelity_prompt_ids(tokenizer, chat_format, infill)
    windows = corpus_windows(tokenizer, corpus_tokens, corpus_window) if corpus_tokens > 0 else []
    max_len = max([prompt_positions(tokenizer, chat_format, n_tokens, infill)] + [len(w) for w in windows])
    decoder = DECODERS[flavour](ort, session, arch, device=device, max_length=max_len)

    rows = []
    for i, (mode, ids) in enumerate(prompts):
        ref, ref_logits, ref_steps = torch_greedy(model, ids, n_tokens)
        got, got_logits = graph_greedy(decoder, ids, n_tokens)
        forced = graph_teacher_forced(decoder, ids, ref)
        diff = np.abs(ref_logits - got_logits)
        rows.append({
            "mode": mode,
            "prompt_tokens": len(ids),
            "greedy_agreement": agreement_through_ties(ref, forced, ref_steps),
            "greedy_agreement_strict": prefix_agreement(ref, got),
            "teacher_forced_agreement": float(np.mean(np.asarray(forced) == np.asarray(ref))),
            "max_logit_diff": float(diff.max()),
            "mean_logit_diff": float(diff.mean()),
        })
        if progress:
            progress(f"prompt {i + 1}/{len(prompts)} ({mode}): agreement {rows[-1]['greedy_agreement']:.2f}")
    agreements = [r["greedy_agreement"] for r in rows]
    corpus = {}
    if windows:
        if progress:
            progress(f"corpus: {sum(len(w) for w in windows)} positions in {len(windows)} windows ...")
        kl, same = corpus_divergence(model, decoder, windows)
        corpus = {"corpus_positions": int(kl.size), "kl_divergence_mean": float(kl.mean()),
                  "kl_divergence_p99": float(np.percentile(kl, 99)), "corpus_top1_agreement": float(same.mean())}
    return FidelityReport(
        n_tokens=n_tokens,
        prompts=len(rows),
        greedy_agreement=float(np.mean(agreements)),
        greedy_agreement_min=float(np.min(agreements)),
        teacher_forced_agreement=float(np.mean([r["teacher_forced_agreement"] for r in rows])),
        greedy_agreement_strict=float(np.mean([r["greedy_agreement_strict"] for r in rows])),
        tie_logits=TIE_LOGITS,
        max_logit_diff=float(max(r["max_logit_diff"] for r in rows)),
        mean_logit_diff=float(np.mean([r["mean_logit_diff"] for r in rows])),
        per_prompt=tuple(rows),
        **corpus,
    )
