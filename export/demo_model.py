"""The small trained demo model: a ~19M-parameter Code Llama trained locally.

Fidelity tests and the demo need a model whose logits mean something (random
weights give flat logits, so int4-versus-fp32 greedy agreement would say
nothing). No model hub is reachable, so this module trains one in about five
minutes on two CPU cores, deterministically, on the one body of Python source
every machine has: the standard library of the running interpreter.

The model is a Code Llama in miniature (``LlamaForCausalLM``, rope theta 1e6,
grouped-query attention, the real 32016-id tokenizer with the infilling
tokens). About a third of the training sequences use Code Llama's infilling
format, so prefix/suffix/middle prompts work too::

    [bos, ▁<PRE>] + encode(prefix) + [▁<SUF>] + encode_infilling(suffix)
        + [▁<MID>] + encode_infilling(middle) + [▁<EOT>]

The rest are plain completions, ``[bos] + encode(code)`` (with ``eos`` when the
snippet reaches the end of its file).

Trained models are cached outside the repository, in
``default_cache_dir() / "demo-model-<key>"`` where the key hashes the recipe and
the Python version; :func:`ensure_demo_model` returns the cached folder or trains
it (into a temporary folder that is renamed into place only once complete).

Command line: ``python -m edge_export.demo_model [--output DIR] [--force]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_export.synthetic import llama_config, tokenizer_json, write_checkpoint_files
from edge_runtime.durable_files import fsync_path, fsync_tree

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

FORMAT_VERSION = 1
"""Bump when the training code changes in a way that changes the weights."""

MANIFEST_NAME = "edge_demo.json"
COMPLETE_MARKER = ".complete"

_IGNORE_INDEX = -100
_INFILL_MARKER = "☺"  # a single SentencePiece piece (id 31171), as in Meta's encode_infilling
_SKIPPED_DIRS = frozenset(
    {
        "__pycache__",
        "dist-packages",
        "encodings",  # generated codec tables, not code
        "idle_test",
        "site-packages",  # third-party packages: differ from machine to machine
        "test",
        "tests",
    }
)


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that determines the demo model's weights (with the stdlib)."""

    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    max_position_embeddings: int = 4096  # room for the context-2048 decode benchmark
    rope_theta: float = 1_000_000.0
    seq_len: int = 256
    batch_size: int = 4
    steps: int = 300
    learning_rate: float = 3e-3
    embedding_lr_scale: float = 1.0
    head_lr_scale: float = 1.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    infill_fraction: float = 0.35
    split_fraction: float = 0.3
    min_file_bytes: int = 2000
    max_file_bytes: int = 16_000
    file_stride: int = 16
    threads: int = 2
    seed: int = 0

    def key(self) -> str:
        """Short hash of the recipe, the Python version and the format version."""
        payload = {
            "format": FORMAT_VERSION,
            "python": platform.python_version(),
            "recipe": dataclasses.asdict(self),
        }
        blob = json.dumps(payload, sort_keys=True).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:12]


RECIPE = DemoRecipe()
"""The recipe :func:`ensure_demo_model` trains."""


@dataclass(frozen=True)
class SourceFile:
    """One training file: its path relative to the stdlib root, and its text."""

    relpath: str
    text: str


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$EDGE_RUNTIME_CACHE`` if set, else ``~/.cache/edge-runtime``."""
    configured = environ.get("EDGE_RUNTIME_CACHE")
    try:
        if configured:
            return Path(configured).expanduser()
        return Path.home() / ".cache" / "edge-runtime"
    except RuntimeError:  # no $HOME, and a user id the user database lacks (`docker run --user 12345`)
        from edge_runtime.errors import ConfigError

        raise ConfigError(f"no cache folder for the demo model: $HOME is unset and user id {os.getuid()} has no home "
                          "in the user database; give --cache-dir DIR, or set $EDGE_RUNTIME_CACHE or $HOME") from None


def demo_model_dir(cache_dir: Path | None = None, recipe: DemoRecipe = RECIPE) -> Path:
    """Where the demo model for ``recipe`` lives in ``cache_dir`` (trained or not)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"demo-model-{recipe.key()}"


