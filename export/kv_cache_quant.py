"""An int8 KV cache for the `gqa-shared-kv` graph: calibrate, then rewrite the graph.

At long contexts a decode step reads the whole KV cache once per layer: at 2048
tokens of an 8-layer, 2048-wide model that is 268 MB in float32, nearly as much as
its int4 weights (329 MB), and GroupQueryAttention is 43 % of the step's kernel time
on two CPU cores (``benchmarks/op_profile.py``; 27 % with the int8 cache). onnxruntime's CPU GroupQueryAttention (1.32+)
reads and writes an int8 cache itself (``kv_cache_bit_width=8``,
``k_quant_type``/``v_quant_type``, static ``k_scale``/``v_scale`` inputs): the
stored code is ``round(x / scale)``, one scale per channel (kv head x head dim)
of the rotated keys and of the values.

Prompts are not slowed: onnxruntime's int8 path for more than one new token is several
times slower than its float attention, so each layer's attention is an If on the number
of new tokens (``_prompt_or_step``): a prompt (or a chunk of one) attends in float over
the dequantized cache and writes the codes the int8 kernel would write; a decode step, and a
follow-up of up to INT8_STEP_ROWS_MAX new tokens after cached ones (the prompt cache's short
rests), runs the int8 kernel in place. A first prompt's logits (one chunk) equal the
float-cache graph's.

The scales are static, so they are calibrated: the float-cache graph the
builder just wrote runs a calibration text (``assets/kv-calibration.txt``, not the
fidelity corpus), one decoder layer at a time so that memory holds one layer's
weights (``calibrate``), and each layer's largest |key| and |value| per channel,
times ``margin``, maps to 127. Then the graph is rewritten in place: past/present
inputs and outputs become int8, each GroupQueryAttention node becomes the If above
with its layer's scales (inline initializers). The weights (external data) are
untouched. The export's fidelity step then measures the result
against torch like any other bundle.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.bundle import Architecture
from edge_runtime.native_paths import native_path
from edge_runtime.gqa_decoder import (INT8_STEP_ROWS_MAX, META_INT8_KERNEL_ROWS, META_PROMPT_PRESENT,
                                     PROMPT_PRESENT_NEW_ROWS)

CALIBRATION_TEXT = Path(__file__).resolve().parent / "assets" / "kv-calibration.txt"
CALIBRATION_WINDOW = 512  # positions per calibration run (BOS first)
MARGIN = 1.3  # headroom over the calibrated range: values beyond it saturate (codes -128..127)
QUANT_TYPE = "PER_CHANNEL"
PROMPT_ATTENTION = "float"  # prompts attend in float over the dequantized cache (`_prompt_or_step`)
REWRITE_REVISION = 5  # bumped when quantize_graph_kv_cache writes a different graph (benchmarks' cache stamps)
GQA_KEY_SCALE_INPUT, GQA_VALUE_SCALE_INPUT = 12, 13  # GroupQueryAttention's k_scale / v_scale inputs


@dataclass(frozen=True)
class KVScales:
    """Per layer, the dequantization scale of each key and value channel: [layers, kv_heads * head_dim]."""

    key: np.ndarray
    value: np.ndarray
    margin: float = MARGIN  # the headroom the scales were calibrated with

    def as_manifest(self) -> dict:
        return {"dtype": "int8", "quant_type": QUANT_TYPE.lower().replace("_", "-"), "margin": self.margin,
                "prompt_attention": PROMPT_ATTENTION,
                # up to this many new rows after cached ones run the int8 kernel, as decode steps do
                "int8_kernel_rows_after_cache": INT8_STEP_ROWS_MAX,
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


def layer_parts(model) -> list[list]:
    """The graph's nodes a decoder layer at a time: the nodes before the first layer (the
    embedding), then each layer's (named ``/model/layers.{i}/...``); the head is left out."""
    layer_of = re.compile(r"/model/layers\.(\d+)/")
    parts: list[list] = [[]]
    for node in model.graph.node:
        m = layer_of.match(node.name)
        if m is None:
            if len(parts) > 1:
                break  # the head: final norm, lm_head
            parts[0].append(node)
            continue
        layer = int(m[1])
        while len(parts) < layer + 2:
            parts.append([])
        parts[layer + 1].append(node)
    return parts


