"""Export -> bundle -> load, on small Code Llama-shaped checkpoints, against torch."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch_reference
from edge_runtime.bundle import MANIFEST_NAME, load_bundle
from edge_runtime.errors import BundleError
from edge_runtime.engine import DECODERS, PREFILL_CHUNK
from edge_runtime.gqa_decoder import INT8_STEP_ROWS_MAX, chunk_bounds

PROMPTS = (
    [1, 822, 18755, 29898, 29876, 1125],  # "def fib(n):"
    [1, 5215, 2897, 13, 5215, 10876, 13, 13],  # "import os\nimport sys\n\n"
    [1, 32007, 822, 788, 29898, 29874, 29892, 289, 1125, 32008, 13, 32009],  # an infill-shaped prompt
)


def decoder_for(bundle_dir: Path, max_length: int = 256):
    """The decoder of the bundle's graph flavour (the fixtures' default: gqa-shared-kv)."""
    import onnxruntime as ort

    bundle = load_bundle(bundle_dir)
    session = ort.InferenceSession(str(bundle.graph_path), providers=["CPUExecutionProvider"])
    return DECODERS[bundle.graph_flavour](ort, session, bundle.architecture, device="cpu", max_length=max_length)


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_manifest(bundle: Path, change) -> None:
    path = bundle / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_fp32_bundle_logits_match_torch(tiny_bundle, tiny_checkpoint):
    decoder = decoder_for(tiny_bundle)
    for ids in PROMPTS:
        cache = decoder.new_cache(len(ids))
        ours = decoder.prefill(cache, np.asarray(ids))  # [S, V], or [1, V] (last position) for the fused graph
        ref = torch_reference.prompt_logits(tiny_checkpoint, ids)[-len(ours):]
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() < 1e-4


def test_fp32_bundle_greedy_tokens_equal_torch(tiny_bundle, tiny_checkpoint):
    decoder = decoder_for(tiny_bundle)
    for ids in PROMPTS:
        cache = decoder.new_cache(len(ids) + 32)
        token = int(decoder.prefill(cache, np.asarray(ids))[-1].argmax())
        ours = [token]
        for _ in range(31):
            token = int(decoder.decode(cache, token).argmax())
            ours.append(token)
        assert ours == torch_reference.greedy(tiny_checkpoint, ids, 32)


def test_manifest_records_what_the_device_needs(tiny_bundle):
    manifest = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 1
    assert manifest["architecture"]["num_kv_heads"] == 2 and manifest["architecture"]["num_heads"] == 4
    assert manifest["architecture"]["rope_theta"] == 1_000_000.0
    assert manifest["tokenizer"]["supports_infill"] is True
    assert manifest["tokenizer"]["infill"] == {"pre": 32007, "suf": 32008, "mid": 32009, "eot": 32010}
    assert manifest["precision"] == "fp32" and manifest["quantization"] is None
    assert "past_key_values.0.key" in manifest["graph"]["inputs"] and manifest["graph"]["outputs"][0] == "logits"
    assert manifest["fidelity"]["passed"] is True and manifest["fidelity"]["greedy_agreement"] == 1.0
    # 512 corpus tokens in windows of 256 positions, each led by BOS: 3 windows, 515 positions
    assert manifest["fidelity"]["corpus_positions"] == 515
    assert manifest["fidelity"]["kl_divergence_mean"] < 1e-6 and manifest["fidelity"]["kl_divergence_p99"] < 1e-5
    assert {"onnxruntime", "torch", "transformers"} <= set(manifest["tools"])
    graph_files = {"model.onnx", "model.onnx.data"} if manifest["graph"]["flavour"] == "gqa-shared-kv" else {"model.onnx"}
    assert {f["path"] for f in manifest["files"]} == graph_files | {"tokenizer.json", "LICENSE"}


def test_a_model_that_does_not_infill_is_measured_without_infill_prompts(tiny_checkpoint, tmp_path):
    """A Python variant (here by its folder's name) has the infilling tokens but was not trained
    for infill: the bundle says no infill, and the fidelity measure runs no infill prompts."""
    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress

    folder = shutil.copytree(tiny_checkpoint, tmp_path / "CodeLlama-7b-Python-hf")
    run_export(ExportOptions(checkpoint=folder, profile="cpu-x86_64", output=tmp_path / "b", precision="fp32",
                             fidelity_tokens=4, fidelity_corpus_tokens=0), Progress(5, enabled=False))
    manifest = load_bundle(tmp_path / "b").manifest
    assert manifest["family"]["variant"] == "python" and manifest["tokenizer"]["supports_infill"] is False
    assert {p["mode"] for p in manifest["fidelity"]["per_prompt"]} == {"complete"}
    assert manifest["fidelity"]["prompts"] == 8


def test_a_tied_checkpoint_with_a_stale_lm_head_weight_uses_the_embedding_as_transformers_does(tiny_checkpoint,
                                                                                               tmp_path, exporter):
    """config.json ties the lm_head to the embedding, and the weights also hold an lm_head.weight
    (left by a conversion): transformers multiplies by the embedding, and so does the bundle (it
    took lm_head.weight: greedy agreement 0, or with --skip-fidelity a bundle of another model)."""
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "tied")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    bundle = exporter(folder, tmp_path / "b", skip_fidelity=True)
    decoder = decoder_for(bundle)
    ids = PROMPTS[0]
    ours = decoder.prefill(decoder.new_cache(len(ids)), np.asarray(ids))
    ref = torch_reference.prompt_logits(folder, ids)[-len(ours):]
    assert np.abs(ours - ref).max() < 1e-4


def test_noinfill_checkpoint_is_recorded_without_infill(noinfill_bundle):
    bundle = load_bundle(noinfill_bundle)
    assert bundle.supports_infill is False and bundle.manifest["tokenizer"]["infill"] is None
    assert bundle.architecture.num_kv_heads == 8 and bundle.architecture.vocab_size == 32000


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json", "LICENSE"])
def test_flipped_byte_in_any_file_is_refused(tiny_bundle, tmp_path, name):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    path = bundle / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name}: SHA-256 does not match"):
        load_bundle(bundle)
    cli = subprocess.run([sys.executable, "-m", "edge_runtime", "verify", "--bundle", str(bundle)],
                         capture_output=True, text=True)
    assert cli.returncode != 0 and name in cli.stderr


@pytest.mark.parametrize("change,words", [(lambda data: data[:-1], "is truncated"),
                                          (lambda data: data + b"\n", "is larger than exported")])
def test_a_file_of_another_size_is_refused_saying_how(tiny_bundle, tmp_path, change, words):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    path = bundle / "tokenizer.json"
    path.write_bytes(change(path.read_bytes()))
    with pytest.raises(BundleError, match=f"tokenizer.json: size .* does not match the manifest .*: the file {words}"):
        load_bundle(bundle)


def test_a_file_cut_short_is_refused_before_any_file_is_hashed(tiny_bundle, tmp_path):
    """The last file the manifest lists cut short (what a power cut soon after a copy leaves):
    refused at once by its size. Every file before it was hashed first, gigabytes of weights
    on a 7B bundle, read from an SD card at each of systemd's restarts before the same refusal."""
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    last = load_bundle(bundle).manifest["files"][-1]["path"]
    assert last not in ("model.onnx", "model.onnx.data")  # the weights come before it
    (bundle / last).write_bytes(b"")
    hashed = []
    with pytest.raises(BundleError, match=f"{last}: size 0 does not match the manifest"):
        load_bundle(bundle, progress=hashed.append)
    assert hashed == []


def test_verify_names_files_the_manifest_does_not_list_and_still_passes(tiny_bundle, tmp_path):
    """A stale file left by copying a new bundle over an old folder is not the bundle's:
    nothing reads it, so verify passes, but it says so rather than print a bare ok."""
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    (bundle / "model.onnx_data").write_bytes(b"an older export's weights")
    cli = subprocess.run([sys.executable, "-m", "edge_runtime", "verify", "--bundle", str(bundle), "--quiet"],
                         capture_output=True, text=True)
    assert cli.returncode == 0 and cli.stdout.startswith("ok: "), cli.stderr
    assert "holds files bundle.json does not list (not part of the bundle, not checked): model.onnx_data" in cli.stderr


def test_a_pinned_bundle_json_is_required_before_anything_is_hashed(tiny_bundle, tmp_path, monkeypatch):
    from edge_runtime import bundle as bundle_module
    from edge_runtime.config import load_config
    from edge_runtime.engine import Engine

    pin = load_bundle(tiny_bundle).manifest_sha256
    assert load_bundle(tiny_bundle, pinned_sha256=pin).manifest_sha256 == pin
    edited = copy_bundle(tiny_bundle, tmp_path / "b")
    rewrite_manifest(edited, lambda m: m.update(context_limit=m["context_limit"] * 2))  # every file hash still right
    monkeypatch.setattr(bundle_module, "sha256_file", lambda path: pytest.fail("hashed before the pin was checked"))
    with pytest.raises(BundleError, match=f"bundle.json has SHA-256 [0-9a-f]{{64}}, not the {pin} that \\[model\\] "
                                          "bundle_sha256 pins"):
        Engine.from_bundle(edited, pinned_sha256=pin)
    config = load_config(None, {"model.bundle": str(edited), "model.bundle_sha256": pin, "mqtt.broker": "mqtt://h:1",
                                "mqtt.device_id": "d"}, check_files=False)
    assert config.model.bundle_sha256 == pin


@pytest.mark.parametrize("version", [99, True, "1", 1.0])
def test_wrong_format_version_is_refused(tiny_bundle, tmp_path, version):
    """true and 1.0 equal 1 in Python, not in the format: refused like any other."""
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    rewrite_manifest(bundle, lambda m: m.update(format_version=version))
    with pytest.raises(BundleError, match=f"unsupported format_version {re.escape(repr(version))}"):
        load_bundle(bundle)


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/passwd", "sub/../../x"])
def test_manifest_path_leaving_the_bundle_is_refused(tiny_bundle, tmp_path, bad):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    rewrite_manifest(bundle, lambda m: m["files"].append({"path": bad, "size": 1, "sha256": "0" * 64}))
    with pytest.raises(BundleError, match="relative path inside the bundle|leaves the bundle"):
        load_bundle(bundle)


@pytest.mark.parametrize("location", ["../weights.data", "/tmp/weights.data"])
def test_external_data_traversal_is_refused(tiny_bundle, tmp_path, location):
    """A graph whose external-data location leaves the folder is refused even when
    the manifest's hashes were edited to match it."""
    import onnx
    from edge_export.bundle_writer import write_manifest

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    model = onnx.load(str(bundle / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", location
    onnx.save(model, str(bundle / "model.onnx"))
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    for key in ("format", "format_version", "created", "tools", "files"):
        manifest.pop(key)
    write_manifest(bundle, manifest)  # hashes now match the tampered graph
    with pytest.raises(BundleError, match="external data file"):
        load_bundle(bundle)


def test_truncated_graph_is_refused_even_with_matching_hashes(tiny_bundle, tmp_path):
    from edge_export.bundle_writer import write_manifest

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    graph = bundle / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3])
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    for key in ("format", "format_version", "created", "tools", "files"):
        manifest.pop(key)
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match="not a valid ONNX file"):
        load_bundle(bundle)