def ensure_demo_model(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Return the cached demo model folder, training it first if it is missing.

    ``cache_dir`` defaults to :func:`default_cache_dir`. With ``progress``,
    training reports step, loss and elapsed time on stderr.
    """
    return build_demo_model(demo_model_dir(cache_dir), progress=progress)


def build_demo_model(
    out_dir: Path,
    recipe: DemoRecipe = RECIPE,
    *,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Make ``out_dir`` a complete demo model folder for ``recipe``; return it.

    A folder that is already complete for the same recipe is reused unless
    ``force``. Training happens in a temporary sibling folder that replaces
    ``out_dir`` only when finished, so an interrupted run leaves no half
    folder. Concurrent callers (e.g. parallel test workers) wait on a lock file
    instead of training twice. An existing ``out_dir`` that is not a demo model
    folder is never replaced.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if not force and is_complete(out_dir, recipe):
            return out_dir
        if out_dir.exists() and not _replaceable(out_dir):
            raise FileExistsError(
                f"{out_dir} exists and is not a demo model folder; refusing to replace it"
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            train_demo_model(staging, recipe, progress=progress)
            (staging / COMPLETE_MARKER).write_text(recipe.key() + "\n", encoding="utf-8")
            fsync_tree(staging)  # whole on the disk before the marker's folder takes the name
            _replace_dir(staging, out_dir)
            fsync_path(out_dir.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def is_complete(folder: Path, recipe: DemoRecipe = RECIPE) -> bool:
    """Whether ``folder`` holds a finished demo model trained from ``recipe``."""
    marker = Path(folder) / COMPLETE_MARKER
    try:
        return marker.read_text(encoding="utf-8").strip() == recipe.key()
    except OSError:
        return False


def train_demo_model(out_dir: Path, recipe: DemoRecipe = RECIPE, *, progress: bool = True) -> Path:
    """Train the demo model and write its checkpoint folder into ``out_dir``.

    Writes the files of :func:`edge_export.synthetic.write_checkpoint_files`,
    ``model.safetensors`` (float32) and ``edge_demo.json`` describing the run.
    Does not write the completion marker; see :func:`build_demo_model`.
    Global torch settings (threads, determinism, RNG) are restored afterwards.
    """
    import tokenizers
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    started = time.perf_counter()
    sources = stdlib_sources(recipe)
    data_sha256 = _sources_sha256(sources)
    tokenizer = _training_tokenizer()
    config = llama_config(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_layers=recipe.num_layers,
        num_heads=recipe.num_heads,
        num_kv_heads=recipe.num_kv_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_theta=recipe.rope_theta,
    )
    _log(
        progress,
        f"demo model: training {recipe.steps} steps on {len(sources)} stdlib files "
        f"(Python {platform.python_version()}, data sha256 {data_sha256[:12]})",
    )
    with _deterministic_torch(recipe.threads, recipe.seed):
        model = LlamaForCausalLM(config)
        losses = _train(model, tokenizer, sources, recipe, progress=progress, started=started)
        model.save_pretrained(out_dir, safe_serialization=True)
    seconds = time.perf_counter() - started
    write_checkpoint_files(out_dir, config, vocab="infill", dtype="float32")
    final_window = losses[-10:]
    manifest = {
        "format": FORMAT_VERSION,
        "recipe_key": recipe.key(),
        "recipe": dataclasses.asdict(recipe),
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "data": {
            "source": "python stdlib",
            "files": len(sources),
            "chars": sum(len(source.text) for source in sources),
            "sha256": data_sha256,
        },
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "steps": recipe.steps,
        "tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
        "final_loss": round(sum(final_window) / len(final_window), 4),
        "final_loss_window": len(final_window),
        "seconds": round(seconds, 1),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
        },
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _log(progress, f"demo model: final loss {manifest['final_loss']} after {seconds:.0f}s")
    return out_dir


def stdlib_sources(recipe: DemoRecipe = RECIPE) -> list[SourceFile]:
    """The training files: the running interpreter's stdlib ``*.py``, sorted.

    Skips test folders, ``site-packages``, generated codec tables, build
    configuration data, files that are not UTF-8, and files larger than
    ``recipe.max_file_bytes``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _SKIPPED_DIRS]
        if Path(folder) == root:
            subfolders[:] = [name for name in subfolders if not name.startswith("config-")]
        candidates.extend(Path(folder) / name for name in files if name.endswith(".py"))
    selected: list[SourceFile] = []
    for path in sorted(candidates, key=lambda item: item.relative_to(root).as_posix()):
        if path.name.startswith("_sysconfigdata"):  # build configuration, machine-specific
            continue
        try:
            if not path.is_file():
                continue
            if not recipe.min_file_bytes <= path.stat().st_size <= recipe.max_file_bytes:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            selected.append(SourceFile(path.relative_to(root).as_posix(), text))
    selected = selected[:: recipe.file_stride]
    if not selected:
        raise RuntimeError(f"no Python sources found under {root}")
    return selected


