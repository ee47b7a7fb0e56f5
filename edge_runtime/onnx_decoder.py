"""Drives a bundle's ONNX decoder graph: prefill a prompt, then one token at a time.

One class per graph flavour; the generator sees only `prefill` and `decode`.
All inputs and outputs are bound with onnxruntime I/O binding to buffers that
are allocated once per request (KV cache) or once per decoder (ids, mask,
positions, last-token logits), so the token loop allocates nothing.
"""

from __future__ import annotations

import numpy as np

from .bundle import Architecture
from .errors import BundleError
from .kv_cache import KVCache

# onnxruntime type strings of the graphs' logits and KV caches (int8: a quantized cache, gqa-shared-kv)
ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


KV_CONCAT_INPUTS = ("input_ids", "attention_mask", "position_ids")


def check_graph_matches(session, arch: Architecture, required_inputs: tuple[str, ...] = KV_CONCAT_INPUTS,
                        graph: str = "model.onnx") -> None:
    """Refuse a graph that lacks its flavour's inputs or whose layers, kv heads, head
    size or vocabulary disagree with the manifest's architecture: another model's
    graph under this bundle's manifest (its hashes edited to match) is refused at
    load, not at a request."""
    inputs = {i.name: i for i in session.get_inputs()}
    problems = []
    missing = [name for name in required_inputs if name not in inputs]
    if missing:
        problems.append(f"no input {', '.join(missing)} (another graph flavour)")
    layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
    if layers != arch.num_layers:
        problems.append(f"{layers} layers, the manifest says {arch.num_layers}")
    past = inputs.get("past_key_values.0.key")
    if past is not None and len(past.shape) == 4:
        heads, head_dim = past.shape[1], past.shape[3]
        if isinstance(heads, int) and heads != arch.num_kv_heads:
            problems.append(f"{heads} kv heads, the manifest says {arch.num_kv_heads}")
        if isinstance(head_dim, int) and head_dim != arch.head_dim:
            problems.append(f"head size {head_dim}, the manifest says {arch.head_dim}")
    logits = next((o for o in session.get_outputs() if o.name == "logits"), None)
    vocab = logits.shape[-1] if logits is not None and logits.shape else None
    if logits is None:
        problems.append("no logits output")
    elif isinstance(vocab, int) and vocab != arch.vocab_size:
        problems.append(f"vocab size {vocab}, the manifest says {arch.vocab_size}")
    if problems:
        raise BundleError(f"{graph} does not match bundle.json's architecture: {'; '.join(problems)}")


class KVConcatDecoder:
    """The `optimum-kv-concat` flavour: inputs input_ids, attention_mask,
    position_ids, past_key_values.{i}.key/value; outputs logits and
    present.{i}.key/value (past and the new tokens concatenated)."""

    def __init__(self, ort, session, arch: Architecture, *, device: str, max_length: int,
                 device_id: int = 0) -> None:
        self.ort = ort
        self.session = session
        self.arch = arch
        self.device = device
        self.device_id = device_id  # which GPU the buffers live on (the session's)
        self.max_length = max_length
        check_graph_matches(session, arch, KV_CONCAT_INPUTS)
        inputs = {i.name: i for i in session.get_inputs()}
        self.kv_dtype = np.dtype(ORT_TO_NUMPY[inputs["past_key_values.0.key"].type])
        self.logits_dtype = np.dtype(ORT_TO_NUMPY[session.get_outputs()[0].type])
        self.vocab_size = arch.vocab_size
        # Host buffers written in place by the loop.
        self._mask = np.ones(max_length, dtype=np.int64)
        self._positions = np.arange(max_length, dtype=np.int64)
        self._token = np.zeros(1, dtype=np.int64)
        self._step_logits = np.zeros(self.vocab_size, dtype=self.logits_dtype)
        self._binding = session.io_binding()

    def new_cache(self, capacity: int, prompt: np.ndarray | None = None) -> KVCache:
        """A new cache of its own for every request: nothing of the previous one is kept
        (`prompt` is taken for the decoders' common interface; see gqa_decoder.py)."""
        if capacity > self.max_length:
            raise ValueError(f"cache capacity {capacity} exceeds the decoder's maximum {self.max_length}")
        return KVCache.allocate(self.ort, num_layers=self.arch.num_layers, num_kv_heads=self.arch.num_kv_heads,
                                head_dim=self.arch.head_dim, capacity=capacity, dtype=self.kv_dtype,
                                device=self.device, device_id=self.device_id)

    def _bind(self, cache: KVCache, ids: np.ndarray, logits_out: np.ndarray | None) -> None:
        b = self._binding
        past, total = cache.length, cache.length + ids.shape[0]
        if total > cache.capacity:
            raise ValueError(f"{total} tokens exceed the KV cache capacity {cache.capacity}")
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        # logits first: get_outputs() follows binding order
        if logits_out is None:
            b.bind_output("logits", "cpu")
        else:
            b.bind_output("logits", "cpu", 0, self.logits_dtype, (1, 1, self.vocab_size), logits_out.ctypes.data)
        b.bind_input("input_ids", "cpu", 0, np.int64, (1, ids.shape[0]), ids.ctypes.data)
        b.bind_input("attention_mask", "cpu", 0, np.int64, (1, total), self._mask.ctypes.data)
        b.bind_input("position_ids", "cpu", 0, np.int64, (1, ids.shape[0]),
                     self._positions.ctypes.data + past * 8)
        for layer in range(self.arch.num_layers):
            pk, pv = cache.past(layer)
            nk, nv = cache.present(layer)
            on = (self.device, self.device_id, self.kv_dtype)
            b.bind_input(f"past_key_values.{layer}.key", *on, cache.shape(past), pk.ptr)
            b.bind_input(f"past_key_values.{layer}.value", *on, cache.shape(past), pv.ptr)
            b.bind_output(f"present.{layer}.key", *on, cache.shape(total), nk.ptr)
            b.bind_output(f"present.{layer}.value", *on, cache.shape(total), nv.ptr)

    def prefill(self, cache: KVCache, ids: np.ndarray, interrupted=None) -> np.ndarray:
        """Run the prompt (int64 ids [S]) through the graph; returns logits [S, V] (float32).
        One run: `interrupted` (asked between a fused graph's chunks) is never asked here."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._bind(cache, ids, None)
        self.session.run_with_iobinding(self._binding)
        cache.advance(ids.shape[0])
        logits = self._binding.get_outputs()[0].numpy()
        return logits[0].astype(np.float32, copy=False)

    def decode(self, cache: KVCache, token: int) -> np.ndarray:
        """Feed one token; returns the next-token logits [V] (a buffer reused every step)."""
        self._token[0] = token
        self._bind(cache, self._token, self._step_logits)
        self.session.run_with_iobinding(self._binding)
        cache.advance(1)
        return self._step_logits
