"""benchmarks/gpu_decode.py without a GPU: the bundles it prepares, its roofline arithmetic
and its refusal where onnxruntime has no CUDA provider (the timed part runs in
scripts/gpu-check.sh on a GPU machine)."""

from __future__ import annotations

import pytest

from edge_runtime.bundle import load_bundle
from edge_runtime.profiles import load_profile


def test_prepares_gpu_bundles_with_the_profiles_layout_without_the_scale_search(gpu_decode, tiny_checkpoint,
                                                                                tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_decode, "genai_missing",
                        lambda: "onnxruntime_genai is not installed (pip install onnxruntime-genai-cuda)")
    assert gpu_decode.main(["--synthetic-7b", str(tiny_checkpoint), "--workdir", str(tmp_path / "w"),
                            "--prepare-only", "--precision", "int4", "fp16", "--max-context", "256", "--peers"]) == 0
    captured = capsys.readouterr()
    printed = captured.out.split()
    assert printed == [str(tmp_path / "w" / "int4"), str(tmp_path / "w" / "fp16")]
    # a peer that cannot run is skipped with the reason
    assert "onnxruntime-genai: skipped (onnxruntime_genai is not installed" in captured.err
    int4, fp16 = (load_bundle(p) for p in printed)
    quant = int4.manifest["quantization"]
    assert int4.profile_name == "nvidia-gpu" and int4.context_limit == 256
    assert quant["block_size"] == 128 and quant["symmetric"] is False and quant["scale_search"] is False
    assert quant["algorithm"] == "rtn" and fp16.precision == "fp16"
    assert int4.manifest["fidelity"]["skipped"] is True
    facts = gpu_decode.bundle_facts(int4.root)
    assert facts["kv_element_bytes"] == 2 and facts["layers"] == int4.architecture.num_layers
    assert 0 < facts["weight_bytes_per_token"] < facts["model_bytes"]


def test_genai_model_folder_facts_come_from_its_config(gpu_decode, tmp_path):
    """onnxruntime-genai's folder has no bundle.json: the shape comes from genai_config.json."""
    import json

    import onnx
    from onnx import TensorProto, helper

    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT16, [1, 2, None, 16])
    weight = helper.make_tensor("w", TensorProto.FLOAT16, [4, 4], [0.0] * 16)
    graph = helper.make_graph([helper.make_node("Identity", ["past_key_values.0.key"], ["y"])], "g", [past],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], [weight])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {
        "filename": "model.onnx", "num_hidden_layers": 3, "num_key_value_heads": 2, "head_size": 16}}}))
    facts = gpu_decode.bundle_facts(tmp_path)
    assert facts["layers"] == 3 and facts["kv_heads"] == 2 and facts["head_dim"] == 16
    assert facts["kv_element_bytes"] == 2 and facts["weight_bytes_per_token"] == 32