@pytest.mark.parametrize("where, value, words", [
    ("architecture.num_layers", "8", "architecture.num_layers has the wrong type (str)"),
    ("architecture.head_dim", 0, "architecture.head_dim is 0, not a positive number"),
    ("architecture.rope_theta", float("nan"), "architecture.rope_theta is nan, not a positive number"),
    ("context_limit", -5, "context_limit is -5, not a number of tokens"),
    ("tokenizer.chat_format", "chatml", "tokenizer.chat_format 'chatml' is not a chat format this runtime builds "
                                        "(llama2, source-step)"),
    ("profile.kv_cache_dtype", "int4", "profile.kv_cache_dtype 'int4' is not one of float32, float16, int8"),
    ("profile.name", "/tmp/my-x86.toml", "profile.name '/tmp/my-x86.toml' is not a profile name"),
    ("licence_files", True, "licence_files is not a list of file names"),
    ("tokenizer.stop_ids", [2, 99999], "tokenizer.stop_ids is [2, 99999], not a list of token ids"),
    ("files.0.size", -1, "files[0].size is -1, not a size in bytes (LICENSE)"),
    ("files.0.sha256", "ABC", "files[0].sha256 'ABC' is not a SHA-256 (64 lowercase hex digits) (LICENSE)"),
])
def test_a_manifest_with_impossible_numbers_is_refused(tiny_bundle, tmp_path, where, value, words):
    """Caught by verify, not met later as a TypeError in fit or a negative KV cache."""
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")

    def change(m):
        *parents, key = where.split(".")
        node = m
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[key] = value

    rewrite_manifest(bundle, change)
    with pytest.raises(BundleError, match=re.escape(words)):
        load_bundle(bundle)
    for command in ("verify", "fit"):  # fit reads the sizes, the KV cache's dtype and the licence files
        cli = subprocess.run([sys.executable, "-m", "edge_runtime", command, "--bundle", str(bundle)],
                             capture_output=True, text=True)
        assert cli.returncode == 2 and words in cli.stderr and "Traceback" not in cli.stderr, cli.stderr


def test_missing_file_is_refused(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json: listed in bundle.json but missing"):
        load_bundle(bundle)


@pytest.mark.parametrize("make, words", [(lambda p: p.mkdir(), "a folder in the bundle"),
                                         (lambda p: os.mkfifo(p), "not a regular file in the bundle")])
def test_a_listed_name_that_is_not_a_regular_file_is_named_as_such(tiny_bundle, tmp_path, make, words):
    """A copy that made tokenizer.json a folder (or a pipe): not said to be missing."""
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    (bundle / "tokenizer.json").unlink()
    make(bundle / "tokenizer.json")
    with pytest.raises(BundleError, match=f"tokenizer.json: listed in bundle.json but {words}"):
        load_bundle(bundle)


def test_a_checkpoint_file_instead_of_its_folder_is_named_as_such(tmp_path):
    from edge_export.checkpoint import CheckpointError, read_checkpoint

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"--checkpoint {folder / 'config.json'} is a file: give the folder .*"
                                              f"\\({folder}\\)"):
        read_checkpoint(folder / "config.json")


def test_non_llama_checkpoint_is_refused(tmp_path):
    from edge_export.checkpoint import CheckpointError, read_checkpoint

    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="model_type='gpt2'.*only Llama-architecture"):
        read_checkpoint(folder)
    cli = subprocess.run([sys.executable, "-m", "edge_runtime", "export", "--checkpoint", str(folder), "--profile",
                          "cpu-x86_64", "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert cli.returncode == 2 and "GPT2LMHeadModel" in cli.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("option,value,message", [("fidelity_tokens", 0, "--fidelity-tokens 0"),
                                                  ("fidelity_corpus_tokens", -1, "--fidelity-corpus-tokens -1"),
                                                  ("kv_cache_bits", 4, "--kv-cache-bits 4"),
                                                  ("calibration_tokens", 10, "--calibration-tokens 10"),
                                                  ("calibration_text", Path("/nonexistent/code.py"),
                                                   "--calibration-text /nonexistent/code.py: no such file or folder"),
                                                  ("max_context", 8, "--max-context 8 is too small"),
                                                  ("max_context", 100_000, "--max-context 100000 is above the "
                                                   "cpu-x86_64 profile's max_context \\(4096\\)")])
def test_export_refuses_bad_options_before_any_work(tiny_checkpoint, tmp_path, option, value, message):
    from edge_export.pipeline import ExportError, ExportOptions, run_export

    with pytest.raises(ExportError, match=message):
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=tmp_path / "b",
                                 **{option: value}))
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()


@pytest.mark.parametrize("options, problem", [({"precision": "fp32"}, "--precision fp32 keeps the KV cache in float32"),
                                             ({"precision": "int4", "kv_cache_bits": 8},
                                              "an int8 KV cache (--kv-cache-bits 8, or the profile's kv_cache.bits)")])
def test_a_fused_graph_the_gpu_cannot_run_attention_of_is_refused(tiny_checkpoint, tmp_path, options, problem):
    """CUDA's GroupQueryAttention is float16-only: a float32 or int8 cache would put it on the CPU."""
    from edge_export.pipeline import ExportError, ExportOptions, run_export

    with pytest.raises(ExportError, match=f"{re.escape(problem)}, but the nvidia-gpu profile runs on the GPU"):
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="nvidia-gpu", output=tmp_path / "b",
                                 skip_fidelity=True, **options))
    assert not (tmp_path / "b").exists()


def test_a_float32_cache_bundle_is_refused_on_the_gpu_before_any_gpu_work(tiny_bundle):
    import onnxruntime as ort

    from edge_runtime.errors import ConfigError
    from edge_runtime.gqa_decoder import SharedKVDecoder

    bundle = load_bundle(tiny_bundle)  # fp32: a float32 KV cache
    session = ort.InferenceSession(str(bundle.graph_path), providers=["CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="KV cache is float32, and on the GPU the fused graph's attention runs in "
                                          "float16 only"):
        SharedKVDecoder(ort, session, bundle.architecture, device="cuda", max_length=64)


def test_export_whose_torch_reference_cannot_fit_is_refused_before_any_work(tiny_checkpoint, tmp_path,
                                                                            monkeypatch):
    """The fidelity step holds the original in float32 in torch (27 GiB for a 7B): on a machine
    without that much, the export says so at once instead of being killed after the graph."""
    from edge_export import pipeline
    from edge_export.pipeline import ExportError, ExportOptions, run_export

    monkeypatch.setattr(pipeline, "host_memory_available", lambda: 1 << 20)  # 1 MiB left
    options = {"checkpoint": tiny_checkpoint, "profile": "cpu-x86_64", "output": tmp_path / "b"}
    with pytest.raises(ExportError, match="measuring fidelity against torch holds tiny-codellama in float32 in "
                                          "torch: about .* MiB, and this machine has 1.0 MiB available .*"
                                          "add --skip-fidelity"):
        run_export(ExportOptions(**options))
    with pytest.raises(ExportError, match="optimum's exporter holds .*use --graph fused"):
        run_export(ExportOptions(**options, graph="optimum", skip_fidelity=True))
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()
    run_export(ExportOptions(**options, skip_fidelity=True, precision="fp32"))  # the fused graph needs no torch
    assert (tmp_path / "b" / "bundle.json").is_file()


@pytest.mark.parametrize("bits,kv_type", [(None, "tensor(int8)"), (0, "tensor(float)"), (8, "tensor(int8)")])
def test_kv_cache_bits_follow_the_profile_unless_overridden(tiny_checkpoint, tmp_path, bits, kv_type):
    import onnxruntime as ort

    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress

    out = tmp_path / "b"
    run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=out, precision="int4",
                             graph="fused", kv_cache_bits=bits, skip_fidelity=True), Progress(5, enabled=False))
    bundle = load_bundle(out)
    session = ort.InferenceSession(str(bundle.graph_path), providers=["CPUExecutionProvider"])
    assert {i.name: i.type for i in session.get_inputs()}["past_key_values.1.value"] == kv_type
    assert (bundle.manifest["kv_cache"] is not None) == (kv_type == "tensor(int8)")
    assert bundle.manifest["profile"]["kv_cache_dtype"] == ("int8" if kv_type == "tensor(int8)" else "float32")
    assert bundle.int8_kernel_rows == (INT8_STEP_ROWS_MAX if kv_type == "tensor(int8)" else None)


