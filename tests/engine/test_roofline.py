"""The roofline `edge-runtime bench` gives decode speed against: the bytes a step reads
(read from the ONNX file without the onnx package, checked here against graphs built with
it) and the memory bandwidth (measured in a child process)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.onnx_proto_scan import decode_read_bytes, input_element_bytes
from edge_runtime.roofline import (
    kv_bytes_per_token,
    measure_bandwidth,
    roofline_tokens_per_s,
    step_bytes,
    unary_model_bytes,
)


def test_kv_bytes_and_roofline():
    # 8 layers x 16 kv heads x 128 dims, fp32, 2048 tokens: K and V = 256 MiB read per step
    kv = kv_bytes_per_token(layers=8, kv_heads=16, head_dim=128, context=2048, element_bytes=4)
    assert kv == 2 * 8 * 16 * 128 * 2048 * 4 == 256 * 2**20
    assert roofline_tokens_per_s(10e9, 900_000_000, 100_000_000) == pytest.approx(10.0)


def _lookup_graph(tmp_path, kv_type=TensorProto.INT8):
    """A graph whose bytes are known by construction: a weight read whole (128 B), an embedding
    table of which a step gathers one row (3200 B, a row 32 B), an int8 table of which a step
    gathers the TopK's 5 rows (800 B, 5 rows 40 B), TopK's k (8 B), and an external-data weight
    (64 B) -- the first four inline, every kind of storage the scan reads."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((100, 8)).astype(np.float32), "embed"),
             numpy_helper.from_array(rng.integers(-127, 127, (100, 8), dtype=np.int8), "head_rows"),
             numpy_helper.from_array(np.array([5], np.int64), "k"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "far")]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["logits"]),
             helper.make_node("TopK", ["logits", "k"], ["top", "top_i"], axis=-1),
             helper.make_node("Gather", ["head_rows", "top_i"], ["rows"]),
             helper.make_node("Add", ["past_key_values.0.key", "far"], ["present.0.key"])]
    graph = helper.make_graph(nodes, "lookup", [
        helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1]),
        helper.make_tensor_value_info("past_key_values.0.key", kv_type, [16])],
        [helper.make_tensor_value_info("rows", TensorProto.INT8, None),
         helper.make_tensor_value_info("present.0.key", kv_type, [16])], initializer=inits)
    model = helper.make_model(graph)
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path))
    far = onnx.load(str(path))
    onnx.external_data_helper.convert_model_to_external_data(far, location="model.onnx.data", size_threshold=60)
    for t in far.graph.initializer:  # only "far" (64 B) goes out; the tables stay inline
        if t.name != "far":
            t.ClearField("data_location")
            del t.external_data[:]
    onnx.save_model(far, str(path))
    return path


def test_read_bytes_by_construction(tmp_path):
    path = _lookup_graph(tmp_path)
    assert [t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer
            if t.data_location == TensorProto.EXTERNAL] == ["far"]
    total, read = decode_read_bytes(path)
    assert total == 128 + 3200 + 800 + 8 + 64
    assert read == 128 + 32 + 5 * 8 + 8 + 64
    assert input_element_bytes(path, "past_key_values") == 1
    (tmp_path / "f16").mkdir()
    assert input_element_bytes(_lookup_graph(tmp_path / "f16", TensorProto.FLOAT16), "past_key_values") == 2
    assert input_element_bytes(path, "no_such_input") is None


def test_step_bytes_add_the_kv_cache(tmp_path):
    path = _lookup_graph(tmp_path, TensorProto.FLOAT)
    steps = step_bytes(path, layers=2, kv_heads=3, head_dim=4, contexts=[10, 20])
    weights = decode_read_bytes(path)[1]
    assert steps == {10: weights + 2 * 2 * 3 * 4 * 10 * 4, 20: weights + 2 * 2 * 3 * 4 * 20 * 4}


