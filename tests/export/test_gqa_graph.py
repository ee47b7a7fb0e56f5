"""The `gqa-shared-kv` graph (export/graph_builder.py) driven by SharedKVDecoder
(edge_runtime/gqa_decoder.py), against torch and against onnxruntime's own kernels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import torch_reference
from edge_export.checkpoint import read_checkpoint
from edge_export.graph_builder import (
    FLAVOUR,
    META_FLAVOUR,
    META_MAX_LENGTH,
    GraphBuildError,
    block_quantize,
    block_quantize_mse,
    build_decoder_graph,
    dequantize_reference,
)
from edge_runtime.gqa_decoder import SharedKVDecoder

PROMPTS = (
    [1, 822, 18755, 29898, 29876, 1125],  # "def fib(n):"
    [1, 5215, 2897, 13, 5215, 10876, 13, 13],  # "import os\nimport sys\n\n"
    [1, 32007, 822, 788, 29898, 29874, 29892, 289, 1125, 32008, 13, 32009],  # an infill-shaped prompt
    [1, 29871],
)
MAX_LENGTH = 128


def build(checkpoint: Path, out_dir: Path, precision: str = "fp32", **kwargs) -> Path:
    kwargs.setdefault("max_length", MAX_LENGTH)
    files = build_decoder_graph(read_checkpoint(checkpoint), out_dir / "model.onnx", precision=precision, **kwargs)
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"] and all(f.is_file() for f in files)
    return files[0]


def decoder_for(graph: Path, checkpoint: Path, max_length: int = MAX_LENGTH, **kwargs) -> SharedKVDecoder:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])
    return SharedKVDecoder(ort, session, read_checkpoint(checkpoint).architecture, device="cpu",
                           max_length=max_length, **kwargs)


def greedy(decoder: SharedKVDecoder, ids: list[int], n: int) -> list[int]:
    cache = decoder.new_cache(len(ids) + n)
    token = int(decoder.prefill(cache, np.asarray(ids))[-1].argmax())
    out = [token]
    for _ in range(n - 1):
        token = int(decoder.decode(cache, token).argmax())
        out.append(token)
    return out


@pytest.fixture(scope="module")
def mha_checkpoint(tmp_path_factory) -> Path:
    """No GQA: 4 heads, 4 kv heads, head_dim 16."""
    from edge_export.synthetic import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-mha", hidden_size=64, intermediate_size=176,
                            num_layers=3, num_heads=4, num_kv_heads=4, seed=99)


@pytest.fixture(scope="module", params=["gqa", "mha"])
def float_case(request, tiny_checkpoint, mha_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    checkpoint = tiny_checkpoint if request.param == "gqa" else mha_checkpoint
    return checkpoint, build(checkpoint, tmp_path_factory.mktemp(f"gqa-{request.param}-fp32"))


# -- correctness against torch -----------------------------------------------------------------------------------
def test_fp32_last_position_logits_match_torch(float_case):
    checkpoint, graph = float_case
    decoder = decoder_for(graph, checkpoint)
    for ids in PROMPTS:
        cache = decoder.new_cache(len(ids))
        ours = decoder.prefill(cache, np.asarray(ids))
        assert ours.shape == (1, decoder.vocab_size) and ours.dtype == np.float32
        ref = torch_reference.prompt_logits(checkpoint, ids)[-1]
        assert np.abs(ours[-1] - ref).max() < 1e-4


def test_fp32_greedy_tokens_equal_torch(float_case):
    checkpoint, graph = float_case
    decoder = decoder_for(graph, checkpoint)
    for ids in PROMPTS:
        assert greedy(decoder, ids, 32) == torch_reference.greedy(checkpoint, ids, 32)


def test_decode_logits_match_torch_at_every_step(tiny_checkpoint, float_case):
    """Teacher-forced: the logits after each decoded token equal torch's for that prefix
    (the in-place seqlens_k / total_sequence_length updates reach the graph)."""
    checkpoint, graph = float_case
    decoder = decoder_for(graph, checkpoint)
    ids = PROMPTS[0]
    continuation = torch_reference.greedy(checkpoint, ids, 12)
    ref = torch_reference.prompt_logits(checkpoint, ids + continuation)
    cache = decoder.new_cache(len(ids) + len(continuation))
    decoder.prefill(cache, np.asarray(ids))
    for i, token in enumerate(continuation):
        logits = decoder.decode(cache, token)
        assert np.abs(logits - ref[len(ids) + i]).max() < 1e-4
    assert cache.length == len(ids) + len(continuation)


def test_cuda_graph_mode_step_inputs_in_bound_buffers_match_torch(tiny_checkpoint, float_case):
    """The CUDA-graph mode's binding (token, seqlens_k and logits in OrtValues bound once and
    written with update_inplace; graph ids in the run options) on the CPU provider: prefill,
    every decode step and a second request give torch's logits. On a GPU the same binding is
    recorded and replayed (tests/engine/test_cuda_provider.py)."""
    checkpoint, graph = float_case
    decoder = decoder_for(graph, checkpoint, cuda_graph=True)
    for ids in (PROMPTS[0], PROMPTS[1]):
        continuation = torch_reference.greedy(checkpoint, ids, 8)
        ref = torch_reference.prompt_logits(checkpoint, ids + continuation)
        cache = decoder.new_cache(len(ids) + len(continuation))
        assert np.abs(decoder.prefill(cache, np.asarray(ids))[-1] - ref[len(ids) - 1]).max() < 1e-4
        for i, token in enumerate(continuation):
            assert np.abs(decoder.decode(cache, token) - ref[len(ids) + i]).max() < 1e-4


def test_recorded_decode_steps_get_the_buffers_length_as_total_sequence_length(tiny_checkpoint, float_case):
    """A CUDA graph replays the host scalars it was recorded with, so in that mode every decode
    step (graph 1) must pass the same total, the KV buffer's length; seqlens_k carries the real
    one. Prefills (not recorded, graph -1) pass the real total. (On an H200 a growing total left
    replays attending to the recording's length; tests/engine/test_cuda_provider.py runs it there.)"""
    checkpoint, graph = float_case
    decoder = decoder_for(graph, checkpoint, cuda_graph=True)
    runs = []

    class Recording:
        def __init__(self, session):
            self.session = session

        def run_with_iobinding(self, binding, options=None):
            runs.append((options.get_run_config_entry("gpu_graph_id"), int(decoder._total_len), cache.length))
            return self.session.run_with_iobinding(binding, options)

        def __getattr__(self, name):
            return getattr(self.session, name)

    decoder.session = Recording(decoder.session)
    ids = PROMPTS[0]
    cache = decoder.new_cache(len(ids) + 4)
    token = int(decoder.prefill(cache, np.asarray(ids))[-1].argmax())
    for _ in range(3):
        token = int(decoder.decode(cache, token).argmax())
    assert runs == [("-1", len(ids), 0)] + [("1", MAX_LENGTH, len(ids) + i) for i in range(3)]


def test_chunked_prefill_equals_one_shot(tiny_checkpoint, float_case):
    """GroupQueryAttention's subsequent-prompt path: a prompt fed in pieces gives the same logits."""
    checkpoint, graph = float_case
    decoder = decoder_for(graph, checkpoint)
    ids = PROMPTS[2]
    whole = decoder.prefill(decoder.new_cache(len(ids)), np.asarray(ids))
    cache = decoder.new_cache(len(ids))
    decoder.prefill(cache, np.asarray(ids[:5]))
    pieces = decoder.prefill(cache, np.asarray(ids[5:]))
    assert np.abs(whole - pieces).max() < 1e-5


def test_fp16_graph_runs_close_to_torch(tiny_checkpoint, tmp_path):
    graph = build(tiny_checkpoint, tmp_path, "fp16")
    decoder = decoder_for(graph, tiny_checkpoint)
    assert decoder.kv_dtype == np.float16 and decoder.logits_dtype == np.float32
    ids = PROMPTS[0]
    ours = decoder.prefill(decoder.new_cache(len(ids)), np.asarray(ids))[-1]
    assert np.abs(ours - torch_reference.prompt_logits(tiny_checkpoint, ids)[-1]).max() < 1e-2
    assert greedy(decoder, ids, 32) == torch_reference.greedy(tiny_checkpoint, ids, 32)


def test_bfloat16_checkpoint_is_read_without_torch_dtype_support(tmp_path):
    from edge_export.synthetic import build_checkpoint

    checkpoint = build_checkpoint(tmp_path / "bf16", hidden_size=64, intermediate_size=172, num_layers=2,
                                  num_heads=4, num_kv_heads=2, seed=5, dtype="bfloat16")
    decoder = decoder_for(build(checkpoint, tmp_path / "g"), checkpoint)
    ids = PROMPTS[1]
    ours = decoder.prefill(decoder.new_cache(len(ids)), np.asarray(ids))[-1]
    assert np.abs(ours - torch_reference.prompt_logits(checkpoint, ids)[-1]).max() < 1e-4


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F64"])
def test_every_float_dtype_the_checkpoint_check_accepts_is_read(tmp_path, dtype):
    """The checkpoint check (checkpoint.FLOAT_DTYPES) and the tensor reader agree: a tensor
    stored in each accepted dtype reads back as its float32 values, rows too."""
    import json
    import struct

    from edge_export.checkpoint import FLOAT_DTYPES
    from edge_export.graph_builder import SafetensorsReader

    assert dtype in FLOAT_DTYPES and len(FLOAT_DTYPES) == 4
    values = np.array([[1.5, -2.0, 0.25], [3.0, -0.5, 1024.0]], np.float32)  # exact in every dtype
    if dtype == "BF16":
        data = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    else:
        data = values.astype({"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dtype]).tobytes()
    header = json.dumps({"w": {"dtype": dtype, "shape": [2, 3], "data_offsets": [0, len(data)]}}).encode()
    file = tmp_path / "model.safetensors"
    file.write_bytes(struct.pack("<Q", len(header)) + header + data)
    reader = SafetensorsReader([file])
    np.testing.assert_array_equal(reader.read("w"), values)
    np.testing.assert_array_equal(reader.read("w", rows=(1, 2)), values[1:])


def test_streamed_fp16_checkpoint_builds_and_matches_torch(tmp_path):
    """build_checkpoint_streamed writes sharded float16 safetensors (as hub checkpoints are)."""
    from edge_export.synthetic import build_checkpoint_streamed

    checkpoint = build_checkpoint_streamed(tmp_path / "streamed", hidden_size=128, intermediate_size=352,
                                           num_layers=2, num_heads=8, num_kv_heads=2, seed=3, std=0.05)
    assert len(read_checkpoint(checkpoint).weight_files) == 4
    fp32 = decoder_for(build(checkpoint, tmp_path / "fp32"), checkpoint)
    ids = PROMPTS[0]
    ours = fp32.prefill(fp32.new_cache(len(ids)), np.asarray(ids))[-1]
    assert np.abs(ours - torch_reference.prompt_logits(checkpoint, ids)[-1]).max() < 1e-4
    assert greedy(fp32, ids, 16) == torch_reference.greedy(checkpoint, ids, 16)
    int4 = decoder_for(build(checkpoint, tmp_path / "int4", "int4", block_size=32, accuracy_level=4,
                             keep_unquantized=("lm_head",)), checkpoint)
    assert len(greedy(int4, ids, 16)) == 16


# -- graph layout --------------------------------------------------------------------------------------------------
def test_graph_layout(tiny_checkpoint, tmp_path):
    import onnx

    graph = build(tiny_checkpoint, tmp_path, "int4", block_size=32, symmetric=True, accuracy_level=4,
                  keep_unquantized=("lm_head",))
    model = onnx.load(str(graph), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[META_FLAVOUR] == FLAVOUR and meta[META_MAX_LENGTH] == str(MAX_LENGTH)
    inputs = {i.name: i for i in model.graph.input}
    assert set(inputs) == {"input_ids", "seqlens_k", "total_sequence_length", "logits_start"} | {
        f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")}
    assert inputs["total_sequence_length"].type.tensor_type.shape.dim == []
    # logits_start has a default: the initializer of the same name, the last position
    default = next(t for t in model.graph.initializer if t.name == "logits_start")
    assert onnx.numpy_helper.to_array(default).tolist() == [-1]
    outputs = [o.name for o in model.graph.output]
    assert outputs[0] == "logits" and len(outputs) == 5
    logits_dims = model.graph.output[0].type.tensor_type.shape.dim
    assert logits_dims[1].dim_param == "logits_rows" and logits_dims[2].dim_value == 32016

    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == 2 and ops.count("MatMulNBits") == 2 * 5  # qkv, o, gate, up, down
    assert ops.count("SimplifiedLayerNormalization") == 1 and ops.count("SkipSimplifiedLayerNormalization") == 4
    lm_head = [n for n in model.graph.node if n.name == "/lm_head/MatMul"]
    assert len(lm_head) == 1 and lm_head[0].op_type == "MatMul"  # kept unquantized
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 0
    assert attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2
    assert gqa.input[1] == gqa.input[2] == ""  # packed QKV
    assert gqa.output[1] == "present.0.key" and gqa.input[3] == "past_key_values.0.key"
    nbits = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    nattrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits.attribute}
    assert nattrs["bits"] == 4 and nattrs["block_size"] == 32 and nattrs["accuracy_level"] == 4
    assert len(nbits.input) == 3  # symmetric: no zero points
    weights = [t for t in model.graph.initializer if t.dims and np.prod(t.dims) > 16]
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    assert {e.value for t in weights for e in t.external_data if e.key == "location"} == {"model.onnx.data"}


def test_head_dim_not_multiple_of_16_is_refused(noinfill_checkpoint, tmp_path):
    with pytest.raises(GraphBuildError, match="head_dim 8 is not a multiple of 16"):
        build(noinfill_checkpoint, tmp_path)
    assert not (tmp_path / "model.onnx").exists()


# -- the decoder's shared cache ---------------------------------------------------------------------------------------
def test_cache_is_reused_across_requests_without_clearing(tiny_checkpoint, float_case):
    checkpoint, graph = float_case
    decoder = decoder_for(graph, checkpoint)
    long_ids, short_ids = PROMPTS[2], PROMPTS[0]
    first = greedy(decoder, short_ids, 8)
    greedy(decoder, long_ids, 20)  # leaves stale rows beyond the short prompt's positions
    assert greedy(decoder, short_ids, 8) == first
    cache = decoder.new_cache(len(short_ids) + 1)
    assert cache.past(0)[0].ptr == cache.present(0)[0].ptr  # one buffer, past and present
    decoder.prefill(cache, np.asarray(short_ids))
    decoder.decode(cache, 5)
    with pytest.raises(ValueError, match="exceed the KV cache capacity"):
        decoder.decode(cache, 5)
    newer = decoder.new_cache(4)
    with pytest.raises(ValueError, match="stale"):
        decoder.decode(cache, 5)
    assert newer.length == 0
    with pytest.raises(ValueError, match="exceeds the decoder's maximum"):
        decoder.new_cache(MAX_LENGTH + 1)


def test_decoder_max_length_beyond_rotary_tables_is_refused(float_case):
    checkpoint, graph = float_case
    with pytest.raises(ValueError, match="rotary tables"):
        decoder_for(graph, checkpoint, max_length=MAX_LENGTH * 2)


# -- block quantization layout ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("search", [False, True], ids=["rtn", "mse"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,block", [(128, 32), (172, 32), (256, 128)])
def test_block_quantize_is_the_layout_matmulnbits_reads(bits, symmetric, k, block, search):
    """MatMulNBits over our packed weights (onnxruntime's round-to-nearest or our
    least-squares scale search) computes x @ dequantized(W), and that is close to x @ W."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(k + bits)
    n = 48
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[5, 7], w[40, 3] = 9.0, -11.0  # outliers: positive and negative extremes
    x = rng.standard_normal((3, k)).astype(np.float32)
    q = (block_quantize_mse if search else block_quantize)(w, bits=bits, block_size=block, symmetric=symmetric)
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales, "scales")]
    inputs = ["x", "B", "scales"]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points, "zp"))
        inputs.append("zp")
    deq = dequantize_reference(q, k, bits=bits, block_size=block)
    for accuracy_level in (0, 4):  # 4: the CPU profiles' int8-compute kernel (prepacked differently)
        node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=block, accuracy_level=accuracy_level)
        graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                                  initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid("com.microsoft", 1)], ir_version=10)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {"x": x})
        if accuracy_level == 0:
            np.testing.assert_allclose(y, x @ deq, rtol=1e-4, atol=1e-3)
        else:  # activations rounded to int8 blocks: close, not equal
            assert np.linalg.norm(y - x @ deq) / np.linalg.norm(x @ deq) < 0.02
        rel = np.linalg.norm(y - x @ w) / np.linalg.norm(x @ w)
        assert rel < (0.15 if bits == 4 else 0.025)
        onnx.checker.check_model(model)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_search_reconstructs_weights_no_worse_than_round_to_nearest(bits, symmetric):
    """Per block, the least-squares search includes the full range among its candidates, so
    its error is never above round-to-nearest's; on heavy-tailed int4 weights it is below."""
    rng = np.random.default_rng(bits)
    w = (rng.standard_t(df=3, size=(512, 64)) * 0.02).astype(np.float32)
    rtn = block_quantize(w, bits=bits, block_size=32, symmetric=symmetric)
    mse = block_quantize_mse(w, bits=bits, block_size=32, symmetric=symmetric)

    def block_errors(q):
        d = dequantize_reference(q, 512, bits=bits, block_size=32) - w
        return (d.T.reshape(64, 16, 32) ** 2).sum(axis=-1)

    e_rtn, e_mse = block_errors(rtn), block_errors(mse)
    assert (e_mse <= e_rtn * (1 + 1e-5) + 1e-12).all()
    if bits == 4:
        assert e_mse.sum() < 0.97 * e_rtn.sum()


# -- quantized graphs on the trained demo model ------------------------------------------------------------------------
DEMO_PROMPTS = (
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n        ",
    "    for i in range(len(items)):\n        if ",
)


@pytest.mark.slow
@pytest.mark.parametrize("precision,min_agreement", [("int8", 0.95), ("int4", 0.8)])
def test_quantized_graph_greedy_agrees_with_fp32_graph_on_demo_model(demo_checkpoint, tmp_path_factory, precision,
                                                                     min_agreement):
    """Teacher-forced agreement of the quantized graph's top token with the fp32 graph's
    greedy tokens (32 per prompt), with the cpu-x86_64 profile's quantization recipe."""
    from edge_runtime.tokenizer import CodeLlamaTokenizer

    root = tmp_path_factory.mktemp(f"demo-{precision}")
    fp32 = decoder_for(build(demo_checkpoint, root / "fp32", max_length=256), demo_checkpoint, 256)
    quant = decoder_for(build(demo_checkpoint, root / precision, precision, max_length=256, block_size=32,
                              symmetric=True, accuracy_level=4, keep_unquantized=("lm_head",)),
                        demo_checkpoint, 256)
    tokenizer = CodeLlamaTokenizer.from_file(read_checkpoint(demo_checkpoint).tokenizer_path)
    agree = total = 0
    for text in DEMO_PROMPTS:
        ids = [1, *tokenizer.encode(text)]
        ref = greedy(fp32, ids, 32)
        cache = quant.new_cache(len(ids) + 32)
        top = [int(quant.prefill(cache, np.asarray(ids))[-1].argmax())]
        for token in ref[:-1]:
            top.append(int(quant.decode(cache, token).argmax()))
        agree += sum(a == b for a, b in zip(top, ref))
        total += len(ref)
    assert agree / total >= min_agreement


def test_all_position_logits_match_torch(tiny_checkpoint, float_case):
    """One run per token: what fidelity checks need from a last-position-only graph."""
    checkpoint, graph = float_case
    decoder = decoder_for(graph, checkpoint)
    ids = PROMPTS[1]
    ours = decoder.all_position_logits(decoder.new_cache(len(ids)), np.asarray(ids))
    ref = torch_reference.prompt_logits(checkpoint, ids)
    assert ours.shape == ref.shape and np.abs(ours - ref).max() < 1e-4


def test_prefill_chunk_option_gives_the_same_logits_and_tokens(tiny_checkpoint, float_case):
    import onnxruntime as ort

    checkpoint, graph = float_case
    whole = decoder_for(graph, checkpoint)
    chunked = SharedKVDecoder(ort, whole.session, whole.arch, device="cpu", max_length=MAX_LENGTH, prefill_chunk=5)
    ids = PROMPTS[2]  # 12 tokens: chunks of 5, 5, 2
    a = whole.prefill(whole.new_cache(len(ids)), np.asarray(ids))
    b = chunked.prefill(chunked.new_cache(len(ids)), np.asarray(ids))
    assert np.abs(a - b).max() < 1e-5
    assert greedy(chunked, ids, 16) == greedy(whole, ids, 16)


def test_kv_pages_are_committed_as_tokens_arrive():
    """The shared buffers are lazily committed 4 KiB pages: touching the start of each
    head's rows (as a short prompt does) must not make the whole buffer resident."""
    from edge_runtime.gqa_decoder import allocate_host_lazily

    statm = Path("/proc/self/statm")
    if not statm.is_file():
        pytest.skip("needs /proc (Linux)")

    def resident_mib() -> float:
        return int(statm.read_text().split()[1]) * 4096 / 2**20

    buf = allocate_host_lazily(64 << 18, np.dtype(np.float32))  # 64 MiB
    region, array = buf.keepalive
    assert array.ctypes.data == buf.ptr and array.flags.writeable
    before = resident_mib()
    array[:: 1 << 18] = 1.0  # one element per MiB, like the first row of each head
    assert resident_mib() - before < 8
    assert float(np.frombuffer(region, dtype=np.float32)[1 << 18]) == 1.0


def test_scale_search_keeps_float16_scales_and_rounds_against_them():
    """GPU bundles store float16 scales: the codes are chosen against the scale as stored,
    so the reconstruction with the float16 scales is still no worse than round-to-nearest's."""
    rng = np.random.default_rng(7)
    w = (rng.standard_t(df=3, size=(256, 32)) * 0.02).astype(np.float16)
    rtn = block_quantize(w, bits=4, block_size=32, symmetric=True)
    mse = block_quantize_mse(w, bits=4, block_size=32, symmetric=True)
    assert mse.scales.dtype == np.float16 and rtn.scales.dtype == np.float16
    ref = w.astype(np.float32)
    err = {name: float(((dequantize_reference(q, 256, bits=4, block_size=32) - ref) ** 2).sum())
           for name, q in (("rtn", rtn), ("mse", mse))}
    assert err["mse"] < err["rtn"]


def _as_transformers5_config(checkpoint: Path, out: Path, **rope) -> Path:
    """A copy of `checkpoint` whose config.json is written the transformers-5 way: RoPE in one
    `rope_parameters` table, no top-level rope_theta / rope_scaling."""
    import shutil

    shutil.copytree(checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    theta = config.pop("rope_theta")
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_theta": theta, "rope_type": "default", **rope}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_transformers5_config_gives_the_graph_of_the_transformers4_one(tiny_checkpoint, tmp_path):
    """transformers >= 5 saves rope_theta inside rope_parameters; read as the default base
    (10000 for Code Llama's 1000000) every rotation would be wrong."""
    v5 = _as_transformers5_config(tiny_checkpoint, tmp_path / "v5")
    assert read_checkpoint(v5).architecture.rope_theta == read_checkpoint(tiny_checkpoint).architecture.rope_theta
    assert read_checkpoint(v5).architecture.rope_theta == 1_000_000.0
    graphs = [build(c, tmp_path / f"graph-{i}") for i, c in enumerate((tiny_checkpoint, v5))]
    data = [(g.parent / "model.onnx.data").read_bytes() for g in graphs]
    assert data[0] == data[1]


@pytest.mark.parametrize("key", ["rope_type", "type"])
def test_rope_scaling_in_rope_parameters_is_refused(tiny_checkpoint, tmp_path, key):
    v5 = _as_transformers5_config(tiny_checkpoint, tmp_path / "v5-linear", factor=2.0)
    config = json.loads((v5 / "config.json").read_text())
    config["rope_parameters"].pop("rope_type")
    config["rope_parameters"][key] = "linear"
    (v5 / "config.json").write_text(json.dumps(config))
    with pytest.raises(GraphBuildError, match="RoPE scaling .*linear.* not supported"):
        build(v5, tmp_path / "graph")


def test_a_transformers5_checkpoint_exports_at_full_fidelity(tiny_checkpoint, tmp_path, exporter):
    """The export's torch reference and GPTQ calibration read the RoPE base the same way."""
    v5 = _as_transformers5_config(tiny_checkpoint, tmp_path / "v5")
    bundle = exporter(v5, tmp_path / "bundle", precision="fp32")
    fidelity = json.loads((bundle / "bundle.json").read_text())["fidelity"]
    assert fidelity["greedy_agreement"] == 1.0 and fidelity["max_logit_diff"] < 1e-3


# -- the lm_head in two passes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
def test_two_pass_lm_head_gives_the_int8_heads_logits_for_its_top_k_and_the_int4_ones_elsewhere(
        tiny_checkpoint, tmp_path, symmetric):
    """head_refine_top_k: the logits of the tokens the int4 head ranks in its top k are the
    int8 head's, every other logit is the int4 head's. Both references are one-pass graphs of
    the same weights (round to nearest: the same codes in every graph), computed in float
    (accuracy level 0), so the int8 head's logits are the dequantized weights' exactly; the
    int8 rows come in one block of 128 padded past the 64 hidden columns."""
    k = 8
    common = dict(precision="int4", block_size=32, symmetric=symmetric, accuracy_level=0, keep_block_size=128)
    graphs = {
        "int4": build(tiny_checkpoint, tmp_path / "int4", **common),
        "int8": build(tiny_checkpoint, tmp_path / "int8", keep_unquantized=("lm_head",), keep_bits=8, **common),
        "two-pass": build(tiny_checkpoint, tmp_path / "two-pass", keep_unquantized=("lm_head",), keep_bits=8,
                          head_refine_top_k=k, **common),
    }
    decoders = {name: decoder_for(graph, tiny_checkpoint) for name, graph in graphs.items()}

    def rows(decoder: SharedKVDecoder, ids: list[int]) -> np.ndarray:
        """The first token's logits, then every later position's in one run of several rows
        (as prompt lookup verifies drafts): TopK and the scatter take each row on its own."""
        cache = decoder.new_cache(len(ids))
        first = decoder.prefill(cache, np.asarray(ids[:1]))[-1].copy()
        return np.vstack([first, decoder.verify(cache, np.asarray(ids[1:]))]) if len(ids) > 1 else first[None]

    for ids in PROMPTS:
        logits = {name: rows(d, ids) for name, d in decoders.items()}
        for row in range(len(ids)):
            int4, int8, ours = (logits[name][row] for name in ("int4", "int8", "two-pass"))
            top = np.argsort(-int4, kind="stable")[:k]
            assert np.abs(int4[top] - int8[top]).max() > 1e-3  # the two heads differ where it is checked
            np.testing.assert_allclose(ours[top], int8[top], atol=2e-5, rtol=0)
            rest = np.setdiff1d(np.arange(int4.size), top)
            np.testing.assert_array_equal(ours[rest], int4[rest])


def test_two_pass_lm_head_is_refused_where_it_has_no_int8_copy(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="head_refine_top_k needs precision int4, keep_bits 8"):
        build(tiny_checkpoint, tmp_path / "g", precision="int4", keep_unquantized=("lm_head",), head_refine_top_k=8)
    with pytest.raises(ValueError, match="head_refine_top_k needs"):
        build(tiny_checkpoint, tmp_path / "g", precision="fp16", head_refine_top_k=8)


# -- the embedding table in int8 blocks ----------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_embedding_gives_the_logits_of_its_blocks_dequantized(tiny_checkpoint, tmp_path, symmetric):
    """embedding_bits 8: the table is stored as int8 blocks (a byte a weight and a scale a block
    instead of four bytes a weight), each within a step of the checkpoint's row, and the graph computes what a float graph whose
    table holds those blocks dequantized computes (the other weights are the same codes in both:
    round to nearest, float compute); two blocks of 32 a row of the 64 hidden columns."""
    import onnx
    from onnx import numpy_helper

    common = dict(precision="int4", block_size=32, symmetric=symmetric, accuracy_level=0, keep_block_size=128)
    float_graph = build(tiny_checkpoint, tmp_path / "float", **common)
    int8_graph = build(tiny_checkpoint, tmp_path / "int8", embedding_bits=8, **common)
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(int8_graph)).graph.initializer}
    assert "model.embed_tokens.weight" not in weights
    codes, scales = weights["/model/embed_tokens.weight_Q8"], weights["/model/embed_tokens.weight_scales"]
    vocab, blocks = scales.shape
    zero_points = weights.get("/model/embed_tokens.weight_zero_points", np.full((vocab, blocks), 128, np.uint8))
    assert codes.dtype == np.uint8 and codes.shape == (vocab, 64) and blocks == 2
    rows = ((codes.reshape(vocab, blocks, 32).astype(np.float32) - zero_points[..., None]) * scales[..., None])
    rows = rows.reshape(vocab, 64)
    from edge_export.graph_builder import SafetensorsReader

    original = SafetensorsReader(read_checkpoint(tiny_checkpoint).weight_files).read(
        "model.embed_tokens.weight").astype(np.float32)
    steps = np.abs(rows - original) / np.abs(np.repeat(scales, 32, axis=1))
    assert steps.max() <= 1.001 and np.mean(steps <= 0.5001) > 0.999  # rounded to nearest, a rare edge clipped
    assert scales.dtype == np.float32  # a byte a weight, a float32 scale a block of 32

    # the float graph with those rows as its table
    model = onnx.load(str(float_graph), load_external_data=False)
    where = {e.key: e.value for e in next(t for t in model.graph.initializer
                                          if t.name == "model.embed_tokens.weight").external_data}
    with open(float_graph.with_name(where["location"]), "r+b") as data:
        data.seek(int(where.get("offset", 0)))
        data.write(rows.astype(np.float32).tobytes())
    ours, reference = decoder_for(int8_graph, tiny_checkpoint), decoder_for(float_graph, tiny_checkpoint)
    for ids in PROMPTS:
        np.testing.assert_allclose(ours.prefill(ours.new_cache(len(ids)), np.asarray(ids)),
                                   reference.prefill(reference.new_cache(len(ids)), np.asarray(ids)),
                                   atol=1e-5, rtol=0)


def test_int8_embedding_needs_float32_activations(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="embedding_bits must be None, or 8 with float32 activations"):
        build(tiny_checkpoint, tmp_path / "g", precision="fp16", embedding_bits=8)
    with pytest.raises(ValueError, match="embedding_bits must be"):
        build(tiny_checkpoint, tmp_path / "g", precision="int4", embedding_bits=4)