def test_fp16_on_a_cpu_profile_is_stored_as_float32_as_fit_estimates_and_the_export_says(tiny_checkpoint,
                                                                                         tmp_path):
    """The fused graph keeps weights in its activations' type: float32 on a CPU profile, so an
    fp16 bundle there is fp32's size; memory_fit's estimate counts that, and the export warns."""
    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress
    from edge_runtime.memory_fit import ModelShape, bundle_plan, estimate_plan, estimate_weight_bytes
    from edge_runtime.profiles import load_profile

    lines: list[str] = []
    progress = Progress(5, enabled=False)
    progress.detail = lines.append
    run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=tmp_path / "b",
                             precision="fp16", skip_fidelity=True), progress)
    assert any("warning: --precision fp16 on the cpu-x86_64 profile stores the weights in float32" in line
               for line in lines), lines
    cpu = load_profile("cpu-x86_64")
    written = bundle_plan(load_bundle(tmp_path / "b"), cpu).weights_bytes
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    shape = ModelShape("tiny", config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                       config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"])
    assert estimate_weight_bytes(shape, "fp16", block_size=128, symmetric=False, float_dtype="float32") == \
        shape.parameter_count * 4
    estimate = estimate_plan(shape, cpu, "fp16", 256).weights_bytes
    assert written <= estimate < written * 1.05, (written, estimate)


def test_only_cpu_profiles_bundles_take_several_rows_of_logits(tiny_checkpoint, tmp_path, exporter):
    """The optional logits_start input (prompt lookup's runs) is in CPU profiles' graphs; GPU
    profiles' graphs keep a constant last-position slice until a GPU run tests the input."""
    from edge_runtime.engine import Engine

    cpu = exporter(tiny_checkpoint, tmp_path / "cpu", precision="fp32", skip_fidelity=True)
    gpu = exporter(tiny_checkpoint, tmp_path / "gpu", precision="fp16", profile="nvidia-gpu",
                   skip_fidelity=True, allow_degraded=True)
    assert "logits_start" in load_bundle(cpu).manifest["graph"]["inputs"]
    assert "logits_start" not in load_bundle(gpu).manifest["graph"]["inputs"]
    assert Engine.from_bundle(cpu).prompt_lookup
    assert not Engine.from_bundle(gpu, "cpu-x86_64").prompt_lookup  # run on the CPU, still no runs of rows


def test_the_decoder_keeps_prefill_chunks_longer_than_the_bundles_int8_kernel_share(tiny_checkpoint, tmp_path):
    """The int8-kernel share is baked into the graph at export and recorded in the manifest
    and the graph's metadata: the engine's decoder takes it from there and keeps a prompt's
    later chunks longer (a share of 100 would chunk by its own), and a manifest whose share
    is not the graph's, or is nonsense, is refused by name."""
    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress
    from edge_runtime.engine import Engine

    out = tmp_path / "b"
    run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=out, precision="int4",
                             graph="fused", kv_cache_bits=8, skip_fidelity=True), Progress(5, enabled=False))
    assert Engine.from_bundle(out, check_memory=False).decoder.int8_kernel_rows == INT8_STEP_ROWS_MAX
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["kv_cache"]["int8_kernel_rows_after_cache"] = 100
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"int8_kernel_rows_after_cache \(100\) is not the graph's \(32\)"):
        Engine.from_bundle(out, check_memory=False)
    bounds = chunk_bounds(600, PREFILL_CHUNK, 100)
    assert all(end - start > 100 for start, end in bounds[1:]) and bounds[-1][1] == 600
    manifest["kv_cache"]["int8_kernel_rows_after_cache"] = 256  # half the engine's prefill chunk of 512
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"int8_kernel_rows_after_cache \(256\) is not below half"):
        Engine.from_bundle(out, check_memory=False)
    manifest["kv_cache"]["int8_kernel_rows_after_cache"] = -1
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="kv_cache.int8_kernel_rows_after_cache"):
        load_bundle(out)


def test_export_refuses_to_overwrite_an_existing_bundle(tiny_checkpoint, tiny_bundle):
    from edge_export.pipeline import ExportError, ExportOptions, run_export

    before = (tiny_bundle / MANIFEST_NAME).read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=tiny_bundle))
    assert (tiny_bundle / MANIFEST_NAME).read_bytes() == before


@pytest.mark.parametrize("where", ["checkpoint", "parent", "file", "other-folder", "other-bundle-json"])
def test_force_replaces_only_an_earlier_bundle(tiny_checkpoint, tmp_path, where):
    """--force must not delete what is not a bundle: the checkpoint, a folder holding
    it, a file, someone's other folder, or one whose bundle.json is another program's."""
    from edge_export.pipeline import ExportError, ExportOptions, run_export

    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "models" / "ck")
    (tmp_path / "models" / "notes.txt").write_text("mine")
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / MANIFEST_NAME).write_text(json.dumps({"name": "my web app", "version": "1.2"}))
    (tmp_path / "app" / "index.js").write_text("mine")
    output, message = {"checkpoint": (checkpoint, "is the checkpoint's folder or holds it"),
                       "parent": (tmp_path / "models", "is the checkpoint's folder or holds it"),
                       "file": (tmp_path / "a-file", "is a file, not a bundle folder"),
                       "other-folder": (tmp_path / "other", "is not a bundle \\(no bundle.json\\) and not empty"),
                       "other-bundle-json": (tmp_path / "app", f"--output {tmp_path / 'app'} is not an edge-runtime "
                                                                "bundle .*not an edge-runtime-bundle manifest")}[where]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(ExportError, match=message):
        run_export(ExportOptions(checkpoint=checkpoint, profile="cpu-x86_64", output=output, force=True,
                                 precision="fp32", skip_fidelity=True))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_force_keeps_an_earlier_bundles_folder_that_holds_files_it_does_not_list(tiny_checkpoint, tiny_bundle,
                                                                                 tmp_path):
    """Files someone put in a bundle's folder are not the bundle's: --force names them and
    deletes nothing."""
    from edge_export.pipeline import ExportError, ExportOptions, run_export

    out = copy_bundle(tiny_bundle, tmp_path / "b")
    (out / "notes.txt").write_text("mine")
    (out / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("mine")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(ExportError, match=f"--output {out} is an earlier bundle, but it also holds files its "
                                          "bundle.json does not list: notes.txt, runs/log.txt; .*Move them out"):
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=out, force=True,
                                 precision="fp32", skip_fidelity=True))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("suffix", [".partial", ".replaced"])
def test_scratch_folders_are_removed_only_when_an_export_left_them(tiny_checkpoint, tmp_path, suffix):
    """<output>.partial and <output>.replaced are the export's scratch names: a folder there
    that is someone's is named and kept (with or without --force); one an earlier export
    left (its marker or an edge-runtime manifest) is cleared and the export goes on."""
    from edge_export.pipeline import ExportError, ExportOptions, run_export

    scratch = tmp_path / ("b" + suffix)
    scratch.mkdir()
    (scratch / "thesis.tex").write_text("mine")
    options = dict(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=tmp_path / "b", precision="fp32",
                   skip_fidelity=True)
    for force in (False, True):
        with pytest.raises(ExportError, match=f"{re.escape(str(scratch))} is in the way: .*not a folder an earlier "
                                              "export left"):
            run_export(ExportOptions(**options, force=force))
        assert sorted(p.name for p in tmp_path.iterdir()) == [scratch.name]
        assert (scratch / "thesis.tex").read_text() == "mine"

    from edge_export.bundle_writer import EXPORT_MARKER

    (scratch / EXPORT_MARKER).write_text("")  # as an export cut short (SIGKILL) leaves its staging folder
    run_export(ExportOptions(**options))
    assert load_bundle(tmp_path / "b").manifest["precision"] == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert EXPORT_MARKER not in {f["path"] for f in load_bundle(tmp_path / "b").manifest["files"]}
    assert not (tmp_path / "b" / EXPORT_MARKER).exists()


