"""An int8 KV cache for the `gqa-shared-kv` graph: calibrate, then rewrite the graph.

At long contexts a decode step reads the whole KV cache once per layer: at 2048
tokens of an 8-layer, 2048-wide model that is 268 MB in float32, nearly as much as
its int4 weights (329 MB), and GroupQueryAttention is 43 % of the step's kernel time
on two CPU cores (``benchmarks/op_profile.py``; 27 % with the int8 cache). onnxruntime's CPU GroupQueryAttention (1.32+)
reads and writes an int8 cache itself (``kv_cache_bit_width=8``,
``k_quant_type``/``v_quant_type``, static ``k_scale``/``v_scale`` inputs): the
stored code is ``round(x / scale)``, one scale per channel (kv head x head dim)
of the rotated keys and of the values.

The price is the prompt: onnxruntime's int8 path for prompts (more than one new token)
is several times slower than its float attention (prefill of 2048 tokens 25 % slower on
the same model), so this is opt-in (``--kv-cache-bits 8`` or ``[kv_cache] bits = 8``).

The scales are static, so they are calibrated: the float-cache graph the
builder just wrote runs a calibration text (``assets/kv-calibration.txt``, not the
fidelity corpus) and each layer's largest |key| and |value| per channel, times
``margin``, maps to 127. Then the graph is rewritten in place: past/present
inputs and outputs become int8, each GroupQueryAttention node gets its layer's
scales (inline initializers) and the three attributes. The weights (external
data) are untouched. The export's fidelity step then measures the result
against torch like any other bundle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.bundle import Architecture

CALIBRATION_TEXT = Path(__file__).resolve().parent / "assets" / "kv-calibration.txt"
CALIBRATION_WINDOW = 512  # positions per calibration run (BOS first)
MARGIN = 1.3  # headroom over the calibrated range: values beyond it saturate at +-127
QUANT_TYPE = "PER_CHANNEL"
GQA_KEY_SCALE_INPUT, GQA_VALUE_SCALE_INPUT = 12, 13  # GroupQueryAttention's k_scale / v_scale inputs


@dataclass(frozen=True)
class KVScales:
    """Per layer, the dequantization scale of each key and value channel: [layers, kv_heads * head_dim]."""

    key: np.ndarray
    value: np.ndarray
    margin: float = MARGIN  # the headroom the scales were calibrated with

    def as_manifest(self) -> dict:
        return {"dtype": "int8", "quant_type": QUANT_TYPE.lower().replace("_", "-"), "margin": self.margin,
                "key_scale_range": [float(self.key.min()), float(self.key.max())],
                "value_scale_range": [float(self.value.min()), float(self.value.max())]}


def calibration_windows(tokenizer, window: int = CALIBRATION_WINDOW) -> list[list[int]]:
    """The calibration text as BOS-led windows of at most ``window`` positions."""
    from .fidelity import text_windows

    return text_windows(tokenizer, CALIBRATION_TEXT, window)


def add_int8_kv_cache(graph: Path, arch: Architecture, tokenizer, *, max_length: int) -> KVScales:
    """Calibrate on the calibration text (windows no longer than the graph's ``max_length``)
    and rewrite ``graph`` to keep an int8 KV cache; returns the scales."""
    scales = calibrate(graph, arch, calibration_windows(tokenizer, min(CALIBRATION_WINDOW, max_length)))
    quantize_graph_kv_cache(graph, scales)
    return scales


def calibrate(graph: Path, arch: Architecture, windows: Sequence[Sequence[int]], *, threads: int = 0,
              margin: float = MARGIN) -> KVScales:
    """Run ``windows`` through the float-cache ``graph`` (each from an empty cache) and
    return the scales that map each channel's largest magnitude, times ``margin``, to 127."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])
    kv_type = {i.name: i.type for i in session.get_inputs()}["past_key_values.0.key"]
    if kv_type not in ("tensor(float)", "tensor(float16)"):
        raise ValueError(f"{graph} already has a {kv_type} KV cache: calibrate the float graph")
    dtype = np.float32 if kv_type == "tensor(float)" else np.float16
    layers, channels = arch.num_layers, arch.num_kv_heads * arch.head_dim
    absmax = np.zeros((2, layers, channels), dtype=np.float32)
    outputs = [f"present.{i}.{kind}" for kind in ("key", "value") for i in range(layers)]
    for ids in windows:
        n = len(ids)
        empty = np.zeros((1, arch.num_kv_heads, 0, arch.head_dim), dtype=dtype)  # a first prompt: no past
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64), "seqlens_k": np.array([n - 1], dtype=np.int32),
                 "total_sequence_length": np.array(n, dtype=np.int32)}
        for i in range(layers):
            feeds[f"past_key_values.{i}.key"] = empty
            feeds[f"past_key_values.{i}.value"] = empty
        presents = session.run(outputs, feeds)
        for j, present in enumerate(presents):  # [1, kv_heads, n, head_dim] -> per channel (head, dim)
            kind, layer = divmod(j, layers)
            peak = np.abs(present[0, :, :n].astype(np.float32)).max(axis=1).reshape(-1)
            np.maximum(absmax[kind, layer], peak, out=absmax[kind, layer])
    scale = np.maximum(absmax * margin, np.finfo(np.float32).tiny) / 127.0
    return KVScales(key=scale[0], value=scale[1], margin=margin)


def quantize_graph_kv_cache(graph: Path, scales: KVScales) -> None:
    """Rewrite ``graph`` (its proto; the external weights stay) to keep an int8 KV cache
    with ``scales``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(graph), load_external_data=False)
    cache_io = [v for v in (*model.graph.input, *model.graph.output)
                if v.name.startswith(("past_key_values.", "present."))]
    if not cache_io:
        raise ValueError(f"{graph} has no past/present KV inputs")
    if any(v.type.tensor_type.elem_type == TensorProto.INT8 for v in cache_io):
        raise ValueError(f"{graph} already keeps an int8 KV cache")
    for v in cache_io:
        v.type.tensor_type.elem_type = TensorProto.INT8
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if len(nodes) != scales.key.shape[0]:
        raise ValueError(f"{graph} has {len(nodes)} GroupQueryAttention nodes, the scales {scales.key.shape[0]} layers")
    for layer, node in enumerate(nodes):
        names = (f"kv_cache.{layer}.key_scale", f"kv_cache.{layer}.value_scale")
        model.graph.initializer.extend([numpy_helper.from_array(scales.key[layer].astype(np.float32), names[0]),
                                        numpy_helper.from_array(scales.value[layer].astype(np.float32), names[1])])
        inputs = list(node.input) + [""] * (GQA_VALUE_SCALE_INPUT + 1 - len(node.input))
        inputs[GQA_KEY_SCALE_INPUT], inputs[GQA_VALUE_SCALE_INPUT] = names
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend([helper.make_attribute("kv_cache_bit_width", 8),
                               helper.make_attribute("k_quant_type", QUANT_TYPE),
                               helper.make_attribute("v_quant_type", QUANT_TYPE)])
    onnx.save_model(model, str(graph))
