"""Calibration activations for GPTQ (``export/gptq.py``): the Hessian ``X^T X`` of every
linear layer's input over a calibration text, computed layer by layer.

The graph builder asks for one weight's Hessian at a time, in graph order (layer 0's
q/k/v, o, gate/up, down, then layer 1's, ..., the lm_head). :class:`LayerwiseHessians`
keeps only the hidden states of the calibration windows between two layers and runs
the next layer (transformers' own ``LlamaDecoderLayer``, its weights read from the
safetensors files) when a weight of it is first asked for, so memory stays at one
layer and its four Hessians however large the checkpoint. Activations are the float
model's: each layer sees what the unquantized layers before it produce.

The default text, ``assets/gptq-calibration.txt`` (code in several languages, written for
this project), is neither the fidelity corpus the export measures with nor the KV-cache
calibration text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.native_paths import name_text

from .checkpoint import CheckpointInfo, torch_config

CALIBRATION_TEXT = Path(__file__).resolve().parent / "assets" / "gptq-calibration.txt"
CALIBRATION_WINDOW = 512
CALIBRATION_TOKENS = 4096  # the export's default: the first tokens of the text GPTQ runs
_LAYER_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.weight")
_INPUT_OF = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_out",
             "gate": "mlp_in", "up": "mlp_in", "down": "mlp_hidden"}
_HEAD_WEIGHTS = ("lm_head.weight", "model.embed_tokens.weight")


CODE_SUFFIXES = frozenset({".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".cs", ".java", ".kt",
                           ".scala", ".go", ".rs", ".js", ".jsx", ".ts", ".tsx", ".rb", ".php", ".swift",
                           ".m", ".lua", ".r", ".jl", ".sql", ".sh", ".bash", ".ps1", ".pl", ".hs"})
CHARS_PER_TOKEN = 6  # generous: a folder is read only until its text surely holds the tokens asked for
MIN_TOKENS = 64  # fewer calibration tokens than this is a mistake, not a calibration


NOT_TEXT_SHARE = 0.1  # a file with NUL bytes, or more of its bytes than this undecodable, is not text


def _source_text(path: Path) -> str | None:
    """A source file's text, or None when it is not text: NUL bytes, or more than
    NOT_TEXT_SHARE of its bytes not UTF-8 (GPTQ would calibrate on replacement characters). A
    few stray bytes (a Latin-1 comment) are replaced."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", errors="replace")
    if b"\0" in data or text.count("\ufffd") > NOT_TEXT_SHARE * len(data):
        return None
    return text


class CalibrationError(EdgeRuntimeError, ValueError):
    """A calibration source GPTQ cannot use; the message says why (without the path)."""


@dataclass(frozen=True)
class CalibrationText:
    """What GPTQ calibrates on: one text file, or a folder's source files (those with a code
    suffix, in path order, outside hidden folders) joined, read until ``max_chars``."""

    source: Path
    text: str
    files: int
    skipped: tuple[str, ...] = ()  # a folder's files with a code suffix that are not text (binary, not UTF-8)

    @classmethod
    def read(cls, source: Path, max_chars: int | None = None) -> CalibrationText:
        if source.is_file():
            text = _source_text(source)
            if text is None:
                raise CalibrationError("is not UTF-8 text (a binary file, or another encoding): give a source "
                                       "file, or a folder of them")
            return cls(source, text, 1)
        if not source.is_dir():
            raise CalibrationError("no such file or folder")
        parts, size, skipped = [], 0, []
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source).parts
            if path.suffix.lower() not in CODE_SUFFIXES or any(p.startswith(".") for p in relative) \
                    or not path.is_file():
                continue
            text = _source_text(path)
            if text is None:
                skipped.append(path.relative_to(source).as_posix())
                continue
            parts.append(text)
            size += len(parts[-1])
            if max_chars is not None and size >= max_chars:
                break
        if not parts:
            raise CalibrationError(f"no source files ({', '.join(sorted(CODE_SUFFIXES))})"
                                   + (f"; not UTF-8 text: {', '.join(skipped[:3])}" if skipped else ""))
        return cls(source, "\n\n".join(parts), len(parts), tuple(skipped))

    def windows(self, tokenizer, window: int = CALIBRATION_WINDOW, n_tokens: int | None = None) -> list[list[int]]:
        """The text as BOS-led windows of at most ``window`` positions (the first ``n_tokens``)."""
        from .fidelity import text_windows

        return text_windows(tokenizer, self.text, window, n_tokens)

    def describe(self, windows: Sequence[Sequence[int]]) -> dict:
        """What the bundle's manifest records of a GPTQ calibration."""
        import hashlib

        from .gptq import DAMP

        # names as text (a name whose bytes are not UTF-8, or any under an ASCII locale, would be
        # lone surrogates: JSON escapes that strict parsers refuse)
        return {"text": name_text(self.source.name), "files": self.files,
                **({"skipped_files": [name_text(name) for name in self.skipped]} if self.skipped else {}),
                "sha256": hashlib.sha256(self.text.encode("utf-8")).hexdigest(),
                "tokens": sum(len(w) for w in windows), "windows": len(windows), "damp": DAMP}


@dataclass(frozen=True)
class Calibration:
    """GPTQ's calibration tokens, read and checked before any work: ``hessians()`` gives what
    the graph builder asks for, ``manifest`` what the bundle records of them."""

    info: CheckpointInfo
    text: CalibrationText
    windows: list[list[int]]

    @property
    def manifest(self) -> dict:
        return self.text.describe(self.windows)

    def hessians(self) -> LayerwiseHessians:
        return LayerwiseHessians(self.info, self.windows)