@pytest.mark.parametrize("where", ["under-a-file", "under-a-file-deeper", "read-only"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tiny_checkpoint, tmp_path, where):
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "locked").mkdir(mode=0o500)
    # root writes into a folder without write permission (CI runs as root); nobody creates folders in /sys
    locked = Path("/sys") if os.geteuid() == 0 else tmp_path / "locked"
    output, words = {"under-a-file": (tmp_path / "a-file" / "b", f"{tmp_path / 'a-file'} is a file, not a folder"),
                     "under-a-file-deeper": (tmp_path / "a-file" / "x" / "b",
                                             f"{tmp_path / 'a-file'} is a file, not a folder"),
                     "read-only": (locked / "edge-runtime-test" / "b", f"cannot create the bundle in {locked}")}[where]
    cli = subprocess.run([sys.executable, "-m", "edge_runtime", "export", "--checkpoint", str(tiny_checkpoint),
                          "--profile", "cpu-x86_64", "--output", str(output), "--skip-fidelity"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and f"error: --output {output}: {words}" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr and "[1/" not in cli.stderr + cli.stdout  # no step started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "locked"] and not any((tmp_path / "locked").iterdir())


def test_an_outputs_missing_folders_are_created(tiny_checkpoint, tmp_path):
    """`--output bundles/NAME` in a fresh clone (README, scripts/quickstart.sh): the folders are made."""
    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress

    out = tmp_path / "bundles" / "deeper" / "b"
    run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=out, precision="fp32",
                             skip_fidelity=True), Progress(5, enabled=False))
    assert load_bundle(out).manifest["precision"] == "fp32"
    assert sorted(p.name for p in out.parent.iterdir()) == ["b"]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_a_failed_export_removes_the_folders_it_made_for_output(tiny_checkpoint, tmp_path, monkeypatch, stop):
    """Ctrl-C or an error after the work began: the folders made for --output go with the
    staging folder (an empty `bundles/deeper/` was left behind); folders that were there stay."""
    from edge_export import pipeline
    from edge_export.pipeline import ExportOptions, run_export

    (tmp_path / "mine").mkdir()
    out = tmp_path / "mine" / "bundles" / "deeper" / "b"

    def fails(*args, **kwargs):
        raise stop()

    monkeypatch.setattr(pipeline, "write_manifest", fails)
    with pytest.raises((KeyboardInterrupt, pipeline.ExportError)):
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=out, precision="fp32",
                                 skip_fidelity=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and not any((tmp_path / "mine").iterdir())


def test_an_interrupted_export_says_that_nothing_was_written_and_the_earlier_bundle_is_kept(
        tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """Ctrl-C printed only 'error: interrupted': the user could not tell whether --force had
    already replaced the bundle they had."""
    from edge_export import pipeline
    from edge_export.pipeline import ExportOptions, run_export

    out = tmp_path / "b"
    options = ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=out, precision="fp32",
                            skip_fidelity=True, force=True)
    run_export(options)
    earlier = load_bundle(out).manifest

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_manifest", interrupted)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        run_export(options)
    assert f"interrupted: nothing was written, the earlier bundle at {out} is kept" in capsys.readouterr().err
    assert load_bundle(out).manifest == earlier


def test_an_unreadable_tokenizer_json_is_named(tiny_checkpoint, tmp_path):
    folder = broken_copy(tiny_checkpoint, tmp_path, "bad-tokenizer")
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:1000])  # an interrupted copy
    cli = subprocess.run([sys.executable, "-m", "edge_runtime", "export", "--checkpoint", str(folder), "--profile",
                          "cpu-x86_64", "--output", str(tmp_path / "out"), "--skip-fidelity"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and f"{tokenizer} cannot be read as a tokenizer" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr and not (tmp_path / "out").exists()


def test_an_empty_output_or_checkpoint_flag_is_refused_not_taken_for_the_current_folder(tiny_checkpoint, tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    for args, flag in (([str(tiny_checkpoint), ""], "--output"), (["", str(tmp_path / "out")], "--checkpoint")):
        cli = subprocess.run([sys.executable, "-m", "edge_runtime", "export", "--checkpoint", args[0], "--profile",
                              "cpu-x86_64", "--output", args[1], "--force", "--skip-fidelity", "--precision", "fp32"],
                             capture_output=True, text=True, cwd=here, timeout=300)
        assert cli.returncode == 2 and f"error: {flag} is empty" in cli.stderr, cli.stderr
        assert "Traceback" not in cli.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"] and not any(here.iterdir())


@pytest.mark.parametrize("argv, flag", [
    (["verify", "--bundle", ""], "--bundle"),
    (["fit", "--bundle", ""], "--bundle"),
    (["generate", "--bundle", "", "--prompt", "x"], "--bundle"),
    (["bench", "--bundle", "", "--no-roofline"], "--bundle"),
    (["generate", "--bundle", ".", "--profile", " ", "--prompt", "x"], "--profile"),
])
def test_an_empty_bundle_or_profile_flag_is_refused_not_taken_for_the_current_folder(tiny_bundle, tmp_path, argv,
                                                                                      flag):
    """`--bundle "$BUNDLE"` with the variable unset: not the folder the command runs in (here a
    bundle, which verify passed), nor, for --profile, the bundle's own profile."""
    here = copy_bundle(tiny_bundle, tmp_path / "here")
    cli = subprocess.run([sys.executable, "-m", "edge_runtime", *argv], capture_output=True, text=True, cwd=here,
                         timeout=300)
    assert cli.returncode == 2 and f"error: {flag} is empty" in cli.stderr, (cli.stdout, cli.stderr)


def test_force_replaces_an_earlier_bundle(tiny_checkpoint, tiny_bundle, tmp_path):
    from edge_export.pipeline import ExportOptions, run_export

    out = copy_bundle(tiny_bundle, tmp_path / "b")
    run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=out, force=True,
                             precision="int8", skip_fidelity=True))
    assert load_bundle(out).manifest["precision"] == "int8"


def test_an_export_stopped_while_it_replaces_a_bundle_leaves_the_earlier_one(tiny_checkpoint, tiny_bundle, tmp_path,
                                                                               monkeypatch):
    """Ctrl-C between moving the earlier bundle aside and renaming the new one into place:
    the earlier bundle is back under its name, whole, and no scratch folder is left."""
    from edge_export.pipeline import ExportOptions, run_export

    out = copy_bundle(tiny_bundle, tmp_path / "b")
    before = load_bundle(out).manifest["files"]
    rename = Path.rename

    def interrupted(self, target):
        if self.name.endswith(".partial"):
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=out, force=True,
                                 precision="int8", skip_fidelity=True))
    assert load_bundle(out).manifest["files"] == before  # verified: every hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_an_export_that_fills_the_disk_exits_2_naming_it_and_keeps_the_earlier_bundle(tiny_checkpoint, tiny_bundle,
                                                                                     tmp_path):
    """The disk fills while the graph is written (here: a file-size limit, EFBIG, which a full
    disk's ENOSPC takes the same way): exit 2 with what happened and where, the staging folder
    removed, the earlier bundle --force was to replace still whole under its name."""
    out = copy_bundle(tiny_bundle, tmp_path / "b")
    before = load_bundle(out).manifest["files"]
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))\n"
              "from edge_runtime.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    cli = subprocess.run([sys.executable, "-c", script, "export", "--checkpoint", str(tiny_checkpoint), "--profile",
                          "cpu-x86_64", "--output", str(out), "--precision", "fp32", "--skip-fidelity", "--force"],
                         capture_output=True, text=True)
    assert cli.returncode == 2, cli.stderr
    assert f"the export could not write the bundle in {out}.partial (File too large" in cli.stderr, cli.stderr
    assert f"nothing was written, the earlier bundle at {out} is kept" in cli.stderr and "Traceback" not in cli.stderr
    assert load_bundle(out).manifest["files"] == before  # verified: every hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize("interrupts", [1, 2])
def test_an_export_stopped_after_the_new_bundle_took_the_name_is_complete(tiny_checkpoint, tiny_bundle, tmp_path,
                                                                          monkeypatch, interrupts):
    """Ctrl-C while --force removes the earlier bundle (the new one already has its name): the
    export is done, not "interrupted"; the removal is finished, or (a second Ctrl-C) what is
    left of the earlier bundle does not stop the next export, which removes it."""
    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress

    out = copy_bundle(tiny_bundle, tmp_path / "b")
    replaced, partial = tmp_path / "b.replaced", tmp_path / "b.partial"
    unlink, fired = os.unlink, []

    def interrupted(path, *args, **kwargs):
        if len(fired) < interrupts and replaced.exists() and out.exists() and not partial.exists():
            fired.append(path)
            raise KeyboardInterrupt
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", interrupted)
    said = io.StringIO()
    try:
        summary = run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=out, force=True,
                                           precision="int8", skip_fidelity=True), Progress(5, stream=said))
    except KeyboardInterrupt:
        pytest.fail("the export said 'interrupted' with the new bundle already in place")
    finally:
        monkeypatch.undo()
    assert len(fired) == interrupts and summary.precision == "int8"
    assert load_bundle(out).manifest["precision"] == "int8"  # whole: every hash
    assert "the new bundle is in place" in said.getvalue()
    if interrupts == 1:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    else:
        assert replaced.exists() and f"{replaced} (the earlier bundle, or what is left of it) is still there" \
            in said.getvalue()
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=out, force=True,
                                 precision="fp32", skip_fidelity=True), Progress(5, enabled=False))
        assert load_bundle(out).manifest["precision"] == "fp32"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_failed_export_does_not_bring_back_what_an_earlier_one_left_aside(tiny_checkpoint, tiny_bundle, tmp_path,
                                                                            monkeypatch):
    """A `.replaced` an earlier export left half removed, the bundle at --output since deleted:
    an export that fails leaves --output as it was (absent), not the leftover under its name."""
    from edge_export import pipeline
    from edge_export.pipeline import ExportOptions, run_export

    leftover = tmp_path / "b.replaced"
    leftover.mkdir()
    shutil.copy(tiny_bundle / MANIFEST_NAME, leftover / MANIFEST_NAME)  # what a cut-short removal leaves
    out = tmp_path / "b"

    def fails(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_manifest", fails)
    with pytest.raises(KeyboardInterrupt):
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=out, precision="fp32",
                                 skip_fidelity=True))
    assert not out.exists() and not (tmp_path / "b.partial").exists()