def _part_model(model, nodes: list, read_later: set[str], elem_type: int):
    """A model of `nodes` alone: inputs are what they read and do not make (graph inputs or an
    earlier part's outputs), outputs what they make that is in `read_later` (what later parts
    read, and the graph's outputs, present.{i}.* among them).
    Initializers keep their external-data references, so a session loads only this part's."""
    from onnx import helper

    made = {o for n in nodes for o in n.output if o}
    read = [i for n in nodes for i in n.input if i]
    inits = {t.name: t for t in model.graph.initializer}
    graph_inputs = {i.name: i for i in model.graph.input}
    inputs, seen = [], set()
    for name in read:
        if name in made or name in inits or name in seen:
            continue
        seen.add(name)
        inputs.append(graph_inputs[name] if name in graph_inputs
                      else helper.make_tensor_value_info(name, elem_type, None))
    outputs = [helper.make_tensor_value_info(o, elem_type, None)
               for n in nodes for o in n.output if o and o in read_later]
    graph = helper.make_graph(nodes, "part", inputs, outputs,
                              [inits[name] for name in dict.fromkeys(read) if name in inits])
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def calibrate(graph: Path, arch: Architecture, windows: Sequence[Sequence[int]], *, threads: int = 0,
              margin: float = MARGIN) -> KVScales:
    """Run ``windows`` through the float-cache ``graph`` (each from an empty cache) and
    return the scales that map each channel's largest magnitude, times ``margin``, to 127.

    The graph runs a layer at a time (``layer_parts``): one session per layer, holding that
    layer's weights alone, fed the previous layer's outputs for every window. The same
    kernels see the same inputs as in the whole graph, so the scales are the whole graph's,
    and the memory is a layer's: a 7B's export peaks at 697 MiB, 6.9 GiB with the whole graph
    in one session (docs/performance.md: Benchmarks)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(graph), load_external_data=False)
    kv_input = next(i for i in model.graph.input if i.name == "past_key_values.0.key")
    elem_type = kv_input.type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    if dtype not in (np.float32, np.float16):
        raise ValueError(f"{graph} already has a tensor({np.dtype(dtype).name}) KV cache: calibrate the float graph")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    layers, channels = arch.num_layers, arch.num_kv_heads * arch.head_dim
    absmax = np.zeros((2, layers, channels), dtype=np.float32)
    empty = np.zeros((1, arch.num_kv_heads, 0, arch.head_dim), dtype=dtype)  # a first prompt: no past
    # per window, the tensors the parts so far made (and the graph's inputs)
    carried = [{"input_ids": np.asarray([ids], dtype=np.int64),
                "seqlens_k": np.array([len(ids) - 1], dtype=np.int32),
                "total_sequence_length": np.array(len(ids), dtype=np.int32),
                **{f"past_key_values.{i}.{kind}": empty for i in range(layers) for kind in ("key", "value")}}
               for ids in windows]
    parts = layer_parts(model)
    if len(parts) != layers + 1:
        raise ValueError(f"{graph}: found {len(parts) - 1} decoder layers by node name, the architecture has {layers}")
    read_by = [{i for n in part for i in n.input if i} for part in parts]
    for index, nodes in enumerate(parts):
        later = set().union(*read_by[index + 1:]) | {o.name for o in model.graph.output}
        part = _part_model(model, nodes, later, elem_type)
        path = graph.with_name(f".kv-calibration-part{index}.onnx")  # beside the data it references
        onnx.save(part, str(path))
        try:
            session = ort.InferenceSession(native_path(path) or str(path), sess_options=options,
                                           providers=["CPUExecutionProvider"])
        finally:
            path.unlink()
        names = [o.name for o in session.get_outputs()]
        wanted = {i.name for i in session.get_inputs()}
        for feeds in carried:
            n = int(feeds["total_sequence_length"])
            for name, value in zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})):
                if name.startswith("present."):  # [1, kv_heads, n, head_dim] -> per channel (head, dim)
                    layer, kind = int(name.split(".")[1]), name.split(".")[2]
                    peak = np.abs(value[0, :, :n].astype(np.float32)).max(axis=1).reshape(-1)
                    target = absmax[0 if kind == "key" else 1, layer]
                    np.maximum(target, peak, out=target)
                else:
                    feeds[name] = value
        for feeds in carried:  # what no later part reads goes
            for name in [k for k in feeds if k not in later]:
                del feeds[name]
        del session
    scale = np.maximum(absmax * margin, np.finfo(np.float32).tiny) / 127.0
    return KVScales(key=scale[0], value=scale[1], margin=margin)


def quantize_graph_kv_cache(graph: Path, scales: KVScales) -> None:
    """Rewrite ``graph`` (its proto; the external weights stay) to keep an int8 KV cache
    with ``scales``; prompts keep float attention (`_prompt_or_step`)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(graph), load_external_data=False)
    cache_io = [v for v in (*model.graph.input, *model.graph.output)
                if v.name.startswith(("past_key_values.", "present."))]
    if not cache_io:
        raise ValueError(f"{graph} has no past/present KV inputs")
    if any(v.type.tensor_type.elem_type == TensorProto.INT8 for v in cache_io):
        raise ValueError(f"{graph} already keeps an int8 KV cache")
    float_type = cache_io[0].type.tensor_type.elem_type  # the activations' (and the old cache's) type
    for v in cache_io:
        v.type.tensor_type.elem_type = TensorProto.INT8
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if len(nodes) != scales.key.shape[0]:
        raise ValueError(f"{graph} has {len(nodes)} GroupQueryAttention nodes, the scales {scales.key.shape[0]} layers")
    max_length = _graph_max_length(model)
    float_dtype = onnx.helper.tensor_dtype_to_np_dtype(float_type)
    heads = _attribute(nodes[0], "kv_num_heads").i
    bhsd = (1, heads, 1, scales.key.shape[1] // heads)  # a scale per channel, broadcast over the rows
    model.graph.initializer.extend(_shared_constants(bhsd))
    rewritten = [*_prompt_condition_nodes()]
    for node in list(model.graph.node):
        if node.op_type != "GroupQueryAttention":
            rewritten.append(node)
            continue
        layer = nodes.index(node)
        names = (f"kv_cache.{layer}.key_scale", f"kv_cache.{layer}.value_scale")
        for name, scale in zip(names, (scales.key[layer], scales.value[layer])):
            model.graph.initializer.extend([  # GroupQueryAttention's [kv_heads * head_dim], the prompt's bhsd
                numpy_helper.from_array(scale.astype(np.float32), name),
                numpy_helper.from_array(scale.reshape(bhsd).astype(float_dtype), name + ".bhsd")])
        rewritten.append(_prompt_or_step(node, names, float_type, max_length))
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    # how the decoder binds a run's present outputs (edge_runtime/gqa_decoder.py): the prompt
    # branch returns the new rows' codes alone, which branch runs follows from these rows
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        META_PROMPT_PRESENT: PROMPT_PRESENT_NEW_ROWS,
                                        META_INT8_KERNEL_ROWS: str(INT8_STEP_ROWS_MAX)})
    onnx.save_model(model, str(graph))