def calibration_for(info: CheckpointInfo, source: Path = CALIBRATION_TEXT, *, window: int = CALIBRATION_WINDOW,
                    n_tokens: int = CALIBRATION_TOKENS) -> Calibration:
    """GPTQ's calibration of a checkpoint: the first ``n_tokens`` of ``source`` (a file or a
    folder of sources) in BOS-led windows of at most ``window`` positions. Raises
    CalibrationError (or OSError) for a source it cannot use."""
    from edge_runtime.tokenizer import CodeLlamaTokenizer

    text = CalibrationText.read(source, n_tokens * CHARS_PER_TOKEN)
    windows = text.windows(CodeLlamaTokenizer.from_file(info.tokenizer_path), window, n_tokens)
    if sum(len(w) - 1 for w in windows) < MIN_TOKENS:
        raise CalibrationError(f"fewer than {MIN_TOKENS} tokens to calibrate on")
    return Calibration(info, text, windows)


class LayerwiseHessians:
    """``for_weight(name)``: the [K, K] float32 Hessian (sum of x x^T over the calibration
    tokens) of the input of the checkpoint weight ``name``. Ask in graph order: a layer
    before the current one is gone."""

    def __init__(self, info: CheckpointInfo, windows: Sequence[Sequence[int]]) -> None:
        import torch
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        from .graph_builder import SafetensorsReader

        if not windows:
            raise ValueError("no calibration windows")
        self.reader = SafetensorsReader(info.weight_files)
        self.config = torch_config(info.config)
        self.config._attn_implementation = "sdpa"  # causal without a mask
        self.num_layers = int(self.config.num_hidden_layers)
        self.tokens = sum(len(w) for w in windows)
        embed = torch.from_numpy(self.reader.read("model.embed_tokens.weight").astype(np.float32))
        self._hidden = [embed[torch.tensor(list(w))][None] for w in windows]  # [1, T, hidden] each
        rotary = LlamaRotaryEmbedding(self.config)
        self._rotary = {}
        for length in {len(w) for w in windows}:
            positions = torch.arange(length)[None]
            self._rotary[length] = rotary(self._hidden[0], positions)
        self._layer = -1  # the layer whose Hessians are held
        self._held: dict[str, np.ndarray] = {}

    def for_weight(self, name: str) -> np.ndarray:
        if name in _HEAD_WEIGHTS:
            self._advance(self.num_layers)
            return self._held["head_in"]
        m = _LAYER_WEIGHT.fullmatch(name)
        if not m or m[3] not in _INPUT_OF:
            raise KeyError(f"no calibration Hessian for {name!r}")
        layer = int(m[1])
        if layer < self._layer:
            raise ValueError(f"{name}: layer {layer} was passed already (at layer {self._layer})")
        self._advance(layer)
        return self._held[_INPUT_OF[m[3]]]

    def _advance(self, layer: int) -> None:
        while self._layer < layer:
            self._layer += 1
            self._held = {}  # the previous layer's Hessians go before the next layer's are made
            if self._layer == self.num_layers:
                self._held = self._run_head()
            else:
                self._held = self._run_layer(self._layer)

    def _module(self, make, prefix: str):
        """``make()`` built on the meta device (no random init: a 7B layer is 800 MB in float32),
        then given the checkpoint's tensors under ``prefix``, in float32."""
        import torch

        with torch.device("meta"):
            module = make()
        state = {key: torch.from_numpy(self.reader.read(f"{prefix}.{key}").astype(np.float32))
                 for key in module.state_dict()}
        module.load_state_dict(state, assign=True)
        return module.eval()

    def _run_layer(self, layer: int) -> dict[str, np.ndarray]:
        import torch
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        block = self._module(lambda: LlamaDecoderLayer(self.config, layer_idx=layer), f"model.layers.{layer}")
        sums: dict[str, torch.Tensor] = {}

        def recorder(key: str):
            def hook(_module, args) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                if key not in sums:
                    sums[key] = torch.zeros((x.shape[1], x.shape[1]), dtype=torch.float32)
                # in place, float32: a float64 running sum took twice as long at a 7B's width
                # (a [11008, 11008] float64 add a window) for 3e-7 of relative difference
                sums[key].addmm_(x.T, x)
            return hook

        watched = {"attn_in": block.self_attn.q_proj, "attn_out": block.self_attn.o_proj,
                   "mlp_in": block.mlp.gate_proj, "mlp_hidden": block.mlp.down_proj}
        handles = [module.register_forward_pre_hook(recorder(key)) for key, module in watched.items()]
        try:
            with torch.no_grad():
                self._hidden = [block(h, position_embeddings=self._rotary[h.shape[1]]) for h in self._hidden]
        finally:
            for handle in handles:
                handle.remove()
        return {key: value.numpy() for key, value in sums.items()}

    def _run_head(self) -> dict[str, np.ndarray]:
        import torch
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        norm = self._module(lambda: LlamaRMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps), "model.norm")
        total = torch.zeros((self.config.hidden_size, self.config.hidden_size), dtype=torch.float32)
        with torch.no_grad():
            for h in self._hidden:
                x = norm(h).reshape(-1, h.shape[-1])
                total.addmm_(x.T, x)
        self._hidden = []
        return {"head_in": total.numpy()}