def broken_copy(tiny_checkpoint: Path, tmp_path: Path, name: str) -> Path:
    return shutil.copytree(tiny_checkpoint, tmp_path / name)


def test_a_truncated_or_missing_shard_is_refused_at_once_with_the_file_named(tiny_checkpoint, tmp_path):
    from edge_export.checkpoint import CheckpointError, read_checkpoint

    truncated = broken_copy(tiny_checkpoint, tmp_path, "truncated")
    weights = sorted(truncated.glob("*.safetensors"))[-1]
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{weights.name} is truncated .* download it again"):
        read_checkpoint(truncated)
    cli = subprocess.run([sys.executable, "-m", "edge_runtime", "export", "--checkpoint", str(truncated), "--profile",
                          "cpu-x86_64", "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert cli.returncode == 2 and "is truncated" in cli.stderr and "Traceback" not in cli.stderr

    missing = broken_copy(tiny_checkpoint, tmp_path, "missing")
    shard = (missing / "model.safetensors").rename(missing / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": shard.name,
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (missing / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names 2 weight files and 1 are missing "
                                              "\\(model-00002-of-00002.safetensors\\)"):
        read_checkpoint(missing)


@pytest.mark.parametrize("header, words", [
    ([], "is not a readable safetensors file"),
    ({"w": 3}, "is not a readable safetensors file"),
    ({"w": {"dtype": "F32", "shape": [1]}}, "is not a readable safetensors file"),  # no data_offsets
    ({"w": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}}, "tensor w is I8, not a float"),
])
def test_a_weights_file_that_is_not_float_safetensors_is_refused(tiny_checkpoint, tmp_path, header, words):
    from edge_export.checkpoint import CheckpointError, read_checkpoint

    folder = broken_copy(tiny_checkpoint, tmp_path, "odd")
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(4))
    with pytest.raises(CheckpointError, match=words):
        read_checkpoint(folder)


def _save_tensors(file: Path, tensors: dict) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(file))


def _tensors(file: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(file))


def test_weights_are_read_from_the_files_transformers_would_read(tiny_checkpoint, tmp_path):
    """model.safetensors, or the shards the index names; a stale file beside them is not read
    (and the export says so), two sets or shards without their index are refused at once."""
    from edge_export.checkpoint import CheckpointError, read_checkpoint

    folder = broken_copy(tiny_checkpoint, tmp_path, "stale")
    tensors = _tensors(folder / "model.safetensors")
    _save_tensors(folder / "model-00001-of-00002.safetensors",
                  {"model.norm.weight": np.zeros_like(tensors["model.norm.weight"])})  # an older download's
    info = read_checkpoint(folder)
    assert [p.name for p in info.weight_files] == ["model.safetensors"]
    assert [p.name for p in info.ignored_files] == ["model-00001-of-00002.safetensors"]

    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors nor model.safetensors.index.json"):
        read_checkpoint(folder)

    both = broken_copy(tiny_checkpoint, tmp_path, "both")
    _save_tensors(both / "model-00001-of-00001.safetensors", tensors)
    (both / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: "model-00001-of-00001.safetensors" for name in tensors}}))
    with pytest.raises(CheckpointError, match="both model.safetensors and model.safetensors.index.json"):
        read_checkpoint(both)
    (both / "model.safetensors").unlink()
    assert [p.name for p in read_checkpoint(both).weight_files] == ["model-00001-of-00001.safetensors"]

    # an index that places a tensor in a shard that does not hold it: shards of two downloads
    index = json.loads((both / "model.safetensors.index.json").read_text())
    _save_tensors(both / "model-00002-of-00002.safetensors", {"extra": np.zeros(2, np.float32)})
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (both / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="puts 1 tensors where they are not, e.g. lm_head.weight in "
                                              "model-00002-of-00002.safetensors \\(it is in model-00001"):
        read_checkpoint(both)


def test_a_broken_link_to_the_weights_is_a_clear_error(tiny_checkpoint, tmp_path):
    from edge_export.checkpoint import CheckpointError, read_checkpoint

    folder = broken_copy(tiny_checkpoint, tmp_path, "link")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(tmp_path / "blobs" / "gone")
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read .*broken link"):
        read_checkpoint(folder)


@pytest.mark.parametrize("change, words", [
    ("drop lm_head", "lm_head.weight is missing \\(config.json tie_word_embeddings is false\\)"),
    ("kv heads", "k_proj.weight is \\[32, 64\\], config.json implies \\[64, 64\\] \\(num_key_value_heads 4"),
    ("vocab", "embed_tokens.weight is \\[32016, 64\\], config.json implies \\[32100, 64\\] \\(vocab_size 32100"),
    ("fewer layers", "more decoder layers than config.json's num_hidden_layers \\(1\\)"),
])
def test_a_config_that_does_not_match_its_weights_is_refused_before_any_work(tiny_checkpoint, tmp_path, change,
                                                                             words):
    from edge_export.checkpoint import CheckpointError
    from edge_export.pipeline import ExportOptions, run_export

    folder = broken_copy(tiny_checkpoint, tmp_path, "mismatch")
    config = json.loads((folder / "config.json").read_text())
    if change == "drop lm_head":
        tensors = _tensors(folder / "model.safetensors")
        del tensors["lm_head.weight"]
        _save_tensors(folder / "model.safetensors", tensors)
    else:
        config.update({"kv heads": {"num_key_value_heads": None}, "vocab": {"vocab_size": 32100},
                       "fewer layers": {"num_hidden_layers": 1}}[change])
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=words):
        run_export(ExportOptions(checkpoint=folder, profile="cpu-x86_64", output=tmp_path / "out",
                                 precision="fp32", skip_fidelity=True))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("change, words", [
    (lambda c: c.pop("hidden_size"), "config.json has no hidden_size; a Llama config.json gives"),
    (lambda c: c.pop("intermediate_size"), "config.json has no intermediate_size"),
    (lambda c: c.update(num_attention_heads=None), "config.json has no num_attention_heads (it is null)"),
    (lambda c: c.update(num_hidden_layers="2"), "config.json's num_hidden_layers is \"2\", not a positive whole"),
    (lambda c: c.update(num_key_value_heads=0), "config.json's num_key_value_heads is 0, not a positive whole"),
    (lambda c: c.update(rms_norm_eps=None), "config.json's rms_norm_eps is null, not a positive number"),
    (lambda c: c.update(rope_theta=None), "config.json's rope_theta is null, not a positive number"),
    (lambda c: c.update(rope_theta=10**400),  # past any float: not an OverflowError traceback
     "config.json's rope_theta is 1" + "0" * 400 + ", not a positive number"),
])
def test_a_config_without_its_sizes_is_one_line_naming_the_key(tiny_checkpoint, tmp_path, change, words):
    """A config.json missing a size, or with a hand-edited one: exit 2 naming the key (a
    KeyError or TypeError traceback)."""
    folder = broken_copy(tiny_checkpoint, tmp_path, "edited-config")
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    cli = subprocess.run([sys.executable, "-m", "edge_runtime", "export", "--checkpoint", str(folder), "--profile",
                          "cpu-x86_64", "--output", str(tmp_path / "b"), "--skip-fidelity"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and f"error: edited-config: {words}" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr and not (tmp_path / "b").exists()


def test_a_null_max_position_embeddings_is_exported_as_an_absent_one(tiny_checkpoint, tmp_path, exporter):
    """check_config_numbers lets a null optional size through as "the default" (transformers
    loads it), and the export then stopped with a TypeError traceback reading it."""
    contexts = []
    for name, change in (("absent", lambda c: c.pop("max_position_embeddings")),
                         ("null", lambda c: c.update(max_position_embeddings=None))):
        folder = broken_copy(tiny_checkpoint, tmp_path, name)
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
        bundle = exporter(folder, tmp_path / f"b-{name}", skip_fidelity=True)
        contexts.append(load_bundle(bundle).manifest["context_limit"])
    assert contexts[0] == contexts[1]


def test_a_context_too_short_for_the_fidelity_prompts_is_refused_before_the_build(tiny_checkpoint, tmp_path):
    from edge_export.pipeline import ExportError, ExportOptions, run_export

    with pytest.raises(ExportError, match="the fidelity measure needs \\d+ positions .* raise --max-context to"):
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=tmp_path / "out",
                                 precision="fp32", max_context=32))
    assert not (tmp_path / "out.partial").exists()


