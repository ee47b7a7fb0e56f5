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
from edge_runtime.tokenizer import CodeLlamaTokenizer


@pytest.fixture(scope="module")
def float_graph(tiny_checkpoint, tmp_path_factory):
    info = read_checkpoint(tiny_checkpoint)
    graph = tmp_path_factory.mktemp("kv") / "model.onnx"
    build_decoder_graph(info, graph, precision="int4", block_size=32, symmetric=True, accuracy_level=4,
                        max_length=256)
    return info, graph


def presents(graph, arch, ids, dtype):
    """present.{i}.key/value of a first prompt (no past), as [layers] lists of [kv_heads, S, head_dim]."""
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    n = len(ids)
    feeds = {"input_ids": np.asarray([ids], dtype=np.int64), "seqlens_k": np.array([n - 1], dtype=np.int32),
             "total_sequence_length": np.array(n, dtype=np.int32)}
    for i in range(arch.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, arch.num_kv_heads, 0, arch.head_dim), dtype=dtype)
    names = [f"present.{i}.{kind}" for kind in ("key", "value") for i in range(arch.num_layers)]
    out = session.run(names, feeds)
    return out[:arch.num_layers], out[arch.num_layers:]


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
