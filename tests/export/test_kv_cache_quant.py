"""The int8 KV cache of the fused graph: calibrated scales, the rewritten graph, and what
onnxruntime then stores -- checked against the float graph's own cache."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest

from edge_export import kv_cache_quant
from edge_export.checkpoint import read_checkpoint
from edge_export.graph_builder import build_decoder_graph
from edge_runtime.gqa_decoder import INT8_STEP_ROWS_MAX, META_INT8_KERNEL_ROWS, META_PROMPT_PRESENT, host_rows
from edge_runtime.tokenizer import CodeLlamaTokenizer


@pytest.fixture(scope="module")
def float_graph(tiny_checkpoint, tmp_path_factory):
    info = read_checkpoint(tiny_checkpoint)
    graph = tmp_path_factory.mktemp("kv") / "model.onnx"
    build_decoder_graph(info, graph, precision="int4", block_size=32, symmetric=True, accuracy_level=4,
                        max_length=256)
    return info, graph


def presents(graph, arch, ids, dtype, session=None):
    """present.{i}.key/value of a first prompt (no past), as [layers] lists of [kv_heads, S, head_dim]."""
    session = session or ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    n = len(ids)
    feeds = {"input_ids": np.asarray([ids], dtype=np.int64), "seqlens_k": np.array([n - 1], dtype=np.int32),
             "total_sequence_length": np.array(n, dtype=np.int32)}
    for i in range(arch.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, arch.num_kv_heads, 0, arch.head_dim), dtype=dtype)
    names = [f"present.{i}.{kind}" for kind in ("key", "value") for i in range(arch.num_layers)]
    out = session.run(names, feeds)
    return out[:arch.num_layers], out[arch.num_layers:]


def whole_graph_scales(graph, arch, windows, margin=kv_cache_quant.MARGIN):
    """The reference: every window through the whole graph in one session, each layer's
    largest |present key| and |present value| per channel, times the margin, over 127."""
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    absmax = np.zeros((2, arch.num_layers, arch.num_kv_heads * arch.head_dim), dtype=np.float32)
    kv_type = {i.name: i.type for i in session.get_inputs()}["past_key_values.0.key"]
    dtype = np.float16 if kv_type == "tensor(float16)" else np.float32
    for ids in windows:
        keys, values = presents(graph, arch, ids, dtype, session=session)
        for kind, tensors in enumerate((keys, values)):
            for layer, present in enumerate(tensors):
                peak = np.abs(present[0].astype(np.float32)).max(axis=1).reshape(-1)
                np.maximum(absmax[kind, layer], peak, out=absmax[kind, layer])
    scale = np.maximum(absmax * margin, np.finfo(np.float32).tiny) / 127.0
    return scale[0], scale[1]


@pytest.mark.parametrize("precision", ["int4", "fp16"])
def test_calibration_a_layer_at_a_time_gives_the_whole_graphs_scales(tiny_checkpoint, tmp_path, precision):
    """calibrate() runs one session per layer (a layer's weights in memory, not the graph's):
    the same kernels on the same inputs, so the very scales of the whole graph's run."""
    info = read_checkpoint(tiny_checkpoint)
    graph = tmp_path / "model.onnx"
    build_decoder_graph(info, graph, precision=precision, block_size=32, symmetric=True, accuracy_level=4,
                        max_length=256)
    windows = kv_cache_quant.calibration_windows(CodeLlamaTokenizer.from_file(info.tokenizer_path), 128)
    scales = kv_cache_quant.calibrate(graph, info.architecture, windows)
    key, value = whole_graph_scales(graph, info.architecture, windows)
    np.testing.assert_array_equal(scales.key, key)
    np.testing.assert_array_equal(scales.value, value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # no part left behind


def test_calibration_refuses_a_graph_whose_layers_do_not_match_the_architecture(float_graph):
    import dataclasses

    info, graph = float_graph
    wrong = dataclasses.replace(info.architecture, num_layers=info.architecture.num_layers + 1)
    with pytest.raises(ValueError, match="found 2 decoder layers by node name, the architecture has 3"):
        kv_cache_quant.calibrate(graph, wrong, [[1, 2, 3]])


def test_calibrated_scales_cover_the_calibration_text_with_the_margin(float_graph):
    info, graph = float_graph
    tokenizer = CodeLlamaTokenizer.from_file(info.tokenizer_path)
    windows = kv_cache_quant.calibration_windows(tokenizer, 128)
    assert sum(len(w) for w in windows) > 900 and all(w[0] == tokenizer.bos_id for w in windows)
    scales = kv_cache_quant.calibrate(graph, info.architecture, windows)
    channels = info.architecture.num_kv_heads * info.architecture.head_dim
    assert scales.key.shape == scales.value.shape == (info.architecture.num_layers, channels)
    keys, values = presents(graph, info.architecture, windows[0], np.float32)
    for layer in range(info.architecture.num_layers):
        for present, scale in ((keys[layer], scales.key[layer]), (values[layer], scales.value[layer])):
            codes = present[0].transpose(1, 0, 2).reshape(len(windows[0]), channels) / scale
            # the largest value of the text maps to 127 / margin: nothing saturates on it
            assert np.abs(codes).max() <= 127 / kv_cache_quant.MARGIN + 1e-3
    # the manifest records the headroom the scales were made with
    wider = kv_cache_quant.calibrate(graph, info.architecture, windows, margin=2.0)
    assert wider.as_manifest()["margin"] == 2.0 and scales.as_manifest()["margin"] == kv_cache_quant.MARGIN
    np.testing.assert_allclose(wider.key, scales.key * 2.0 / kv_cache_quant.MARGIN, rtol=1e-5)


def test_int8_graph_stores_the_float_cache_rounded_against_its_scales(float_graph, tmp_path):
    info, graph = float_graph
    arch = info.architecture
    tokenizer = CodeLlamaTokenizer.from_file(info.tokenizer_path)
    scales = kv_cache_quant.calibrate(graph, arch, kv_cache_quant.calibration_windows(tokenizer, 128))
    int8_graph = tmp_path / "model.onnx"
    shutil.copy(graph, int8_graph)
    shutil.copy(graph.with_name("model.onnx.data"), tmp_path / "model.onnx.data")
    kv_cache_quant.quantize_graph_kv_cache(int8_graph, scales)

    session = ort.InferenceSession(str(int8_graph), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in session.get_inputs()}
    assert types["past_key_values.0.key"] == "tensor(int8)" and types["input_ids"] == "tensor(int64)"

    ids = [tokenizer.bos_id, *tokenizer.encode("def mean(values):\n    return sum(values) / len(values)\n")]
    float_keys, float_values = presents(graph, arch, ids, np.float32)
    int8_keys, int8_values = presents(int8_graph, arch, ids, np.int8)
    # layer 0 sees the same input in both graphs: its codes are the float cache / scale, rounded
    for got, ref, scale in ((int8_keys[0], float_keys[0], scales.key[0]),
                            (int8_values[0], float_values[0], scales.value[0])):
        expected = np.clip(np.rint(ref / scale.reshape(1, arch.num_kv_heads, 1, arch.head_dim)), -127, 127)
        assert got.dtype == np.int8
        assert np.abs(got.astype(np.int32) - expected).max() <= 1  # a tie may round either way
        assert np.mean(got == expected) > 0.99


def test_rewrite_refuses_scales_for_another_layer_count_and_calibration_an_int8_graph(float_graph, tmp_path):
    info, graph = float_graph
    arch = info.architecture
    channels = arch.num_kv_heads * arch.head_dim
    wrong = kv_cache_quant.KVScales(key=np.ones((arch.num_layers + 1, channels), np.float32),
                                    value=np.ones((arch.num_layers + 1, channels), np.float32))
    before = graph.read_bytes()
    with pytest.raises(ValueError, match="GroupQueryAttention nodes"):
        kv_cache_quant.quantize_graph_kv_cache(graph, wrong)
    assert graph.read_bytes() == before

    copy = tmp_path / "model.onnx"
    shutil.copy(graph, copy)
    shutil.copy(graph.with_name("model.onnx.data"), tmp_path / "model.onnx.data")
    right = kv_cache_quant.KVScales(key=np.ones((arch.num_layers, channels), np.float32),
                                    value=np.ones((arch.num_layers, channels), np.float32))
    kv_cache_quant.quantize_graph_kv_cache(copy, right)
    with pytest.raises(ValueError, match="already has a tensor\\(int8\\) KV cache"):
        kv_cache_quant.calibrate(copy, arch, [[1, 2, 3]])
    with pytest.raises(ValueError, match="already keeps an int8 KV cache"):
        kv_cache_quant.quantize_graph_kv_cache(copy, right)


# -- prompts attend in float over the int8 cache ------------------------------------------------
MAX_LENGTH = 256


def shared_decoder(graph, arch, prefill_chunk=None):
    """The engine's decoder over ``graph``: one shared KV buffer per layer, bound once."""
    from edge_runtime.gqa_decoder import SharedKVDecoder

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return SharedKVDecoder(ort, session, arch, device="cpu", max_length=MAX_LENGTH, prefill_chunk=prefill_chunk)


def cache_rows(decoder, cache, layer, kind, rows):
    """[kv_heads, rows, head_dim] of the decoder's buffer (kind 0 keys, 1 values)."""
    buffer = cache.buffers[layer][kind]
    shape = (decoder.arch.num_kv_heads, decoder.max_length, decoder.arch.head_dim)
    return host_rows(buffer, decoder.kv_dtype, shape)[:, :rows].copy()


@pytest.fixture(scope="module")
def int8_case(float_graph, tmp_path_factory):
    info, graph = float_graph
    arch = info.architecture
    tokenizer = CodeLlamaTokenizer.from_file(info.tokenizer_path)
    scales = kv_cache_quant.calibrate(graph, arch, kv_cache_quant.calibration_windows(tokenizer, 128))
    int8_graph = tmp_path_factory.mktemp("kv8") / "model.onnx"
    shutil.copy(graph, int8_graph)
    shutil.copy(graph.with_name("model.onnx.data"), int8_graph.with_name("model.onnx.data"))
    kv_cache_quant.quantize_graph_kv_cache(int8_graph, scales)
    ids = np.asarray([tokenizer.bos_id, *tokenizer.encode(
        "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n"
        "    return total / len(values)\n\n\ndef median(values):\n    ordered = sorted(values)\n")])
    return arch, scales, graph, int8_graph, ids


def quantized(values, scale, arch):
    """What onnxruntime's int8 kernel stores: x / scale rounded half to even, clipped to int8."""
    return np.clip(np.rint(values / scale.reshape(arch.num_kv_heads, 1, arch.head_dim)), -128, 127)


def test_a_prompt_through_the_int8_cache_gets_the_float_cache_logits_and_codes(int8_case):
    """A first prompt attends in float: its logits are the float-cache graph's, and every
    layer's cache holds that graph's keys and values quantized as the int8 kernel does."""
    arch, scales, float_graph_path, int8_graph, ids = int8_case
    f32, i8 = shared_decoder(float_graph_path, arch), shared_decoder(int8_graph, arch)
    f_cache, i_cache = f32.new_cache(MAX_LENGTH), i8.new_cache(MAX_LENGTH)
    np.testing.assert_allclose(i8.prefill(i_cache, ids), f32.prefill(f_cache, ids), rtol=0, atol=1e-5)
    n = len(ids)
    for layer in range(arch.num_layers):
        for kind, scale in ((0, scales.key[layer]), (1, scales.value[layer])):
            codes = cache_rows(i8, i_cache, layer, kind, n)
            expected = quantized(cache_rows(f32, f_cache, layer, kind, n), scale, arch)
            assert codes.dtype == np.int8
            assert np.abs(codes.astype(np.int32) - expected).max() <= 1  # x / scale may round a tie apart
            assert np.mean(codes == expected) > 0.999


def kernel_only_graph(int8_graph, folder):
    """The int8 graph with each layer's If replaced by its else branch: onnxruntime's int8 kernel alone."""
    import onnx

    model = onnx.load(str(int8_graph), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "If":
            step = next(a.g for a in node.attribute if a.name == "else_branch").node[0]
            step.output[:] = node.output
            node.CopyFrom(step)
    # no prompt branch: a run's present outputs are the buffers, whatever it holds
    return save_with_weights(model, int8_graph, folder, drop_metadata=(META_PROMPT_PRESENT,))


def save_with_weights(model, int8_graph, folder, *, drop_metadata):
    """`model` (a rewrite of `int8_graph`) saved in `folder` beside a copy of its weights,
    without the metadata keys `drop_metadata`."""
    import onnx

    kept = [p for p in model.metadata_props if p.key not in drop_metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save_model(model, str(folder / "model.onnx"))
    shutil.copy(int8_graph.with_name("model.onnx.data"), folder / "model.onnx.data")
    return folder / "model.onnx"


def test_decode_steps_after_a_prompt_use_the_int8_kernel(int8_case, tmp_path):
    """The prompt branch writes the codes onnxruntime's int8 kernel writes, and single tokens
    go through that kernel: the graph rewritten without the prompt branch (the kernel alone)
    stores the same layer-0 codes for the prompt (layer 0's input does not depend on
    attention) and gives the same decode logits once both caches hold the same prompt codes."""
    arch, scales, _, int8_graph, ids = int8_case
    a, b = shared_decoder(int8_graph, arch), shared_decoder(kernel_only_graph(int8_graph, tmp_path), arch)
    a_cache, b_cache = a.new_cache(MAX_LENGTH), b.new_cache(MAX_LENGTH)
    a.prefill(a_cache, ids)
    b.prefill(b_cache, ids)  # onnxruntime's int8 kernel on the whole prompt
    for kind in (0, 1):
        ours, kernel = cache_rows(a, a_cache, 0, kind, len(ids)), cache_rows(b, b_cache, 0, kind, len(ids))
        assert np.abs(ours.astype(np.int32) - kernel).max() <= 1  # x / scale may round a tie apart
        assert np.mean(ours == kernel) > 0.999
    for layer in range(arch.num_layers):  # the kernel-only graph gets the prompt's codes as they are
        for kind in (0, 1):
            src = cache_rows(a, a_cache, layer, kind, MAX_LENGTH)
            dst = host_rows(b_cache.buffers[layer][kind], b.kv_dtype,
                             (arch.num_kv_heads, MAX_LENGTH, arch.head_dim))
            dst[...] = src
    for token in (13, 1678, 736):
        np.testing.assert_allclose(a.decode(a_cache, token), b.decode(b_cache, token), rtol=0, atol=1e-5)


def test_a_prompt_in_chunks_attends_over_the_dequantized_cache(int8_case):
    """Chunks after the first attend over the cache as stored (dequantized codes): layer 0's
    codes (its input does not depend on attention) equal the whole prompt's, and the last
    position's logits stay close to the float cache's."""
    arch, _, float_graph_path, int8_graph, ids = int8_case
    # chunks longer than INT8_STEP_ROWS_MAX (shorter ones after the first go through the int8 kernel: below)
    chunk = INT8_STEP_ROWS_MAX + 1
    ids = np.concatenate([ids, ids[1:], ids[1:]])[:3 * chunk]
    whole, chunked = shared_decoder(int8_graph, arch), shared_decoder(int8_graph, arch, prefill_chunk=chunk)
    w_cache, c_cache = whole.new_cache(MAX_LENGTH), chunked.new_cache(MAX_LENGTH)
    w_logits, c_logits = whole.prefill(w_cache, ids), chunked.prefill(c_cache, ids)
    assert c_cache.length == w_cache.length == len(ids)
    for kind in (0, 1):
        np.testing.assert_array_equal(cache_rows(chunked, c_cache, 0, kind, len(ids)),
                                      cache_rows(whole, w_cache, 0, kind, len(ids)))
    f32 = shared_decoder(float_graph_path, arch)
    f_logits = f32.prefill(f32.new_cache(MAX_LENGTH), ids)
    spread = float(f_logits.max() - f_logits.min())
    assert np.abs(c_logits - f_logits).max() < 0.05 * spread
    assert not np.array_equal(c_logits, w_logits)  # the chunks did read codes, not floats
    # and the continuation is the one the whole prompt gives
    w_next = [int(np.argmax(whole.decode(w_cache, t))) for t in (13, 1678)]
    c_next = [int(np.argmax(chunked.decode(c_cache, t))) for t in (13, 1678)]
    assert w_next == c_next


def test_a_short_follow_up_goes_through_the_int8_kernel_and_a_short_first_prompt_does_not(int8_case, tmp_path):
    """After cached rows, up to INT8_STEP_ROWS_MAX new ones (a chat's next question, an editor's
    keystroke, over the prompt cache) run the int8 kernel in place, as the kernel-only graph
    does, instead of dequantizing the whole past; a first prompt, however short, attends in
    float and gets the float cache's logits."""
    arch, _, float_graph_path, int8_graph, ids = int8_case
    ours, kernel = shared_decoder(int8_graph, arch), shared_decoder(kernel_only_graph(int8_graph, tmp_path), arch)
    f32 = shared_decoder(float_graph_path, arch)
    short = ids[:INT8_STEP_ROWS_MAX]
    np.testing.assert_allclose(ours.prefill(ours.new_cache(MAX_LENGTH), short),
                               f32.prefill(f32.new_cache(MAX_LENGTH), short), rtol=0, atol=1e-5)

    o_cache, k_cache = ours.new_cache(MAX_LENGTH), kernel.new_cache(MAX_LENGTH)
    head, follow = ids[:-INT8_STEP_ROWS_MAX], ids[-INT8_STEP_ROWS_MAX:]
    ours.prefill(o_cache, head)  # in float; the kernel-only graph then gets the same codes
    for layer in range(arch.num_layers):
        for kind in (0, 1):
            dst = host_rows(k_cache.buffers[layer][kind], kernel.kv_dtype,
                             (arch.num_kv_heads, MAX_LENGTH, arch.head_dim))
            dst[...] = cache_rows(ours, o_cache, layer, kind, MAX_LENGTH)
    k_cache.advance(len(head))
    np.testing.assert_array_equal(ours.prefill(o_cache, follow), kernel.prefill(k_cache, follow))
    for layer in range(arch.num_layers):
        for kind in (0, 1):
            np.testing.assert_array_equal(cache_rows(ours, o_cache, layer, kind, len(ids)),
                                          cache_rows(kernel, k_cache, layer, kind, len(ids)))


@pytest.mark.parametrize("n", [1, 511, 512, 513, 530, 544, 545, 1040, 1100, 1537])
def test_a_prompts_later_chunks_are_longer_than_the_int8_kernels_share(n):
    """A first prompt attends in float all through: no chunk after the first is short enough
    for the int8 kernel's branch (a short last piece shares the chunk before it)."""
    from edge_runtime.gqa_decoder import chunk_bounds

    bounds = chunk_bounds(n, 512)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(0 < end - start <= 512 for start, end in bounds)
    assert all(end - start > INT8_STEP_ROWS_MAX for start, end in bounds[1:])


def resident_kib(address: int, nbytes: int) -> int:
    """How much of [address, address + nbytes) is in memory (mincore), KiB."""
    import ctypes
    import mmap

    pages = -(-nbytes // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) * mmap.PAGESIZE // 1024


def test_a_prompt_writes_and_makes_resident_only_its_own_rows_of_the_int8_cache(tiny_checkpoint, tmp_path):
    """The prompt branch returns the new rows' codes, which the decoder copies into its
    buffers: a prompt touches its own rows of each head, not the buffer's whole length (which
    the engine allocates for the profile's context, 4 KiB pages committed as rows arrive), and
    a decode after it continues from those rows."""
    from edge_runtime.gqa_decoder import SharedKVDecoder

    info = read_checkpoint(tiny_checkpoint)
    arch = info.architecture
    graph = tmp_path / "model.onnx"
    length = 4096  # 64 KiB of each kv head's rows in a layer's buffer: 16 pages
    build_decoder_graph(info, graph, precision="int4", block_size=32, symmetric=True, accuracy_level=4,
                        max_length=length)
    tokenizer = CodeLlamaTokenizer.from_file(info.tokenizer_path)
    kv_cache_quant.quantize_graph_kv_cache(
        graph, kv_cache_quant.calibrate(graph, arch, kv_cache_quant.calibration_windows(tokenizer, 64)))
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    decoder = SharedKVDecoder(ort, session, arch, device="cpu", max_length=length)
    ids = np.asarray([tokenizer.bos_id, *tokenizer.encode("def add(a, b):\n    return a + b\n" * 4)])
    assert INT8_STEP_ROWS_MAX < len(ids) * arch.head_dim <= 4096  # one page of each head's rows
    cache = decoder.new_cache(length)
    decoder.prefill(cache, ids)
    buffer_kib = arch.num_kv_heads * length * arch.head_dim // 1024
    for layer in range(arch.num_layers):
        for kind in (0, 1):
            assert resident_kib(cache.buffers[layer][kind].ptr, buffer_kib * 1024) <= 4 * arch.num_kv_heads < buffer_kib
            rows = cache_rows(decoder, cache, layer, kind, length)
            assert np.any(rows[:, :len(ids)]) and not np.any(rows[:, len(ids):])
    token = int(np.argmax(decoder.decode(cache, 13)))
    assert cache.length == len(ids) + 1 and 0 <= token < arch.vocab_size
    assert np.any(cache_rows(decoder, cache, 0, 0, length)[:, len(ids)])  # the step wrote its row


def revision_4_graph(int8_graph, folder):
    """The int8 graph as export wrote it until revision 5 (bundles in the field): each prompt
    branch appends its new codes to the cached ones and zero-pads them to the buffer's length,
    the If's outputs bound to the buffers; no metadata on the branch's outputs."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(int8_graph), load_external_data=False)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(6, np.int64), "kv_cache.no_pads"))
    for node in model.graph.node:
        if node.op_type != "If":
            continue
        branch = next(a.g for a in node.attribute if a.name == "then_branch")
        for out in list(branch.output)[1:]:
            p = out.name.removesuffix("/new_codes")  # {prefix}/{kind}
            prefix = p.rsplit("/", 1)[0]
            past = next(n.input[0] for n in branch.node if n.output[0] == f"{p}/codes")
            branch.node.extend([
                helper.make_node("Concat", [f"{p}/codes", out.name], [f"{p}/rows"], axis=2),
                helper.make_node("Shape", [past], [f"{p}/length"], start=2, end=3),
                helper.make_node("Max", [f"{p}/length", f"{prefix}/total_rows"], [f"{p}/rows_out"]),
                helper.make_node("Sub", [f"{p}/rows_out", f"{prefix}/total_rows"], [f"{p}/tail"]),
                helper.make_node("Concat", ["kv_cache.no_pads", f"{p}/tail", "kv_cache.zero"], [f"{p}/pads"], axis=0),
                helper.make_node("Pad", [f"{p}/rows", f"{p}/pads"], [f"{p}/buffer"])])
            out.name = f"{p}/buffer"
    return save_with_weights(model, int8_graph, folder, drop_metadata=(META_PROMPT_PRESENT, META_INT8_KERNEL_ROWS))


def test_a_graph_of_revision_4_still_runs_as_it_did(int8_case, tmp_path):
    """Bundles exported before revision 5 have no metadata on the prompt branch, which returns
    whole buffers: the decoder leaves the present outputs bound to its buffers for them, and
    they keep the same codes, logits and tokens as the revision-5 graph, in one prompt, in
    chunks (the later ones over cached rows) and in a short follow-up through the int8 kernel."""
    arch, _, _, int8_graph, ids = int8_case
    chunk = INT8_STEP_ROWS_MAX + 1
    ids = np.concatenate([ids, ids[1:], ids[1:]])[:3 * chunk]
    head, follow = ids[:-8], ids[-8:]
    old_graph = revision_4_graph(int8_graph, tmp_path)
    for prefill_chunk in (None, chunk):
        new, old = shared_decoder(int8_graph, arch, prefill_chunk), shared_decoder(old_graph, arch, prefill_chunk)
        n_cache, o_cache = new.new_cache(MAX_LENGTH), old.new_cache(MAX_LENGTH)
        np.testing.assert_array_equal(new.prefill(n_cache, head), old.prefill(o_cache, head))
        np.testing.assert_array_equal(new.prefill(n_cache, follow), old.prefill(o_cache, follow))
        for layer in range(arch.num_layers):
            for kind in (0, 1):
                np.testing.assert_array_equal(cache_rows(new, n_cache, layer, kind, MAX_LENGTH),
                                              cache_rows(old, o_cache, layer, kind, MAX_LENGTH))
        for token in (13, 1678, 736):
            np.testing.assert_array_equal(new.decode(n_cache, token), old.decode(o_cache, token))