def test_a_70b_chat_template_without_the_step_token_is_refused_at_export(tiny_checkpoint, tmp_path):
    """Source:/<step> chat needs the <step> token: without it every chat request would fail on
    the device, so the export refuses the checkpoint, before any work."""
    from edge_export.checkpoint import CheckpointError
    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.synthetic import SOURCE_STEP_CHAT_TEMPLATE

    folder = broken_copy(tiny_checkpoint, tmp_path, "CodeLlama-70b-Instruct-hf")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": SOURCE_STEP_CHAT_TEMPLATE}))
    with pytest.raises(CheckpointError, match="chat template is Code Llama 70B Instruct's .* but tokenizer.json has "
                                              "no <step> token"):
        run_export(ExportOptions(checkpoint=folder, profile="cpu-x86_64", output=tmp_path / "out",
                                 precision="fp32", skip_fidelity=True))
    assert not (tmp_path / "out").exists()


def test_an_unreadable_licence_file_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    """The licence files are copied into the bundle at the very end: one that cannot be read
    failed the export there, after the graph and the fidelity (an hour at 7B); now in step 1,
    naming it. As root, without the capabilities that read any file whatever its mode."""
    folder = broken_copy(tiny_checkpoint, tmp_path, "unreadable-licence")
    (folder / "LICENSE").chmod(0)
    command = [sys.executable, "-m", "edge_runtime", "export", "--checkpoint", str(folder), "--profile",
               "cpu-x86_64", "--output", str(tmp_path / "b"), "--precision", "fp32", "--skip-fidelity"]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    cli = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and f"error: {folder / 'LICENSE'} cannot be read (Permission denied)" in cli.stderr, \
        cli.stderr
    assert "[2/" not in cli.stderr and "Traceback" not in cli.stderr, cli.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unreadable-licence"]


def test_the_fidelity_step_prints_no_onnxruntime_warnings(tiny_checkpoint, tmp_path):
    """onnxruntime's graph-optimizer warnings (an initializer among the inputs, implicit
    subgraph inputs) are not the user's to act on: the export's output has none."""
    cli = subprocess.run([sys.executable, "-m", "edge_runtime", "export", "--checkpoint", str(tiny_checkpoint),
                          "--profile", "cpu-x86_64", "--output", str(tmp_path / "b"), "--precision", "int4",
                          "--algorithm", "rtn", "--fidelity-tokens", "4", "--fidelity-corpus-tokens", "16",
                          "--allow-degraded"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert "greedy agreement" in cli.stderr and ":onnxruntime:" not in cli.stderr, cli.stderr


def test_an_hqq_export_prints_no_torch_warning(tiny_checkpoint, tmp_path):
    """--algorithm hqq (optimum's graph, onnxruntime's HQQ quantizer): the bundle is written and
    the output has no torch "NumPy array is not writable" UserWarning, with its source line, from
    inside onnxruntime."""
    cli = subprocess.run([sys.executable, "-m", "edge_runtime", "export", "--checkpoint", str(tiny_checkpoint),
                          "--profile", "cpu-x86_64", "--output", str(tmp_path / "b"), "--precision", "int4",
                          "--algorithm", "hqq", "--skip-fidelity"], capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr
    assert load_bundle(tmp_path / "b").manifest["quantization"]["algorithm"] == "hqq"
    assert "UserWarning" not in cli.stderr and "Warning" not in cli.stdout, cli.stderr


def test_a_checkpoint_without_a_licence_file_is_exported_with_a_warning(tiny_checkpoint, tmp_path):
    folder = broken_copy(tiny_checkpoint, tmp_path, "no-licence")
    (folder / "LICENSE").unlink()
    cli = subprocess.run([sys.executable, "-m", "edge_runtime", "export", "--checkpoint", str(folder), "--profile",
                          "cpu-x86_64", "--output", str(tmp_path / "b"), "--precision", "fp32", "--skip-fidelity"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert "warning: no-licence has no licence file" in cli.stderr and "the bundle carries none" in cli.stderr
    assert load_bundle(tmp_path / "b").manifest["licence_files"] == []


def test_an_already_quantized_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    from edge_export.checkpoint import CheckpointError, read_checkpoint

    folder = broken_copy(tiny_checkpoint, tmp_path, "gptq")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(CheckpointError, match="already quantized .*'gptq'.*original float16/bfloat16"):
        read_checkpoint(folder)


def test_a_checkpoint_with_only_tokenizer_model_gets_the_remedy(tiny_checkpoint, tmp_path):
    from edge_export.checkpoint import CheckpointError, read_checkpoint

    folder = broken_copy(tiny_checkpoint, tmp_path, "spm-only")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"sentencepiece model")
    with pytest.raises(CheckpointError, match="no tokenizer.json .* pip install sentencepiece protobuf.*save_pretrained"):
        read_checkpoint(folder)


def test_a_checkpoint_of_pytorch_model_bin_gets_a_remedy_that_works(tiny_checkpoint, tmp_path, exporter):
    """Weights only as pytorch_model.bin (older checkpoints): the message said "convert them to
    safetensors" and not how; it gives the command, and the command makes the folder export."""
    import torch
    from transformers import LlamaForCausalLM

    from edge_export.checkpoint import CheckpointError, read_checkpoint

    folder = broken_copy(tiny_checkpoint, tmp_path, "bin-only")
    (folder / "model.safetensors").unlink()
    LlamaForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).save_pretrained(
        str(folder), safe_serialization=False)
    with pytest.raises(CheckpointError, match="found pytorch_model.bin; convert them to safetensors") as refused:
        read_checkpoint(folder)
    command = re.search(r'python -c "(.*)"\)$', str(refused.value))[1]
    subprocess.run([sys.executable, "-c", command], check=True, capture_output=True, timeout=300)
    exporter(folder, tmp_path / "b", skip_fidelity=True)
    assert load_bundle(tmp_path / "b").manifest["source"]["name"] == "bin-only"


def test_a_context_past_the_models_training_is_exported_with_a_warning(tiny_checkpoint, tmp_path):
    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress

    trained = json.loads((tiny_checkpoint / "config.json").read_text())["max_position_embeddings"]
    lines: list[str] = []
    progress = Progress(5, enabled=False)
    progress.detail = lines.append
    run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=tmp_path / "b",
                             max_context=trained * 2, precision="fp32", skip_fidelity=True), progress)
    assert load_bundle(tmp_path / "b").manifest["context_limit"] == trained * 2
    assert any(f"above the model's max_position_embeddings ({trained}" in line for line in lines), lines


def test_gptq_calibrates_on_the_users_text_and_the_manifest_says_so(tiny_checkpoint, tmp_path):
    """--algorithm gptq --calibration-text: the manifest names the text (and its SHA-256) and
    how many tokens GPTQ ran; --algorithm gptq with --graph optimum is refused before any work."""
    import hashlib

    from edge_export.pipeline import ExportError, ExportOptions, run_export
    from edge_export.progress import Progress

    text = tmp_path / "plant_io.py"
    text.write_text("def read_register(bus, address):\n    return bus.read_word(address) & 0xFFFF\n" * 40)
    out = tmp_path / "b"
    said = io.StringIO()
    run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=out, precision="int4",
                             graph="fused", algorithm="gptq", calibration_text=text, calibration_tokens=200,
                             skip_fidelity=True), Progress(5, stream=said))
    # the progress says where GPTQ's time went, part by part
    parts = re.search(r"GPTQ: calibration ([\d.]+) s, Hessian inverses ([\d.]+) s, column loops ([\d.]+) s",
                      said.getvalue())
    assert parts and all(float(x) >= 0 for x in parts.groups()) and float(parts[3]) > 0
    # the fused graph is built and quantized in one step: four steps, each numbered once, in order
    steps = re.findall(r"^\[(\d)/(\d)\] .* \.\.\.$", said.getvalue(), flags=re.M)
    assert steps == [("1", "4"), ("2", "4"), ("3", "4"), ("4", "4")]
    quant = load_bundle(out).manifest["quantization"]
    assert quant["algorithm"] == "gptq"
    calibration = quant["calibration"]
    assert calibration["text"] == "plant_io.py"
    assert calibration["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert calibration["tokens"] == 200 + calibration["windows"]  # the first 200 tokens, a BOS per window
    assert calibration["files"] == 1

    # a folder of sources: the code files in path order, hidden folders and other files left out
    repo = tmp_path / "plant-repo"
    (repo / "src").mkdir(parents=True)
    (repo / ".git").mkdir()
    (repo / "src" / "io.py").write_text(text.read_text())
    (repo / "src" / "crc.c").write_text("unsigned crc(const unsigned char *p, int n) { return n ? *p : 0; }\n" * 20)
    (repo / "notes.txt").write_text("not code\n")
    (repo / ".git" / "hook.py").write_text("print('hidden')\n")
    run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=out, precision="int4",
                             graph="fused", calibration_text=repo, skip_fidelity=True, force=True),
               Progress(5, enabled=False))
    calibration = load_bundle(out).manifest["quantization"]["calibration"]
    assert calibration["text"] == "plant-repo" and calibration["files"] == 2
    joined = (repo / "src" / "crc.c").read_text() + "\n\n" + text.read_text()
    assert calibration["sha256"] == hashlib.sha256(joined.encode()).hexdigest()

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "manual.txt").write_text("no code here\n")
    with pytest.raises(ExportError, match="docs: no source files"):
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=tmp_path / "c",
                                 precision="int4", graph="fused", calibration_text=docs, skip_fidelity=True))
    empty = tmp_path / "empty.py"
    empty.write_text("\n")
    with pytest.raises(ExportError, match="fewer than 64 tokens"):
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=tmp_path / "c",
                                 precision="int4", graph="fused", calibration_text=empty, skip_fidelity=True))
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()

    with pytest.raises(ExportError, match="--algorithm gptq needs the fused graph"):
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=tmp_path / "c",
                                 precision="int4", graph="optimum", algorithm="gptq"))
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()