def test_read_bytes_of_an_exported_bundle_match_the_onnx_package(demo_int4_bundle):
    """The int4 bundle: GatherBlockQuantized embedding table (int8 blocks), the two-pass
    lm_head's int8 rows behind a TopK, weights in external data, an int8 KV cache."""
    graph = demo_int4_bundle / "model.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            sizes[t.name] = int({e.key: e.value for e in t.external_data}["length"])
        else:
            sizes[t.name] = numpy_helper.to_array(t).nbytes
    gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 2  # the embedding table and the head's int8 rows
    k = {n.output[1]: int(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == n.input[1]))[0])
         for n in model.graph.node if n.op_type == "TopK"}
    unread = 0
    for n in gathers:
        rows = k.get(n.input[1], 1)
        for table in (n.input[0], *n.input[2:]):
            dims = next(t.dims for t in model.graph.initializer if t.name == table)
            unread += sizes[table] - sizes[table] * rows // dims[0]
    assert decode_read_bytes(graph) == (sum(sizes.values()), sum(sizes.values()) - unread)
    assert input_element_bytes(graph, "past_key_values") == 1  # the CPU profile's int8 cache


def test_the_bandwidth_graph_negates():
    import onnxruntime as ort

    model = onnx.load_from_string(unary_model_bytes("Neg"))
    onnx.checker.check_model(model)
    session = ort.InferenceSession(unary_model_bytes("Neg"), providers=["CPUExecutionProvider"])
    x = np.arange(-3, 5, dtype=np.float16)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], -x)


def test_bandwidth_is_measured_in_a_child_process():
    got = measure_bandwidth(threads=2, mib=8)
    assert got["device"] == "cpu" and got["threads"] == 2
    assert got["bandwidth"] == max(got["one_thread"], got["all_threads"]) > 0
    assert got["read_bandwidth"] == max(got["read_one_thread"], got["read_all_threads"]) > 0


def test_the_faster_measure_counts():
    from edge_runtime.bench import faster

    slow = {"device": "cpu", "threads": 2, "bandwidth": 30e9, "read_bandwidth": 35e9}
    fast = {"device": "cpu", "threads": 2, "bandwidth": 40e9, "read_bandwidth": 33e9}
    assert faster([slow, fast]) == {"device": "cpu", "threads": 2, "bandwidth": 40e9, "read_bandwidth": 35e9}
    assert faster([slow]) == slow


def test_a_failed_measure_says_why():
    with pytest.raises(RuntimeError, match="--threads, --mib and --repeats must be at least 1"):
        measure_bandwidth(threads=1, mib=0)


def _bench(bundle, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", "bench", "--bundle", str(bundle), "--context", "8",
                           "--context", "24", "--decode-tokens", "4", "--prefill-tokens", "8", "--bandwidth-mib", "8",
                           *extra], capture_output=True, text=True, timeout=300)


def test_bench_gives_decode_as_a_share_of_the_roofline(tiny_bundle):
    done = _bench(tiny_bundle, "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    arch = json.loads((tiny_bundle / "bundle.json").read_text())["architecture"]
    graph = onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False)
    past = next(i for i in graph.graph.input if i.name.startswith("past_key_values"))
    element = helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type).itemsize
    head_dim = arch["hidden_size"] // arch["num_heads"]
    kv_16_tokens = 2 * arch["num_layers"] * arch["num_kv_heads"] * head_dim * 16 * element
    assert r["step_bytes"]["24"] - r["step_bytes"]["8"] == kv_16_tokens
    assert r["step_bytes"]["8"] > kv_16_tokens // 2  # the weights a step reads besides
    for ctx in ("8", "24"):
        tps = r["decode_tokens_per_s"][ctx]
        assert r["roofline_percent"][ctx] == pytest.approx(100 * tps * r["step_bytes"][ctx] / r["bandwidth"]["bandwidth"])
        assert r["read_roofline_percent"][ctx] == pytest.approx(
            100 * tps * r["step_bytes"][ctx] / r["bandwidth"]["read_bandwidth"])
    text = _bench(tiny_bundle)
    assert text.returncode == 0, text.stderr
    assert "memory bandwidth" in text.stdout and "% of the roofline" in text.stdout


def test_bench_without_the_roofline(tiny_bundle):
    done = _bench(tiny_bundle, "--json", "--no-roofline")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert set(r["decode_tokens_per_s"]) == {"8", "24"}
    assert r["bandwidth"] == {} and r["roofline_percent"] == {} and r["step_bytes"] == {}


@pytest.mark.gpu
def test_gpu_bandwidth_in_device_memory():
    got = measure_bandwidth(threads=1, device="cuda", mib=256)
    assert got["device"] == "cuda" and got["bytes"] == 4 * (256 << 20) // 2 and got["bandwidth"] > 0