# -- prompts: float attention over the int8 cache ---------------------------------------------
#
# onnxruntime's int8 GroupQueryAttention is quick for one new token but several times
# slower than the float kernel for a prompt (prefill of 2048 tokens 25 % slower on the
# benchmark model, attention alone 4x). So each layer's attention becomes an If on the
# number of new tokens S:
#
# * S == 1 (a decode step), or 1 < S <= INT8_STEP_ROWS_MAX after P > 0 cached rows (a short
#   follow-up: a chat's next question over the kept conversation, an editor's keystroke;
#   see the engine's prompt cache): the int8 GroupQueryAttention, reading and writing the
#   shared int8 buffers in place (the If's outputs are the bound buffers: nothing is
#   copied).
# * otherwise (a first prompt, or a longer chunk): the float GroupQueryAttention over the
#   P = total - S cached rows dequantized (codes x scale); the S new rows of its float
#   present are quantized as the int8 kernel does (x / scale rounded half to even,
#   clipped to [-128, 127]) and are the branch's present outputs, [1, kv_heads, S,
#   head_dim]: the decoder binds those outputs to arrays of that shape for such a run and
#   copies the rows into its buffers at [P, total) (the graph's metadata says so:
#   META_PROMPT_PRESENT, gqa_decoder.py). Until revision 4 the branch appended them to the
#   P cached codes and zero-padded the result to the buffer's length, the If's output
#   bound to the buffer itself: every prompt wrote the whole max-length buffer of every
#   layer (at 4096 positions 128 MiB on the peers benchmark's model) and made all its pages
#   resident (docs/performance.md has the time it took).
#
# A first prompt's logits are then the float cache's exactly; decode steps read the
# same codes the int8 kernel would have written. The float branch costs a dequantized
# copy of the whole past, whatever S. `python benchmarks/int8_follow_up.py --bundle
# ~/.cache/edge-runtime/peers-bench/edge-runtime --repeats 5` (the peers benchmark's model,
# 8 layers, hidden 2048, 2 threads) times both paths for S new rows after P cached: float
# branch / int8 kernel, S = 8: 98 / 69 ms (P = 100), 108 / 85 (P = 500), 268 / 110 (P = 1900);
# S = 32: 230 / 218, 260 / 272, 446 / 364; S = 64 and 100 within 10 % either way (three
# runs disagreed on which wins). So the kernel takes up to 32 rows.