def test_a_calibration_text_that_is_not_text_is_refused_or_left_out(tiny_checkpoint, tmp_path):
    """GPTQ calibrated on a binary file (or one in another encoding) as on its U+FFFD
    replacement characters, and said nothing: a file given is refused, naming it, in step 1
    (before the graph is built); a folder's
    such files are left out, and the export and the manifest say which. A few stray bytes (a
    Latin-1 comment) are still read."""
    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress

    blob = tmp_path / "model.py"
    blob.write_bytes(bytes(range(256)) * 64)
    cli = subprocess.run([sys.executable, "-m", "edge_runtime", "export", "--checkpoint", str(tiny_checkpoint),
                          "--profile", "cpu-x86_64", "--output", str(tmp_path / "b"), "--precision", "int4",
                          "--skip-fidelity", "--calibration-text", str(blob)], capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 2 and f"error: --calibration-text {blob}: is not UTF-8 text" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr and not (tmp_path / "b").exists()
    assert "[2/" not in cli.stderr, cli.stderr  # refused while the checkpoint is read, before any work

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a_blob.py").write_bytes(blob.read_bytes())
    code = "def read_register(bus, address):\n    return bus.read_word(address) & 0xFFFF  # \xb0C\n" * 40
    (repo / "io.py").write_bytes(code.encode("latin-1"))
    said = io.StringIO()
    run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=tmp_path / "b",
                             precision="int4", calibration_text=repo, skip_fidelity=True), Progress(5, stream=said))
    calibration = load_bundle(tmp_path / "b").manifest["quantization"]["calibration"]
    assert calibration["files"] == 1 and calibration["skipped_files"] == ["a_blob.py"]
    assert "note: not UTF-8 text, left out: a_blob.py" in said.getvalue()


@pytest.mark.parametrize("options, why", [
    ({"precision": "int4", "algorithm": "rtn"}, "quantizes with rtn \\(--algorithm rtn\\)"),
    ({"precision": "fp32"}, "is fp32: nothing is quantized")])
def test_calibration_flags_without_gptq_are_refused_not_ignored(tiny_checkpoint, tmp_path, options, why):
    from edge_export.pipeline import ExportError, ExportOptions, run_export

    text = tmp_path / "code.py"
    text.write_text("def f(x):\n    return x + 1\n" * 50)
    with pytest.raises(ExportError, match=f"--calibration-text calibrates GPTQ \\(--algorithm gptq\\), and this "
                                          f"export {why}: drop --calibration-text"):
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=tmp_path / "b",
                                 calibration_text=text, skip_fidelity=True, **options))
    with pytest.raises(ExportError, match="--calibration-tokens calibrates GPTQ"):
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=tmp_path / "b",
                                 calibration_tokens=128, skip_fidelity=True, **options))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.py"]


@pytest.mark.parametrize("graph", ["fused", "optimum"])
def test_a_bundle_over_the_profiles_memory_budget_is_refused_up_front_or_exits_3(tiny_checkpoint, tmp_path, graph):
    """Where memory_fit's estimate is over the budget, the export refuses before any work and
    names the --max-context that fits. The fused graph's estimate bounds its written bundle
    (rotary tables, alignment, graph file), so that context's bundle fits; the optimum graph's
    counts its weights only, so there the written bundle comes out over: it is kept and the
    command exits 3, saying so."""
    from edge_export.pipeline import ExportError, ExportOptions, run_export
    from edge_runtime.profiles import profile_text

    toml = tmp_path / "tight-x86.toml"
    text = profile_text("cpu-x86_64").replace('name = "cpu-x86_64"', 'name = "tight-x86"')
    toml.write_text(re.sub(r"memory_budget_bytes = \d+", f"memory_budget_bytes = {280 << 20}", text))
    with pytest.raises(ExportError, match="the bundle would not fit the tight-x86 profile's memory budget, and the "
                                          "engine would refuse to start it: .* > memory budget 0.27 GiB "
                                          "\\(estimated\\); --max-context (\\d+) fits") as caught:
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile=toml, output=tmp_path / "b", precision="fp32",
                                 skip_fidelity=True, graph=graph))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tight-x86.toml"]
    fits = int(re.search(r"--max-context (\d+) fits", str(caught.value))[1])

    def export(output: str, context: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edge_runtime", "export", "--checkpoint", str(tiny_checkpoint),
                               "--profile", str(toml), "--output", str(tmp_path / output), "--precision", "fp32",
                               "--skip-fidelity", "--max-context", str(context), "--graph", graph],
                              capture_output=True, text=True, timeout=300)

    edge = export("edge", fits)  # the estimate's largest
    if graph == "fused":
        assert edge.returncode == 0 and ": fits" in edge.stdout, edge.stderr
        return
    assert edge.returncode == 3, edge.stderr  # the optimum graph's own file puts the bundle just over
    assert f"error: the bundle at {tmp_path / 'edge'} was written, but it does not fit the tight-x86 profile's " \
           "memory budget" in edge.stderr and "DOES NOT FIT" in edge.stdout
    assert load_bundle(tmp_path / "edge").context_limit == fits  # kept, whole
    roomy = export("roomy", fits // 2)  # its logits for every prompt row: 125 KiB a token
    assert roomy.returncode == 0 and ": fits" in roomy.stdout, roomy.stderr


def test_export_without_the_export_extra_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    """An install missing a module of the export extra (here scipy, which joined it for
    GPTQ's triangular inverse: installs from before lack it) is told what to install,
    before anything is written."""
    out = tmp_path / "b"
    code = ("import sys; sys.modules['scipy'] = None\n"  # import scipy now fails as if not installed
            "from edge_runtime.cli import main\n"
            f"sys.exit(main(['export', '--checkpoint', {str(tiny_checkpoint)!r}, '--profile', 'cpu-x86_64', "
            f"'--output', {str(out)!r}, '--skip-fidelity']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "the export side is not installed (scipy" in done.stderr  # scipy, or scipy.linalg as hidden here
    assert "pip install '/path/to/edge-runtime[export,cpu]'" in done.stderr
    assert not out.exists() and not out.with_name("b.partial").exists()


def test_a_transformers_5_config_keeps_its_rope_base_and_scaling_for_torch():
    from edge_export.checkpoint import torch_config

    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
            "intermediate_size": 128, "vocab_size": 100}
    plain = torch_config({**base, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}})
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None
    scaled = torch_config({**base, "rope_parameters": {"rope_theta": 1e6, "rope_type": "linear", "factor": 2.0}})
    assert scaled.rope_theta == 1e6 and scaled.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_optimums_exporter_is_refused_a_transformers_5_rope_config(tiny_checkpoint, tmp_path):
    """optimum reads the checkpoint with transformers 4, which takes a config.json without a
    top-level rope_theta for base 10000: refused before the export, with the way out."""
    from edge_export.pipeline import ExportError, ExportOptions, run_export

    folder = broken_copy(tiny_checkpoint, tmp_path, "tf5")
    config = json.loads((folder / "config.json").read_text())
    theta = config.pop("rope_theta")
    config["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="rope_parameters .* Use --graph fused"):
        run_export(ExportOptions(checkpoint=folder, profile="cpu-x86_64", output=tmp_path / "out", graph="optimum",
                                 precision="fp32", skip_fidelity=True))
    assert not (tmp_path / "out.partial").exists()


LONG_PROMPT = [1] + [(i * 7919) % 30000 + 100 for i in range(99)]  # 100 tokens, past a max_position_embeddings of 64


@pytest.mark.parametrize("rope, max_context, key", [
    ({"type": "dynamic", "factor": 4.0}, 128, "max_position_embeddings"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}, None,
     "original_max_position_embeddings"),
])
def test_rope_scaling_that_changes_with_the_length_is_refused_past_that_length(tiny_checkpoint, tmp_path, rope,
                                                                                max_context, key):
    """transformers recomputes dynamic (NTK) and longrope frequencies once a sequence is longer
    than the model's (original) max_position_embeddings; optimum's traced graph keeps a short
    sequence's, so every token past it was computed with the wrong rotation (logits 3.6e-3 and
    8e-3 off torch's on this random model), and fidelity's short prompts passed. Refused, naming
    the key and the --max-context that is right."""
    from edge_export.pipeline import ExportError, ExportOptions, run_export

    folder = broken_copy(tiny_checkpoint, tmp_path, "scaled")
    config = json.loads((folder / "config.json").read_text())
    extra = {"original_max_position_embeddings": 64} if key.startswith("original") else {}
    (folder / "config.json").write_text(json.dumps({**config, **extra, "rope_scaling": rope,
                                                    "max_position_embeddings": 128 if extra else 64}))
    with pytest.raises(ExportError, match=rf"config.json's rope_scaling .* longer than its {key} \(64 tokens\).*"
                                          r"--max-context 64 or less"):
        run_export(ExportOptions(checkpoint=folder, profile="cpu-x86_64", output=tmp_path / "out",
                                 max_context=max_context, precision="fp32", skip_fidelity=True))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_rope_scaling_that_does_not_change_with_the_length_is_exported_past_the_training_length(tiny_checkpoint,
                                                                                                tmp_path, exporter):
    """Linear scaling is one set of frequencies at every length: a context past
    max_position_embeddings is exported (with its warning), and a prompt longer than it gets
    torch's logits."""
    folder = broken_copy(tiny_checkpoint, tmp_path, "linear")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "linear", "factor": 4.0},
                                                    "max_position_embeddings": 64}))
    bundle = exporter(folder, tmp_path / "b", max_context=128, skip_fidelity=True)
    decoder = decoder_for(bundle, max_length=128)
    ours = decoder.prefill(decoder.new_cache(len(LONG_PROMPT)), np.asarray(LONG_PROMPT))
    ref = torch_reference.prompt_logits(folder, LONG_PROMPT)[-len(ours):]
    assert np.abs(ours - ref).max() < 1e-4