def encode_infilling(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode ``text`` without the leading "▁" SentencePiece's normalizer adds.

    Meta's trick: encode ``"☺" + text`` and drop the tokens up to and including
    the "☺" piece. Used for the suffix and middle of infilling sequences.
    """
    ids = tokenizer.encode(_INFILL_MARKER + text, add_special_tokens=False).ids
    marker_id = tokenizer.token_to_id(_INFILL_MARKER)
    if marker_id is None or marker_id not in ids:
        raise ValueError(f"tokenizer has no single {_INFILL_MARKER!r} piece")
    return ids[ids.index(marker_id) + 1 :]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_export.demo_model``: train (or find) the demo model, print its path."""
    parser = argparse.ArgumentParser(
        prog="python -m edge_export.demo_model",
        description="Train the small Code Llama demo model on the Python stdlib "
        "(about five minutes on two CPU cores) and print its folder.",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="write the model to this folder (default: demo-model-<key> in the cache, "
        "$EDGE_RUNTIME_CACHE or ~/.cache/edge-runtime)",
    )
    parser.add_argument("--force", action="store_true", help="retrain even if already complete")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    target = args.output if args.output is not None else demo_model_dir()
    path = build_demo_model(target, force=args.force, progress=not args.quiet)
    print(path)
    return 0


# --------------------------------------------------------------------------- training


def _train(
    model: Any,
    tokenizer: Tokenizer,
    sources: list[SourceFile],
    recipe: DemoRecipe,
    *,
    progress: bool,
    started: float,
) -> list[float]:
    """Run the optimisation loop; return the per-step training losses."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, recipe),
        lr=recipe.learning_rate,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    batches = _batches(tokenizer, sources, recipe)
    losses: list[float] = []
    report_every = max(1, recipe.steps // 30)
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, recipe) * group["lr_scale"]
        inputs, targets = next(batches)
        hidden = model.model(input_ids=inputs, use_cache=False).last_hidden_state
        loss = _linear_cross_entropy().apply(
            hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, targets.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % report_every == 0 or step == recipe.steps - 1:
            recent = losses[-report_every:]
            _log(
                progress,
                f"step {step + 1:4d}/{recipe.steps}  loss {sum(recent) / len(recent):.3f}  "
                f"lr {_learning_rate(step, recipe):.2e}  "
                f"elapsed {time.perf_counter() - started:5.1f}s",
            )
    model.eval()
    return losses


def _learning_rate(step: int, recipe: DemoRecipe) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps - 1)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    floor = recipe.learning_rate * recipe.min_lr_ratio
    return floor + (recipe.learning_rate - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _parameter_groups(model: Any, recipe: DemoRecipe) -> list[dict[str, Any]]:
    """AdamW groups: embedding and lm_head get their own learning-rate scales.

    Weight decay applies to the projection matrices and lm_head, not to norms
    or the embedding.
    """
    embedding = model.model.embed_tokens.weight
    head = model.lm_head.weight
    matrices, others = [], []
    for parameter in model.parameters():
        if parameter is embedding or parameter is head:
            continue
        (matrices if parameter.ndim >= 2 else others).append(parameter)
    return [
        {"params": [embedding], "weight_decay": 0.0, "lr_scale": recipe.embedding_lr_scale},
        {"params": [head], "weight_decay": recipe.weight_decay, "lr_scale": recipe.head_lr_scale},
        {"params": matrices, "weight_decay": recipe.weight_decay, "lr_scale": 1.0},
        {"params": others, "weight_decay": 0.0, "lr_scale": 1.0},
    ]


@functools.cache
def _linear_cross_entropy() -> Any:
    """The chunked lm_head + cross-entropy autograd function (built on first use)."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, chunked.

        Computes the gradients during the forward pass, a chunk of rows at a
        time, so the (tokens x 32016) logits never exist in full; on CPU this
        is markedly faster than ``lm_head`` + ``F.cross_entropy``, whose
        log-softmax backward over the full logits dominates a step. Targets
        equal to -100 are ignored.
        """

        chunk_rows = 256

        @staticmethod
        def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
            valid_count = max(int((targets != _IGNORE_INDEX).sum()), 1)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros_like(weight)
            total = hidden.new_zeros(())
            rows = LinearCrossEntropy.chunk_rows
            buffer = hidden.new_empty(min(rows, hidden.shape[0]), weight.shape[0])
            for start in range(0, hidden.shape[0], rows):
                chunk = hidden[start : start + rows]
                chunk_targets = targets[start : start + rows]
                logits = buffer[: chunk.shape[0]]
                torch.mm(chunk, weight.T, out=logits)
                valid = (chunk_targets != _IGNORE_INDEX).to(hidden.dtype)[:, None]
                index = chunk_targets.clamp(min=0)[:, None]
                picked = logits.gather(1, index)
                peak = logits.amax(dim=1, keepdim=True)
                logits.sub_(peak).exp_()
                sums = logits.sum(dim=1, keepdim=True)
                total += ((peak + sums.log() - picked) * valid).sum()
                # d(mean loss)/d(logits) = (softmax - one_hot) / valid_count
                scale = valid / valid_count
                logits.mul_(scale / sums)
                logits.scatter_add_(1, index, -scale)
                torch.mm(logits, weight, out=grad_hidden[start : start + rows])
                grad_weight.addmm_(logits.T, chunk)
            ctx.save_for_backward(grad_hidden, grad_weight)
            return total / valid_count

        @staticmethod
        def backward(ctx: Any, grad_loss: torch.Tensor):
            grad_hidden, grad_weight = ctx.saved_tensors
            return grad_hidden * grad_loss, grad_weight * grad_loss, None

    return LinearCrossEntropy


# ------------------------------------------------------------------------------- data


def _training_tokenizer() -> Tokenizer:
    """The Code Llama tokenizer; text never turns into special tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(json.dumps(tokenizer_json("infill")))
    tokenizer.encode_special_tokens = True
    return tokenizer


def _special_id(tokenizer: Tokenizer, piece: str) -> int:
    token_id = tokenizer.token_to_id(piece)
    if token_id is None:
        raise ValueError(f"tokenizer has no {piece!r} token")
    return token_id


def _batches(
    tokenizer: Tokenizer, sources: list[SourceFile], recipe: DemoRecipe
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, targets)`` batches forever, deterministically from ``recipe.seed``."""
    import torch

    sampler = _SequenceSampler(tokenizer, sources, recipe)
    pad_id = _special_id(tokenizer, "</s>")
    while True:
        inputs = np.full((recipe.batch_size, recipe.seq_len), pad_id, dtype=np.int64)
        targets = np.full((recipe.batch_size, recipe.seq_len), _IGNORE_INDEX, dtype=np.int64)
        for row in range(recipe.batch_size):
            sequence = sampler.sample()
            inputs[row, : len(sequence)] = sequence
            targets[row, : len(sequence) - 1] = sequence[1:]
        yield torch.from_numpy(inputs), torch.from_numpy(targets)


class _SequenceSampler:
    """Draws training sequences (completion or infilling) from the sources."""

    def __init__(self, tokenizer: Tokenizer, sources: list[SourceFile], recipe: DemoRecipe) -> None:
        self.tokenizer = tokenizer
        self.sources = sources
        self.recipe = recipe
        self.rng = np.random.default_rng(recipe.seed)
        self.ends = np.cumsum([len(source.text) for source in sources])
        self.bos = _special_id(tokenizer, "<s>")
        self.eos = _special_id(tokenizer, "</s>")
        self.prefix = _special_id(tokenizer, "▁<PRE>")
        self.suffix = _special_id(tokenizer, "▁<SUF>")
        self.middle = _special_id(tokenizer, "▁<MID>")
        self.end_of_text = _special_id(tokenizer, "▁<EOT>")

    def sample(self) -> list[int]:
        """One sequence of at most ``seq_len`` tokens."""
        infill = self.rng.random() < self.recipe.infill_fraction
        snippet, reaches_end = self._snippet()
        if infill:
            return self._infilling(snippet)
        return self._completion(snippet, reaches_end)

    def _snippet(self) -> tuple[str, bool]:
        """Text from a random line start: about ``seq_len`` tokens' worth or more."""
        position = int(self.rng.integers(int(self.ends[-1])))
        index = int(np.searchsorted(self.ends, position, side="right"))
        text = self.sources[index].text
        offset = position - (int(self.ends[index - 1]) if index else 0)
        start = text.rfind("\n", 0, offset) + 1
        end = start + self.recipe.seq_len * 8
        return text[start:end], end >= len(text)

    def _completion(self, snippet: str, reaches_end: bool) -> list[int]:
        """``[bos] + encode(snippet)`` (+ ``eos`` at the end of a file).

        A ``split_fraction`` of them is cut after a random space and the rest
        encoded with :func:`encode_infilling`: the tokens that follow a prompt
        ending in a space (``"def "``, ``"return "``) at inference, which plain
        encoding never produces (it attaches the space to the next word).
        """
        if self.rng.random() < self.recipe.split_fraction:
            cut = self._prompt_end(snippet)
            ids = self.tokenizer.encode(snippet[:cut], add_special_tokens=False).ids
            ids += encode_infilling(self.tokenizer, snippet[cut:])
        else:
            ids = self.tokenizer.encode(snippet, add_special_tokens=False).ids
        sequence = [self.bos, *ids]
        if reaches_end and len(sequence) < self.recipe.seq_len:
            sequence.append(self.eos)
        return sequence[: self.recipe.seq_len]

    def _prompt_end(self, snippet: str) -> int:
        """A random position just after a space, early in ``snippet``."""
        window = snippet[: self.recipe.seq_len * 2]
        candidates = [index + 1 for index, char in enumerate(window) if char == " "]
        if not candidates:
            return int(self.rng.integers(0, len(window) + 1))
        return candidates[int(self.rng.integers(len(candidates)))]

    def _infilling(self, snippet: str) -> list[int]:
        # Cut the snippet to a token budget that leaves room for the 5 control
        # tokens and the few extra tokens the two split points can create.
        seq_len = self.recipe.seq_len
        encoding = self.tokenizer.encode(snippet, add_special_tokens=False)
        budget = seq_len - 12
        if len(encoding.ids) > budget:
            snippet = snippet[: encoding.offsets[budget - 1][1]]
        first, second = sorted(int(x) for x in self.rng.integers(0, len(snippet) + 1, size=2))
        prefix_ids = self.tokenizer.encode(snippet[:first], add_special_tokens=False).ids
        middle_ids = encode_infilling(self.tokenizer, snippet[first:second])
        suffix_ids = encode_infilling(self.tokenizer, snippet[second:])
        overflow = 5 + len(prefix_ids) + len(suffix_ids) + len(middle_ids) - seq_len
        if overflow > 0:  # shorten the suffix (a shorter suffix is still a valid example)
            suffix_ids = suffix_ids[: max(0, len(suffix_ids) - overflow)]
        sequence = [
            self.bos,
            self.prefix,
            *prefix_ids,
            self.suffix,
            *suffix_ids,
            self.middle,
            *middle_ids,
            self.end_of_text,
        ]
        return sequence[:seq_len]


def _sources_sha256(sources: list[SourceFile]) -> str:
    digest = hashlib.sha256()
    for source in sources:
        for part in (source.relpath, source.text):
            data = part.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- plumbing


@contextlib.contextmanager
def _deterministic_torch(threads: int, seed: int) -> Iterator[None]:
    """Seeded, deterministic torch with ``threads`` threads; restores the settings after."""
    import torch

    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)
            torch.set_num_threads(previous_threads)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the atomic rename still holds
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _replaceable(folder: Path) -> bool:
    """An existing folder we may replace: empty, or one a demo model run wrote."""
    if not folder.is_dir():
        return False
    return not any(folder.iterdir()) or (folder / MANIFEST_NAME).exists() or (
        folder / COMPLETE_MARKER
    ).exists()


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``, moving an existing ``target`` aside first."""
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        retired.rmdir()
        target.rename(retired)
        new.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        new.rename(target)


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