PROMPT_CONDITION = "kv_cache.prompt"  # bool [1]: the float branch (a first prompt, or over INT8_STEP_ROWS_MAX rows)
NEW_ROWS = "kv_cache.new_rows"  # int64 [1]: S
TOTAL = "kv_cache.total"  # int64 scalar: total_sequence_length


def _graph_max_length(model) -> int:
    from .graph_builder import META_MAX_LENGTH

    value = {p.key: p.value for p in model.metadata_props}.get(META_MAX_LENGTH)
    if not value:
        raise ValueError(f"the graph does not record its maximum length ({META_MAX_LENGTH})")
    return int(value)


def _attribute(node, name: str):
    return next(a for a in node.attribute if a.name == name)


def _shared_constants(bhsd: tuple[int, int, int, int]) -> list:
    """The constants every layer's If reads (outer-scope initializers)."""
    from onnx import numpy_helper

    return [numpy_helper.from_array(np.array([1], np.int64), "kv_cache.one"),
            numpy_helper.from_array(np.array([0], np.int64), "kv_cache.zero"),
            numpy_helper.from_array(np.array([2], np.int64), "kv_cache.seq_axis"),
            numpy_helper.from_array(np.array([INT8_STEP_ROWS_MAX], np.int64), "kv_cache.step_rows_max"),
            numpy_helper.from_array(np.zeros(bhsd, np.int8), "kv_cache.zero_points")]


def _prompt_condition_nodes() -> list:
    from onnx import TensorProto, helper

    # all a decode step adds: five scalar nodes and the Ifs (the rest is in the prompt branch).
    # float branch: S > (1 for a first prompt -- total == S, no past -- else INT8_STEP_ROWS_MAX)
    return [helper.make_node("Shape", ["input_ids"], [NEW_ROWS], start=1, end=2),
            helper.make_node("Cast", ["total_sequence_length"], [TOTAL], to=TensorProto.INT64),
            helper.make_node("Equal", [TOTAL, NEW_ROWS], ["kv_cache.first_prompt"]),
            helper.make_node("Where", ["kv_cache.first_prompt", "kv_cache.one", "kv_cache.step_rows_max"],
                             ["kv_cache.float_above"]),
            helper.make_node("Greater", [NEW_ROWS, "kv_cache.float_above"], [PROMPT_CONDITION])]