def fine_tune_with_an_end_token(tiny_checkpoint: Path, folder: Path) -> Path:
    """A fine-tune of the tiny checkpoint that added a special end-of-turn token (id 32016: the
    tokenizer's added tokens and the embedding and lm_head rows grow to vocab_size 32017) and
    lists it in generation_config.json's eos_token_id beside </s>."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_checkpoint, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({"id": 32016, "content": "<|end|>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    tensors = load_file(str(folder / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], tensors[name].mean(0, keepdim=True)])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 32017}))
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [2, 32016]}))
    return folder


def test_a_fine_tunes_end_token_in_generation_config_ends_the_generation_as_in_transformers(tiny_checkpoint,
                                                                                            tmp_path, exporter,
                                                                                            rig_greedy_token):
    """transformers' generate stops at every id of generation_config.json's eos_token_id; the
    bundle stopped only at </s>, so a fine-tune's end token was sampled, decoded as nothing, and
    the answer ran on to max_tokens with what the model makes after its end."""
    from edge_runtime.engine import Engine
    from edge_runtime.tokenizer import CodeLlamaTokenizer
    from edge_runtime.types import GenerationRequest, SamplingParams

    folder = fine_tune_with_an_end_token(tiny_checkpoint, tmp_path / "fine-tune")
    prompt = "def fib(n):"
    ids = [1, *CodeLlamaTokenizer.from_file(folder / "tokenizer.json").encode(prompt)]
    rig_greedy_token(folder, ids, 32016, 3)  # greedy makes <|end|> as its 4th token
    bundle = exporter(folder, tmp_path / "b", skip_fidelity=True)
    assert load_bundle(bundle).manifest["tokenizer"]["stop_ids"] == [2, 32016]
    engine = Engine.from_bundle(bundle, "cpu-x86_64")
    result = engine.complete(GenerationRequest(mode="complete", prompt=prompt, max_tokens=12,
                                               sampling=SamplingParams(temperature=0)))
    expected = torch_reference.greedy(folder, ids, 12, stop_ids=frozenset({2, 32016}))
    assert len(expected) == 3 and list(result.token_ids) == expected and result.finish_reason == "stop"


def test_a_bundle_with_its_own_end_token_is_format_2_which_runtimes_ignoring_stop_ids_refuse(tiny_checkpoint,
                                                                                              tiny_bundle, tmp_path,
                                                                                              exporter):
    """A runtime from before tokenizer.stop_ids reads format_version 1 only and ignores the key: given
    this bundle, it ran on past <|end|> to max_tokens (the release before, 51cc5fc: 12 tokens where this
    one stops after 3). So such a bundle is format 2, which that runtime refuses by its version; a
    bundle that stops only at </s> stays 1, which every runtime since the first reads."""
    folder = fine_tune_with_an_end_token(tiny_checkpoint, tmp_path / "fine-tune")
    bundle = exporter(folder, tmp_path / "b", skip_fidelity=True)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert manifest["tokenizer"]["stop_ids"] == [2, 32016] and manifest["format_version"] == 2
    assert load_bundle(bundle).stop_ids == {2, 32016}
    assert json.loads((tiny_bundle / MANIFEST_NAME).read_text())["format_version"] == 1


def test_an_int8_cache_bundle_is_format_2_which_runtimes_before_its_graph_refuse(tiny_checkpoint, tmp_path, exporter):
    """The int8 cache graph's prompt branch hands back only the prompt's own rows since revision 5
    (2026-12-02); a runtime from before it (7da018c) loaded such a bundle as format 1 and stopped at
    its first request with onnxruntime's output-shape error, one from before the int8 cache (dd39390)
    with a KeyError: tracebacks both. Format 2 is refused by them by its version; this runtime
    drives it, as it drives the revision-5 bundles written as 1 before."""
    from edge_runtime.engine import Engine
    from edge_runtime.types import GenerationRequest, SamplingParams

    bundle = exporter(tiny_checkpoint, tmp_path / "b", precision="int4", algorithm="rtn", kv_cache_bits=8,
                      skip_fidelity=True)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert manifest["kv_cache"]["dtype"] == "int8" and manifest["format_version"] == 2
    request = GenerationRequest(mode="complete", prompt="def fib(n):", max_tokens=8,
                                sampling=SamplingParams(temperature=0))
    tokens = Engine.from_bundle(bundle, check_memory=False).complete(request).token_ids
    rewrite_manifest(bundle, lambda m: m.update(format_version=1))  # as written from 2026-12-02 to this change
    assert Engine.from_bundle(bundle, check_memory=False).complete(request).token_ids == tokens


def test_a_generation_config_eos_that_is_not_an_id_of_the_model_is_refused(tiny_checkpoint, tmp_path):
    from edge_export.checkpoint import CheckpointError, read_checkpoint

    folder = broken_copy(tiny_checkpoint, tmp_path, "other-eos")
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [2, 128009]}))
    with pytest.raises(CheckpointError, match=r"generation_config.json's eos_token_id \[2, 128009\] has 128009, "
                                              r"not an id of the model \(0 to 32015"):
        read_checkpoint(folder)


def test_a_shard_index_without_metadata_is_refused_before_the_build_where_transformers_reads_it(tmp_path, exporter):
    """transformers reads index["metadata"] (a hand-made or converted index may have only its
    weight_map): the fidelity reference stopped with a KeyError traceback after the graph was
    built. Refused before any work, saying the one-line remedy, which works; an export that
    does not load the checkpoint with transformers (--skip-fidelity, fused graph) goes on."""
    from edge_export.synthetic import build_checkpoint

    folder = build_checkpoint(tmp_path / "sharded", hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4,
                              num_kv_heads=2, seed=3, shard_size="2MB")
    index = folder / "model.safetensors.index.json"
    document = json.loads(index.read_text())
    index.write_text(json.dumps({"weight_map": document["weight_map"]}))
    cli = subprocess.run([sys.executable, "-m", "edge_runtime", "export", "--checkpoint", str(folder), "--profile",
                          "cpu-x86_64", "--precision", "fp32", "--output", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr
    assert ('model.safetensors.index.json: it has no "metadata" object, which transformers needs to read the shards '
            'for measuring fidelity against torch: add "metadata": {} beside its weight_map') in cli.stderr
    assert "build the fused decoder graph" not in cli.stdout + cli.stderr and not (tmp_path / "b").exists()
    exporter(folder, tmp_path / "skipped", skip_fidelity=True)
    index.write_text(json.dumps({"metadata": {}, "weight_map": document["weight_map"]}))
    assert load_bundle(exporter(folder, tmp_path / "measured")).manifest["fidelity"]["passed"]


def test_an_exported_bundle_is_on_the_disk_before_and_after_it_takes_its_name(tiny_checkpoint, tmp_path, monkeypatch):
    """`export` wrote OUTPUT.partial and renamed it to OUTPUT without one fsync: a power cut in
    the seconds after it returned (a device exporting for itself, a workstation) could keep the
    rename and lose the bytes, leaving a bundle.json whose files are empty or short. Every file
    and folder of the bundle is flushed before the rename, and OUTPUT's folder after it; an
    earlier bundle replaced with --force the same."""
    from disk_flushes import DiskFlushes
    from edge_export.pipeline import ExportOptions, run_export

    output = tmp_path / "out" / "tiny"
    for force in (False, True):
        flushes = DiskFlushes().install(monkeypatch)
        run_export(ExportOptions(checkpoint=tiny_checkpoint, profile="cpu-x86_64", output=output, precision="fp32",
                                 skip_fidelity=True, force=force))
        renames = flushes.renames_into(output)
        assert len(renames) == 1, flushes.events
        _, src, _, files = flushes.events[renames[0]]
        assert {os.path.relpath(f, src) for f in files} == {".", MANIFEST_NAME, *(
            e["path"] for e in load_bundle(output).manifest["files"])}
        assert flushes.problems_of_rename(renames[0]) == []