def test_roofline_is_bandwidth_over_weights_plus_the_cache_held(gpu_decode):
    facts = {"weight_bytes_per_token": 3_000_000_000, "kv_element_bytes": 2, "layers": 32, "kv_heads": 32,
             "head_dim": 128, "model_bytes": 4 * 2**30}
    row = {"bundle": "b", "variant": "cuda", "precision": "int4", "load_s": 1.0, "prefill_tokens_per_s": 1000.0,
           "ttft_ms": 10.0, "decode_tokens_per_s": {128: 300.0, 2048: 290.0}, "gpu_memory_mib": 100}
    out = gpu_decode.add_roofline(row, facts, gbps=4000.0)
    kv_2048 = 2 * 32 * 32 * 128 * 2048 * 2
    assert out["roofline_tokens_per_s"][2048] == pytest.approx(4000e9 / (3_000_000_000 + kv_2048))
    assert out["roofline_percent"][128] == pytest.approx(100 * 300.0 * (3_000_000_000 + kv_2048 // 16) / 4000e9)
    peer = gpu_decode.add_roofline({**row, "bundle": "genai-int4", "variant": "onnxruntime-genai",
                                    "decode_tokens_per_s": {128: 200.0, 2048: 290.0}}, facts, gbps=4000.0)
    gpu_decode.add_ratios([out, peer])
    assert peer["ours_over_this"] == {128: 1.5, 2048: 1.0} and out["ours_over_this"][128] == 1.0
    table = gpu_decode.format_table([out, peer], [128, 2048])
    assert "| b | cuda | int4 | 4.00 GiB |" in table and "300.0" in table and "100 MiB" in table
    assert "| genai-int4 | onnxruntime-genai |" in table and "| 1.50 | 1.00 |" in table


def test_speed_profile_turns_off_only_the_scale_search(gpu_decode, tmp_path):
    fast = load_profile(gpu_decode.speed_profile("nvidia-gpu", tmp_path))
    real = load_profile("nvidia-gpu")
    assert fast.quantization.scale_search is False and real.quantization.scale_search is True
    assert fast.quantization.block_size == real.quantization.block_size and fast.name == real.name


def test_speed_profile_takes_another_int4_layout(gpu_decode, tmp_path):
    """--block-size / --symmetric: the layout onnxruntime's TensorRT-LLM int4 kernels take (blocks
    of 32, no zero points), with or without the scale search; nothing else of the profile changes."""
    real = load_profile("nvidia-gpu")
    b32 = load_profile(gpu_decode.speed_profile("nvidia-gpu", tmp_path, block_size=32, symmetric=True))
    assert (b32.quantization.block_size, b32.quantization.symmetric, b32.quantization.scale_search) == (32, True, False)
    assert b32.name == real.name and b32.execution_providers == real.execution_providers
    searched = load_profile(gpu_decode.speed_profile("nvidia-gpu", tmp_path, search=True, block_size=64))
    assert (searched.quantization.block_size, searched.quantization.symmetric) == (64, real.quantization.symmetric)
    assert searched.quantization.scale_search is True
    a = gpu_decode.parse_args(["--synthetic-7b", "c", "--block-size", "32", "--symmetric", "true"])
    assert gpu_decode.layout_args(a) == ["--block-size", "32", "--symmetric", "true"]


def test_prepares_an_int4_bundle_in_another_layout(gpu_decode, tiny_checkpoint, tmp_path, capsys):
    assert gpu_decode.main(["--synthetic-7b", str(tiny_checkpoint), "--workdir", str(tmp_path / "b32"),
                            "--prepare-only", "--precision", "int4", "--max-context", "128",
                            "--block-size", "32", "--symmetric", "true"]) == 0
    quant = load_bundle(capsys.readouterr().out.split()[0]).manifest["quantization"]
    assert (quant["block_size"], quant["symmetric"], quant["algorithm"]) == (32, True, "rtn")


def test_refuses_without_a_cuda_provider_or_with_a_folder_that_is_no_model(gpu_decode, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="is neither a bundle .bundle.json. nor onnxruntime-genai's model"):
        gpu_decode.main(["--bundle", str(tmp_path)])
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    (tmp_path / "bundle.json").write_text("{}")
    with pytest.raises(SystemExit, match="has no CUDAExecutionProvider: install onnxruntime-gpu"):
        gpu_decode.main(["--bundle", str(tmp_path)])


def test_session_config_entries_reach_each_step_and_label_the_rows(gpu_decode):
    """--session-config KEY=VALUE (repeatable) goes to every step's engine (in its own process)
    and names the rows it made, beside the variant."""
    a = gpu_decode.parse_args(["--bundle", "b", "--session-config", "ep.cuda.fpa_intb_gemm=1",
                               "--session-config", "x.y=a=b"])
    assert a.session_config == [("ep.cuda.fpa_intb_gemm", "1"), ("x.y", "a=b")]
    args = gpu_decode.step_args(a, bundle="b", variant="cuda-graph")
    assert gpu_decode.parse_args(["--step", "run", *args]).session_config == a.session_config
    with pytest.raises(SystemExit):
        gpu_decode.parse_args(["--bundle", "b", "--session-config", "no-value"])
    facts = {"weight_bytes_per_token": 1000, "kv_element_bytes": 2, "layers": 1, "kv_heads": 1, "head_dim": 8,
             "model_bytes": 2**30}
    row = gpu_decode.add_roofline({"bundle": "int4-b32", "variant": "cuda-graph", "precision": "int4",
                                   "session_config": {"ep.cuda.fpa_intb_gemm": "1"}, "load_s": 1.0,
                                   "prefill_tokens_per_s": 1.0, "ttft_ms": 1.0, "decode_tokens_per_s": {128: 2.0}},
                                  facts, gbps=1.0)
    assert "| int4-b32 | cuda-graph ep.cuda.fpa_intb_gemm=1 | int4 |" in gpu_decode.format_table([row], [128])


def test_onnxruntime_genai_int4_takes_our_layout_through_its_own_options(gpu_decode, tmp_path):
    """int4_block_size / int4_is_symmetric (the builder ignores other keys): the profile's layout,
    or --block-size / --symmetric; fp16 gets no int4 options."""
    def extra(*argv):
        a = gpu_decode.parse_args(["--synthetic-7b", "ck", *argv])
        cmd = gpu_decode.genai_builder_command(a, tmp_path / "m", tmp_path / "c")
        return cmd[cmd.index("--extra_options") + 1:] if "--extra_options" in cmd else []

    real = load_profile("nvidia-gpu").quantization
    assert extra("--precision", "int4") == [f"int4_block_size={real.block_size}",
                                            f"int4_is_symmetric={str(real.symmetric).lower()}"]
    assert extra("--precision", "int4", "--block-size", "32", "--symmetric", "true") == [
        "int4_block_size=32", "int4_is_symmetric=true"]
    assert extra("--precision", "fp16") == []


def test_session_config_keys_are_checked_like_a_profiles(gpu_decode):
    for bad in ("fpa_intb_gemm=1", "ep cuda=1", "=1"):
        with pytest.raises(SystemExit):
            gpu_decode.parse_args(["--bundle", "b", "--session-config", bad])