def _prompt_or_step(node, scale_names: tuple[str, str], float_type: int, max_length: int):
    """``node`` (a float GroupQueryAttention) as If(prompt: float attention, requantized;
    else: the int8 kernel)."""
    import copy

    from onnx import TensorProto, helper

    name = node.name or node.output[0]
    out, present_key, present_value = node.output
    past_key, past_value = node.input[3], node.input[4]

    step = copy.deepcopy(node)
    inputs = list(step.input) + [""] * (GQA_VALUE_SCALE_INPUT + 1 - len(step.input))
    inputs[GQA_KEY_SCALE_INPUT], inputs[GQA_VALUE_SCALE_INPUT] = scale_names
    del step.input[:]
    step.input.extend(inputs)
    step.attribute.extend([helper.make_attribute("kv_cache_bit_width", 8),
                           helper.make_attribute("k_quant_type", QUANT_TYPE),
                           helper.make_attribute("v_quant_type", QUANT_TYPE)])
    step_outputs = [f"{name}/int8/{o}" for o in ("output", "present_key", "present_value")]
    step.name = f"{name}/int8"
    del step.output[:]
    step.output.extend(step_outputs)

    p = f"{name}/prompt"
    # one block along the sequence axis: the scale [1, kv_heads, 1, head_dim] covers every row
    per_channel = {"axis": 2, "block_size": max_length}
    total_rows, past_rows = f"{p}/total_rows", f"{p}/past_rows"  # int64 [1]: total and P = total - S
    prompt_nodes = [helper.make_node("Reshape", [TOTAL, "kv_cache.one"], [total_rows]),  # TOTAL: the outer graph's
                    helper.make_node("Sub", [total_rows, NEW_ROWS], [past_rows])]
    for kind, past, scale in (("key", past_key, scale_names[0]), ("value", past_value, scale_names[1])):
        prompt_nodes += [
            helper.make_node("Slice", [past, "kv_cache.zero", past_rows, "kv_cache.seq_axis"], [f"{p}/{kind}/codes"]),
            # (not DequantizeLinear: its one block cannot cover zero rows, a first prompt's past)
            helper.make_node("Cast", [f"{p}/{kind}/codes"], [f"{p}/{kind}/codes_f"], to=float_type),
            helper.make_node("Mul", [f"{p}/{kind}/codes_f", scale + ".bhsd"], [f"{p}/{kind}/past"])]
    attend = copy.deepcopy(node)
    attend.name = f"{p}/attention"
    attend.input[3], attend.input[4] = f"{p}/key/past", f"{p}/value/past"
    del attend.output[:]
    attend.output.extend([f"{p}/output", f"{p}/key/present", f"{p}/value/present"])
    prompt_nodes.append(attend)
    prompt_outputs = [f"{p}/output"]
    for kind, past, scale in (("key", past_key, scale_names[0]), ("value", past_value, scale_names[1])):
        prompt_nodes += [
            helper.make_node("Slice", [f"{p}/{kind}/present", past_rows, total_rows, "kv_cache.seq_axis"],
                             [f"{p}/{kind}/new"]),
            # the S new rows' codes only, [1, kv_heads, S, head_dim]: the decoder copies them into
            # its buffer (META_PROMPT_PRESENT), no full-length buffer is written
            helper.make_node("QuantizeLinear", [f"{p}/{kind}/new", scale + ".bhsd", "kv_cache.zero_points"],
                             [f"{p}/{kind}/new_codes"], **per_channel)]
        prompt_outputs.append(f"{p}/{kind}/new_codes")

    types = (float_type, TensorProto.INT8, TensorProto.INT8)
    prompt = helper.make_graph(prompt_nodes, f"{p}", [],
                               [helper.make_tensor_value_info(o, t, None) for o, t in zip(prompt_outputs, types)])
    decode = helper.make_graph([step], f"{name}/step", [],
                               [helper.make_tensor_value_info(o, t, None) for o, t in zip(step_outputs, types)])
    return helper.make_node("If", [PROMPT_CONDITION], [out, present_key, present_value], name=f"{name}/If",
                            then_branch=prompt, else_branch=decode)
