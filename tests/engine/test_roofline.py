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

from edge_runtime.memory_fit import kv_cache_bytes
from edge_runtime.onnx_proto_scan import decode_read_bytes, input_element_bytes, scan_graph
from edge_runtime.roofline import (
    measure_bandwidth,
    roofline_tokens_per_s,
    step_bytes,
    unary_model_bytes,
)


def test_kv_bytes_and_roofline():
    # 8 layers x 16 kv heads x 128 dims, fp32, 2048 tokens: K and V = 256 MiB read per step
    kv = kv_cache_bytes(num_layers=8, num_kv_heads=16, head_dim=128, context=2048, dtype_bytes=4)
    assert kv == 2 * 8 * 16 * 128 * 2048 * 4 == 256 * 2**20
    assert roofline_tokens_per_s(10e9, 900_000_000, 100_000_000) == pytest.approx(10.0)


def _lookup_graph(tmp_path, kv_type=TensorProto.INT8):
    """A graph whose bytes are known by construction: a weight read whole (128 B, in
    float_data), an embedding table of which a step gathers one row (3200 B raw, a row 32 B),
    an int8 table of which a step gathers the TopK's 5 rows (800 B, 5 rows 40 B), TopK's k (8 B,
    in int64_data), and an external-data weight (64 B): each way a tensor's bytes are stored."""
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [8, 4], rng.standard_normal(32).tolist(), raw=False),
             numpy_helper.from_array(rng.standard_normal((100, 8)).astype(np.float32), "embed"),
             numpy_helper.from_array(rng.integers(-127, 127, (100, 8), dtype=np.int8), "head_rows"),
             helper.make_tensor("k", TensorProto.INT64, [1], [5], raw=False),
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
    stored = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    assert [n for n, t in stored.items() if t.data_location == TensorProto.EXTERNAL] == ["far"]
    assert stored["w"].float_data and not stored["w"].raw_data and stored["k"].int64_data == [5]
    total, read = decode_read_bytes(path)
    assert total == 128 + 3200 + 800 + 8 + 64
    assert read == 128 + 32 + 5 * 8 + 8 + 64
    assert input_element_bytes(path, "past_key_values") == 1
    (tmp_path / "f16").mkdir()
    assert input_element_bytes(_lookup_graph(tmp_path / "f16", TensorProto.FLOAT16), "past_key_values") == 2
    assert input_element_bytes(path, "no_such_input") is None


def test_tables_read_otherwise_count_whole(tmp_path):
    """A table a Gather indexes and a MatMul also reads (a tied embedding) is read whole; so is
    one gathered along another axis; two Gathers of one table read a row each; a TopK's k
    from a Constant node counts as an initializer's does."""
    rng = np.random.default_rng(1)
    f32 = lambda name, shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    inits = [f32("tied", (50, 4)), f32("cols", (4, 50)), f32("twice", (50, 4)), f32("rows", (50, 4))]
    nodes = [helper.make_node("Gather", ["tied", "ids"], ["h"]),
             helper.make_node("MatMul", ["h", "tied_t"], ["logits"]),
             helper.make_node("Transpose", ["tied"], ["tied_t"]),
             helper.make_node("Gather", ["cols", "ids"], ["c"], axis=1),
             helper.make_node("Gather", ["twice", "ids"], ["a"]),
             helper.make_node("Gather", ["twice", "ids"], ["b"]),
             helper.make_node("Constant", [], ["k"], value=helper.make_tensor("kv", TensorProto.INT64, [1], [3])),
             helper.make_node("TopK", ["logits", "k"], ["top", "top_i"]),
             helper.make_node("Gather", ["rows", "top_i"], ["r"])]
    graph = helper.make_graph(nodes, "tables", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in "cabr"],
                              initializer=inits)
    path = tmp_path / "tables.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    total, read = decode_read_bytes(path)
    assert total == 4 * 800
    assert read == 800 + 800 + 2 * 16 + 3 * 16  # tied and cols whole, twice 2 rows, rows the TopK's 3


def test_malformed_protobuf_is_a_value_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(bytes([(7 << 3) | 2, 4, (1 << 3) | 5, 0, 0]))  # graph { node: a fixed32 where a message goes }
    with pytest.raises(ValueError):
        decode_read_bytes(bad)


def test_physical_cores_count_cores_not_threads(tmp_path):
    from edge_runtime.roofline import physical_cores

    for cpu, (package, core) in enumerate([(0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0), (1, 1), (1, 1)]):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    (tmp_path / "cpufreq").mkdir()  # not a CPU
    assert physical_cores(tmp_path) == 4
    import os

    assert physical_cores(tmp_path / "cpufreq") == os.cpu_count()


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
    assert [(n.name, n.op_type, n.inputs, n.outputs) for n in scan_graph(graph).nodes] == [
        (n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]
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
    with pytest.raises(RuntimeError, match="--device-id at least 0"):
        measure_bandwidth(threads=1, device_id=-1)
    with pytest.raises(RuntimeError, match="took over"):
        measure_bandwidth(threads=1, mib=8, timeout_s=0.001)


def test_one_failed_measure_keeps_the_other(tiny_bundle, monkeypatch):
    """The bench measures before and after its timings: a failure is said, and a good measure
    still gives the roofline; with both failed there is none; with no context to decode at, no
    measure is taken."""
    import edge_runtime.bench as bench

    answers = []

    def fake(**kwargs):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(bench, "measure_bandwidth", fake)
    good = {"device": "cpu", "threads": 2, "bandwidth": 1e10, "read_bandwidth": 2e10}
    answers[:] = [good, RuntimeError("measuring the cpu memory bandwidth took over 300 s")]
    r = bench.run_bench(str(tiny_bundle), prefill_tokens=4, contexts=(8,), decode_tokens=2, repeats=1)
    assert r.bandwidth == good and set(r.roofline_percent) == {8} and "took over" in r.roofline_note
    assert "a measure failed (measuring" in bench.format_result(r)
    answers[:] = [RuntimeError("no"), RuntimeError("no")]
    r = bench.run_bench(str(tiny_bundle), prefill_tokens=4, contexts=(8,), decode_tokens=2, repeats=1)
    assert r.bandwidth == {} and r.roofline_percent == {} and r.roofline_note == "no"
    assert "memory bandwidth  not measured (no)" in bench.format_result(r)
    r = bench.run_bench(str(tiny_bundle), prefill_tokens=4, contexts=(10**6,), decode_tokens=2, repeats=1)
    assert r.skipped and r.bandwidth == {} and r.roofline_note == ""  # `fake` was not called: answers empty


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
    # the weights: every initializer but the embedding table, of which one row (the onnx package's reading)
    sizes = {t.name: (int({e.key: e.value for e in t.external_data}["length"]) if t.data_location == TensorProto.EXTERNAL
                      else numpy_helper.to_array(t).nbytes) for t in graph.graph.initializer}
    embed = next(n.input[0] for n in graph.graph.node if n.op_type.startswith("Gather") and n.input[0] in sizes)
    weights = sum(sizes.values()) - sizes[embed] + sizes[embed] // arch["vocab_size"]
    assert r["step_bytes"]["8"] == weights + kv_16_tokens // 2
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
