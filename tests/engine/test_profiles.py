"""Device profiles (edge_runtime.profiles) and the typed TOML validator (typed_toml)."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import stat
import sys
from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest

from edge_runtime import profiles
from edge_runtime.errors import ConfigError
from edge_runtime.providers import cpu_onnxruntime_requirement
from edge_runtime.profiles import (
    PRECISIONS,
    MachineFacts,
    detect_profile,
    gather_machine_facts,
    list_profiles,
    load_profile,
    profile_summary,
)
from edge_runtime.typed_toml import (
    InvalidField,
    at_least,
    from_mapping,
    load_toml,
    parse_toml,
)

PACKAGED = ["cpu-arm64", "cpu-x86_64", "jetson-orin-agx", "jetson-orin-nano", "nvidia-gpu"]
GPU_PROFILES = ["jetson-orin-agx", "jetson-orin-nano", "nvidia-gpu"]
GiB = 2**30


# ------------------------------------------------------------------ packaged profiles


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_profile_loads_with_sensible_values(name: str) -> None:
    p = load_profile(name)
    assert p.name == name
    assert p.description
    assert p.precision in PRECISIONS
    assert p.provider_names[-1] == "CPUExecutionProvider"
    assert 1024 <= p.max_context <= 100_000
    assert p.intra_op_threads >= 0
    assert 1 * GiB <= p.memory_budget_bytes <= 64 * GiB
    q = p.quantization
    assert q.block_size in (16, 32, 64, 128, 256)
    assert 0 <= q.accuracy_level <= 4
    assert "lm_head" in q.keep_unquantized
    # Fidelity: stricter as precision rises.
    agreement = [p.fidelity.for_precision(x)[0] for x in ("int4", "int8", "fp16", "fp32")]
    logit_diff = [p.fidelity.for_precision(x)[1] for x in ("int4", "int8", "fp16", "fp32")]
    assert agreement == sorted(agreement) and all(0 < a <= 1 for a in agreement)
    assert logit_diff == sorted(logit_diff, reverse=True) and all(d > 0 for d in logit_diff)
    # KV cache at max_context fits the budget (7B Code Llama: 32 layers, 4096 hidden).
    kv_bytes = 2 * 32 * 4096 * (2 if p.kv_cache.dtype == "float16" else 4) * p.max_context
    assert kv_bytes < p.memory_budget_bytes / 2


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_profiles_never_fall_back_and_use_fp16_kv(name: str) -> None:
    p = load_profile(name)
    assert p.allow_cpu_fallback is False
    assert p.kv_cache.dtype == "float16"
    assert "CUDAExecutionProvider" in p.provider_names
    assert p.precision in ("int4", "fp16")


@pytest.mark.parametrize("name", ["cpu-x86_64", "cpu-arm64"])
def test_cpu_profiles_only_use_the_cpu(name: str) -> None:
    p = load_profile(name)
    assert p.provider_names == ("CPUExecutionProvider",)
    assert p.allow_cpu_fallback is True
    assert p.precision == "int4"
    assert p.kv_cache.dtype == "float32"


@pytest.mark.parametrize("name", ["jetson-orin-agx", "jetson-orin-nano"])
def test_jetson_profiles_put_tensorrt_first_with_fp16_and_engine_cache(name: str) -> None:
    p = load_profile(name)
    assert p.provider_names == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    trt = p.execution_providers[0].options
    assert trt["trt_fp16_enable"] is True
    assert trt["trt_engine_cache_enable"] is True
    assert isinstance(trt["trt_engine_cache_path"], str)
    assert p.precision == "int4"
    # onnxruntime takes string options; bools as "True"/"False".
    name_, options = p.ort_providers()[0]
    assert name_ == "TensorrtExecutionProvider"
    assert options["trt_fp16_enable"] == "True"
    assert all(isinstance(v, str) for v in options.values())


def test_jetson_budgets_leave_headroom() -> None:
    assert load_profile("jetson-orin-agx").memory_budget_bytes == 48 * GiB
    nano = load_profile("jetson-orin-nano")
    assert 4 * GiB <= nano.memory_budget_bytes <= 6 * GiB
    assert nano.max_context <= load_profile("jetson-orin-agx").max_context


def test_for_precision_returns_the_pair_and_rejects_unknown() -> None:
    f = load_profile("nvidia-gpu").fidelity
    assert f.for_precision("int4") == (f.min_greedy_agreement.int4, f.max_logit_diff.int4)
    with pytest.raises(ValueError, match="bf16"):
        f.for_precision("bf16")  # type: ignore[arg-type]


def test_list_profiles_returns_every_packaged_profile_sorted() -> None:
    assert [p.name for p in list_profiles()] == PACKAGED


def test_profile_summary_is_one_line_with_the_essentials() -> None:
    line = profile_summary(load_profile("jetson-orin-agx"))
    assert "\n" not in line
    assert line.startswith("jetson-orin-agx: int4")
    assert "TensorrtExecutionProvider > CUDAExecutionProvider > CPUExecutionProvider" in line
    assert "16384" in line
    assert "48.0 GiB" in line
    assert "5.1 GiB" in profile_summary(load_profile("jetson-orin-nano"))


def test_load_by_path_str_and_pathlike(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "copy.toml"
    target.write_text(_packaged_text("nvidia-gpu"))
    assert load_profile(target) == load_profile("nvidia-gpu")
    assert load_profile(str(target)).name == "nvidia-gpu"


def test_session_config_is_optional_and_reaches_onnxruntime_as_strings(tmp_path: pathlib.Path) -> None:
    assert load_profile("cpu-x86_64").session_config == {}  # no key: no entries
    target = tmp_path / "fpa.toml"
    target.write_text(_packaged_text("cpu-x86_64").replace(
        "intra_op_threads = 0", 'intra_op_threads = 0\nsession_config = { "ep.cuda.fpa_intb_gemm" = true, '
        '"session.intra_op.allow_spinning" = "0", "session.x" = 2 }', 1))
    profile = load_profile(target)
    assert profile.ort_session_config() == {"ep.cuda.fpa_intb_gemm": "1", "session.intra_op.allow_spinning": "0",
                                            "session.x": "2"}
    assert "ep.cuda.fpa_intb_gemm=1" in profile_summary(profile)
    assert profile.with_session_config({"ep.cuda.fpa_intb_gemm": False}).ort_session_config()[
        "ep.cuda.fpa_intb_gemm"] == "0"


def test_unknown_profile_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown device profile 'tpu'.*cpu-x86_64"):
        load_profile("tpu")


def test_an_unknown_execution_provider_is_refused_naming_the_key_and_the_names(tmp_path: pathlib.Path) -> None:
    """A misspelt provider is the profile's error, not the GPU's at the first session."""
    target = tmp_path / "typo.toml"
    text = _packaged_text("nvidia-gpu")
    assert 'name = "CUDAExecutionProvider"' in text
    target.write_text(text.replace('name = "CUDAExecutionProvider"', 'name = "CudaExecutionProvider"', 1))
    with pytest.raises(ConfigError, match=re.escape(
            f"{target}: execution_providers[0].name: 'CudaExecutionProvider' is not an onnxruntime execution "
            "provider (did you mean 'CUDAExecutionProvider'?); the names: TensorrtExecutionProvider, "
            "CUDAExecutionProvider")) as caught:
        load_profile(target)
    assert "CPUExecutionProvider" in str(caught.value)


def test_missing_profile_file_names_the_file(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: cannot read file")):
        load_profile(missing)


def test_packaged_profile_name_must_match_its_file(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my-board.toml").write_text(_packaged_text("cpu-x86_64"))
    monkeypatch.setattr(profiles, "_packaged_dir", lambda: tmp_path)
    with pytest.raises(
        ConfigError, match=re.escape("my-board.toml: name: expected 'my-board' (the file's name)")
    ):
        load_profile("my-board")


# ------------------------------------------------------------------- broken profiles


def _packaged_text(name: str) -> str:
    return (profiles._packaged_dir() / f"{name}.toml").read_text(encoding="utf-8")


def _broken(
    tmp_path: pathlib.Path, pattern: str, replacement: str, base: str = "cpu-x86_64"
) -> pathlib.Path:
    """A copy of a packaged profile with the first line matching `pattern` replaced."""
    text, count = re.subn(pattern, replacement, _packaged_text(base), count=1, flags=re.MULTILINE)
    assert count == 1, f"pattern {pattern!r} not found in {base}.toml"
    path = tmp_path / "broken.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _assert_config_error(path: pathlib.Path, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    if message == "unknown key":  # followed by the nearest known key, or the known keys
        assert str(info.value).startswith(f"{path}: {key}: unknown key ("), str(info.value)
    else:
        assert str(info.value) == f"{path}: {key}: {message}"
    assert info.value.code == "config_error"


@pytest.mark.parametrize(
    ("pattern", "replacement", "key", "message"),
    [
        # unknown keys, top level and nested
        (
            r"^allow_cpu_fallback = true",
            'allow_cpu_fallback = true\ncolour = "blue"',
            "colour",
            "unknown key",
        ),
        (r"^symmetric = \w+", "symmetric = false\nbits = 4", "quantization.bits", "unknown key"),
        (
            r"^options = \{\}",
            "options = {}\nweight = 1",
            "execution_providers[0].weight",
            "unknown key",
        ),
        (
            r"fp16 = 0\.9,",
            "fp16 = 0.9, bf16 = 0.9,",
            "fidelity.min_greedy_agreement.bf16",
            "unknown key",
        ),
        # missing keys
        (r"^max_context = .*$", "", "max_context", "missing key"),
        (r"^accuracy_level = .*$", "", "quantization.accuracy_level", "missing key"),
        (r"^dtype = .*$", "", "kv_cache.dtype", "missing key"),
        (r", fp32 = 0\.01 \}", " }", "fidelity.max_logit_diff.fp32", "missing key"),
        # wrong types, including bool/int confusion
        (
            r"^block_size = \d+",
            'block_size = "32"',
            "quantization.block_size",
            "expected int, got str",
        ),
        (r"^symmetric = \w+", "symmetric = 1", "quantization.symmetric", "expected bool, got int"),
        (r"^scale_search = true", 'scale_search = "mse"', "quantization.scale_search", "expected bool, got str"),
        (r"^max_context = 4096", "max_context = true", "max_context", "expected int, got bool"),
        (
            r"^memory_budget_bytes = \d+",
            "memory_budget_bytes = 1.5e10",
            "memory_budget_bytes",
            "expected int, got float",
        ),
        (
            r"^allow_cpu_fallback = true",
            "allow_cpu_fallback = 0",
            "allow_cpu_fallback",
            "expected bool, got int",
        ),
        (
            r"^keep_unquantized = .*$",
            'keep_unquantized = "lm_head"',
            "quantization.keep_unquantized",
            "expected array of str, got str",
        ),
        (
            r"^keep_unquantized = .*$",
            'keep_unquantized = ["lm_head", 3]',
            "quantization.keep_unquantized[1]",
            "expected str, got int",
        ),
        (
            r"^options = \{\}",
            "options = { x = [1] }",
            "execution_providers[0].options.x",
            "expected str | int | float | bool, got array",
        ),
        (r"int4 = 1\.0", 'int4 = "6"', "fidelity.max_logit_diff.int4", "expected float, got str"),
        (
            r"^min_greedy_agreement = .*$",
            "min_greedy_agreement = 0.9",
            "fidelity.min_greedy_agreement",
            "expected table, got float",
        ),
        (
            r"^options = \{\}",
            'options = "none"',
            "execution_providers[0].options",
            "expected table of str | int | float | bool, got str",
        ),
        # out-of-range values
        (
            r'^precision = "int4"',
            'precision = "int3"',
            "precision",
            "expected one of 'int4', 'int8', 'fp16', 'fp32', got 'int3'",
        ),
        (
            r'^dtype = "float32"',
            'dtype = "bfloat16"',
            "kv_cache.dtype",
            "expected one of 'float32', 'float16', got 'bfloat16'",
        ),
        (
            r"^block_size = \d+",
            "block_size = 24",
            "quantization.block_size",
            "expected a power of two >= 16, got 24",
        ),
        (
            r"^block_size = \d+",
            "block_size = 8",
            "quantization.block_size",
            "expected a power of two >= 16, got 8",
        ),
        (
            r"^accuracy_level = 4",
            "accuracy_level = 5",
            "quantization.accuracy_level",
            "expected a value in 0..4, got 5",
        ),
        (
            r"^intra_op_threads = 0",
            "intra_op_threads = -1",
            "intra_op_threads",
            "expected a value >= 0, got -1",
        ),
        (r"^max_context = 4096", "max_context = 0", "max_context", "expected a value >= 1, got 0"),
        (
            r"^memory_budget_bytes = \d+",
            "memory_budget_bytes = -5",
            "memory_budget_bytes",
            "expected a value >= 1, got -5",
        ),
        (
            r"int4 = 0\.7",
            "int4 = 1.5",
            "fidelity.min_greedy_agreement.int4",
            "expected a value in 0.0..1.0, got 1.5",
        ),
        (
            r"int8 = 0\.25",
            "int8 = -2.0",
            "fidelity.max_logit_diff.int8",
            "expected a value >= 0.0, got -2.0",
        ),
        (
            r"^keep_block_size = 128",
            "keep_block_size = 48",
            "quantization.keep_block_size",
            "expected 0 or a power of two >= 16, got 48",
        ),
        (
            r"^lm_head_refine_top_k = 32",
            "lm_head_refine_top_k = -1",
            "quantization.lm_head_refine_top_k",
            "expected a value >= 0, got -1",
        ),
        (
            r"^keep_bits = 8",
            "keep_bits = 0",
            "quantization.lm_head_refine_top_k",
            "needs keep_bits = 8 (the int8 copy it recomputes the top logits from), not 0",
        ),
        (
            r'^keep_unquantized = \["lm_head"\]',
            'keep_unquantized = ["o_proj"]',
            "quantization.lm_head_refine_top_k",
            "needs the lm_head in keep_unquantized (the layer it refines), not ['o_proj']",
        ),
        (
            r"^optimum_block_size = 32",
            "optimum_block_size = 8",
            "quantization.optimum_block_size",
            "expected 0 or a power of two >= 16, got 8",
        ),
        (
            r"fp32 = 0\.01",
            "fp32 = nan",
            "fidelity.max_logit_diff.fp32",
            "expected a finite float, got nan",
        ),
        (
            r'^name = "CPUExecutionProvider"',
            'name = "CPU"',
            "execution_providers[0].name",
            "expected an onnxruntime provider name such as 'CUDAExecutionProvider', got 'CPU'",
        ),
        (
            r'^name = "cpu-x86_64"',
            'name = "CPU X86"',
            "name",
            "expected a lower-case name such as 'cpu-x86_64', got 'CPU X86'",
        ),
        (
            r"^\[\[execution_providers\]\]\nname = .*\noptions = \{\}",
            "execution_providers = []",
            "execution_providers",
            "expected a non-empty value, got []",
        ),
        (
            r"^intra_op_threads = 0",
            'intra_op_threads = 0\nsession_config = { "fpa intb" = "1" }',
            "session_config.fpa intb",
            "expected an onnxruntime session config key such as 'ep.cuda.fpa_intb_gemm', got 'fpa intb'",
        ),
        (
            r"^intra_op_threads = 0",
            'intra_op_threads = 0\nsession_config = { "ep.cuda.fpa_intb_gemm" = [1] }',
            "session_config.ep.cuda.fpa_intb_gemm",
            "expected str | int | float | bool, got array",
        ),
    ],
)
def test_broken_profile_names_file_and_dotted_key(
    tmp_path: pathlib.Path, pattern: str, replacement: str, key: str, message: str
) -> None:
    _assert_config_error(_broken(tmp_path, pattern, replacement), key, message)


def test_cpu_provider_must_come_last(tmp_path: pathlib.Path) -> None:
    text = _packaged_text("nvidia-gpu")
    assert (
        text.count('name = "CUDAExecutionProvider"')
        == text.count('name = "CPUExecutionProvider"')
        == 1
    )
    swapped = (
        text.replace('name = "CUDAExecutionProvider"', "name = @CPU@")
        .replace('name = "CPUExecutionProvider"', 'name = "CUDAExecutionProvider"')
        .replace("name = @CPU@", 'name = "CPUExecutionProvider"')
    )
    path = tmp_path / "swapped.toml"
    path.write_text(swapped)
    with pytest.raises(
        ConfigError,
        match=re.escape(f"{path}: execution_providers: CPUExecutionProvider must come last"),
    ):
        load_profile(path)


def test_duplicate_provider_is_rejected(tmp_path: pathlib.Path) -> None:
    path = _broken(
        tmp_path,
        r'^\[\[execution_providers\]\]\nname = "CPUExecutionProvider"',
        '[[execution_providers]]\nname = "CPUExecutionProvider"\n\n'
        '[[execution_providers]]\nname = "CPUExecutionProvider"',
    )
    with pytest.raises(
        ConfigError, match=re.escape(f"{path}: execution_providers: duplicate provider")
    ):
        load_profile(path)


def test_invalid_toml_names_the_file(tmp_path: pathlib.Path) -> None:
    path = _broken(tmp_path, r"^max_context = 4096", "max_context = = 4096")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: invalid TOML:")):
        load_profile(path)


# ------------------------------------------------------------------------ detection

_ALL_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_CPU_ONLY = ("AzureExecutionProvider", "CPUExecutionProvider")
_L4T = (
    "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
    "DATE: Wed Jan  8 01:49:37 UTC 2025"
)


def _jetson(model: str | None, providers: tuple[str, ...] = _ALL_GPU_PROVIDERS) -> MachineFacts:
    return MachineFacts(
        arch="aarch64",
        device_model=model,
        tegra_release=_L4T,
        onnxruntime_version="1.20.0",
        ort_providers=providers,
    )


def test_detect_jetson_agx_orin() -> None:
    profile, reason = detect_profile(_jetson("NVIDIA Jetson AGX Orin Developer Kit"))
    assert profile.name == "jetson-orin-agx"
    assert "Jetson AGX Orin" in reason and "NVIDIA Jetson AGX Orin Developer Kit" in reason
    assert "lacks" not in reason and "not installed" not in reason


@pytest.mark.parametrize(
    "model",
    [
        "NVIDIA Jetson Orin Nano Developer Kit",
        "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
        "NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
    ],
)
def test_detect_jetson_orin_nano_and_nx(model: str) -> None:
    profile, reason = detect_profile(_jetson(model))
    assert profile.name == "jetson-orin-nano"
    assert "Orin Nano/NX" in reason and model in reason


@pytest.mark.parametrize("model", ["NVIDIA Jetson Xavier NX Developer Kit", None])
def test_detect_unrecognised_jetson_uses_the_conservative_profile(model: str | None) -> None:
    profile, reason = detect_profile(_jetson(model))
    assert profile.name == "jetson-orin-nano"
    assert "not recognised" in reason and "conservative" in reason
    assert (model or "R36") in reason


# MemTotal of a 32 GB AGX Orin module and of a 64 GB one (the kernel keeps the carve-outs)
_AGX_32GB_MEMORY = 30_425_000 * 1024
_AGX_64GB_MEMORY = 64_335_000 * 1024


def test_detect_a_32gb_agx_orin_says_the_profiles_budget_is_more_than_its_memory() -> None:
    """jetson-orin-agx is budgeted for the 64 GB module, but the 32 GB one has the same
    device-tree model: detect must say the budget would pass bundles this board cannot hold."""
    facts = dataclasses.replace(_jetson("NVIDIA Jetson AGX Orin Developer Kit"), memory_bytes=_AGX_32GB_MEMORY)
    profile, reason = detect_profile(facts)
    assert profile.name == "jetson-orin-agx"
    assert ("this machine has 29.0 GiB of memory, less than the jetson-orin-agx profile's memory budget of "
            "48.0 GiB") in reason
    assert "memory_budget_bytes" in reason and "--profile FILE" in reason
    _, roomy = detect_profile(dataclasses.replace(facts, memory_bytes=_AGX_64GB_MEMORY))
    assert "memory" not in roomy


def test_gather_reads_the_memory_total(tmp_path: pathlib.Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       30425000 kB\nMemFree:        1000 kB\n")
    facts = gather_machine_facts(machine="aarch64", device_tree_model=tmp_path / "absent",
                                 tegra_release=tmp_path / "absent", nvidia_gpus_dir=tmp_path / "absent",
                                 nvidia_smi=None, probe_onnxruntime=False, meminfo=meminfo)
    assert facts.memory_bytes == _AGX_32GB_MEMORY
    meminfo.write_text("garbage\n")
    assert gather_machine_facts(machine="aarch64", nvidia_smi=None, probe_onnxruntime=False,
                                meminfo=meminfo).memory_bytes is None


def test_detect_jetson_without_tensorrt_says_so() -> None:
    facts = _jetson(
        "NVIDIA Jetson AGX Orin", providers=("CUDAExecutionProvider", "CPUExecutionProvider")
    )
    profile, reason = detect_profile(facts)
    assert profile.name == "jetson-orin-agx"
    assert "lacks TensorrtExecutionProvider" in reason
    assert "JetPack" in reason and "does not allow CPU fallback" in reason


def test_detect_nvidia_gpu_on_x86_64() -> None:
    facts = MachineFacts(
        arch="x86_64",
        nvidia_gpus=("NVIDIA GeForce RTX 4090",),
        onnxruntime_version="1.20.1",
        ort_providers=(
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ),
    )
    profile, reason = detect_profile(facts)
    assert profile.name == "nvidia-gpu"
    assert reason == "NVIDIA GPU on x86_64: NVIDIA GeForce RTX 4090"


def test_detect_nvidia_gpu_mentions_missing_cuda_provider() -> None:
    facts = MachineFacts(
        arch="x86_64",
        nvidia_gpus=("NVIDIA H100 80GB HBM3",),
        onnxruntime_version="1.20.1",
        ort_providers=_CPU_ONLY,
    )
    profile, reason = detect_profile(facts)
    assert profile.name == "nvidia-gpu"
    assert "NVIDIA H100 80GB HBM3" in reason
    assert "lacks CUDAExecutionProvider" in reason and "onnxruntime-gpu" in reason


@pytest.mark.parametrize("arch", ["x86_64", "AMD64"])
def test_detect_cpu_x86_64(arch: str) -> None:
    facts = MachineFacts(arch=arch, onnxruntime_version="1.32.0", ort_providers=_CPU_ONLY)
    profile, reason = detect_profile(facts)
    assert profile.name == "cpu-x86_64"
    assert reason == "x86_64 CPU, no NVIDIA GPU found"


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_detect_says_when_onnxruntime_cannot_load_the_profiles_int8_kv_cache(arch: str) -> None:
    # JetPack 6 / Ubuntu 22.04's Python 3.10 gets onnxruntime 1.23 at most: every default export for
    # the CPU profiles (kv_cache.bits = 8) would be refused at load, after the export
    facts = MachineFacts(arch=arch, onnxruntime_version="1.23.2", ort_providers=_CPU_ONLY, python=(3, 10))
    profile, reason = detect_profile(facts)
    assert profile.kv_cache.bits == 8
    assert "onnxruntime 1.23.2 cannot load the int8 KV cache" in reason
    assert "--kv-cache-bits 0" in reason and "Python 3.11+" in reason and "Python 3.10" in reason
    # on 3.11+ the remedy is an upgrade
    _, reason = detect_profile(dataclasses.replace(facts, python=(3, 12)))
    assert "pip install 'onnxruntime>=1.32'" in reason and "Python 3.10" not in reason
    # a new enough onnxruntime, a pre-release of it, and a GPU profile (a float16 cache): nothing to say
    for version in ("1.32.0", "1.33.0.dev20261101"):
        assert "KV cache" not in detect_profile(dataclasses.replace(facts, onnxruntime_version=version))[1]
    assert "KV cache" not in detect_profile(_jetson("NVIDIA Jetson AGX Orin Developer Kit"))[1]


def test_detect_cpu_arm64() -> None:
    facts = MachineFacts(
        arch="aarch64",
        device_model="Raspberry Pi 5 Model B Rev 1.0",
        onnxruntime_version="1.20.1",
        ort_providers=("CPUExecutionProvider",),
    )
    profile, reason = detect_profile(facts)
    assert profile.name == "cpu-arm64"
    assert "arm64 CPU" in reason and "Raspberry Pi 5" in reason and "not a Jetson" in reason


def test_detect_arm64_with_discrete_gpu_stays_on_cpu_and_says_why() -> None:
    facts = MachineFacts(
        arch="arm64",
        nvidia_gpus=("NVIDIA GH200 480GB",),
        onnxruntime_version="1.20.1",
        ort_providers=("CPUExecutionProvider",),
    )
    profile, reason = detect_profile(facts)
    assert profile.name == "cpu-arm64"
    assert "GH200" in reason and "x86_64" in reason


def test_detect_says_when_onnxruntime_is_missing() -> None:
    profile, reason = detect_profile(MachineFacts(arch="x86_64"))
    assert profile.name == "cpu-x86_64"
    assert "onnxruntime is not installed" in reason
    # onnxruntime>=1.32 on Python 3.11+, >=1.23 on 3.10 (tests/system/test_python_versions.py)
    assert f"pip install '{cpu_onnxruntime_requirement()}'" in reason and "pip install 'onnxruntime>=1." in reason
    _, reason = detect_profile(
        MachineFacts(arch="x86_64", onnxruntime_error="OSError: libcudart.so.12")
    )
    assert "libcudart.so.12" in reason


def test_detect_unknown_architecture_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="riscv64"):
        detect_profile(MachineFacts(arch="riscv64"))


def test_detect_on_this_machine() -> None:
    facts = gather_machine_facts()
    profile, reason = detect_profile(facts)
    assert reason
    if facts.is_jetson or facts.cpu_arch != "x86_64":
        pytest.skip(f"not an x86_64 host: {facts}")
    if facts.nvidia_gpus:  # e.g. when the suite runs on a GPU machine
        assert profile.name == "nvidia-gpu"
    else:
        assert profile.name == "cpu-x86_64"
    assert detect_profile()[0].name == profile.name


# ------------------------------------------------------------------- gathering facts


def _executable(path: pathlib.Path, script: str) -> str:
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_gather_reads_injected_files(tmp_path: pathlib.Path) -> None:
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    release = tmp_path / "nv_tegra_release"
    release.write_text(_L4T + "\nINSTALL_TYPE=\n")
    gpus = tmp_path / "gpus"
    (gpus / "0000:01:00.0").mkdir(parents=True)
    (gpus / "0000:01:00.0" / "information").write_text(
        "Model: \t\t NVIDIA GeForce RTX 3090\nIRQ:   \t\t 139\nGPU UUID: \t GPU-1234\n"
    )
    (gpus / "0000:02:00.0").mkdir()  # no information file
    facts = gather_machine_facts(
        machine="aarch64",
        device_tree_model=model,
        tegra_release=release,
        nvidia_gpus_dir=gpus,
        nvidia_smi=None,
        probe_onnxruntime=False,
        meminfo=tmp_path / "absent",
    )
    assert facts == MachineFacts(
        arch="aarch64",
        device_model="NVIDIA Jetson AGX Orin Developer Kit",
        tegra_release=_L4T,
        nvidia_gpus=("NVIDIA GeForce RTX 3090", "NVIDIA GPU 0000:02:00.0"),
    )
    assert facts.is_jetson and facts.cpu_arch == "arm64"


def test_gather_tolerates_absent_files_and_nvidia_smi(tmp_path: pathlib.Path) -> None:
    facts = gather_machine_facts(
        machine="x86_64",
        device_tree_model=tmp_path / "absent",
        tegra_release=tmp_path / "absent",
        nvidia_gpus_dir=tmp_path / "absent",
        nvidia_smi=str(tmp_path / "no-nvidia-smi"),
        probe_onnxruntime=False,
        meminfo=tmp_path / "absent",
    )
    assert facts == MachineFacts(arch="x86_64")
    assert not facts.is_jetson


def test_gather_uses_nvidia_smi_when_proc_lists_no_gpu(tmp_path: pathlib.Path) -> None:
    smi = _executable(
        tmp_path / "nvidia-smi",
        'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0d5f)"\n'
        'echo "GPU 1: Tesla T4 (UUID: GPU-77aa)"',
    )
    facts = gather_machine_facts(
        machine="x86_64",
        device_tree_model=tmp_path / "absent",
        tegra_release=tmp_path / "absent",
        nvidia_gpus_dir=tmp_path / "absent",
        nvidia_smi=smi,
        probe_onnxruntime=False,
    )
    assert facts.nvidia_gpus == ("NVIDIA H100 80GB HBM3", "Tesla T4")


@pytest.mark.parametrize("script", ["exec sleep 30", "echo 'NVIDIA-SMI has failed' >&2; exit 9"])
def test_gather_tolerates_hanging_or_failing_nvidia_smi(
    tmp_path: pathlib.Path, script: str
) -> None:
    smi = _executable(tmp_path / "nvidia-smi", script)
    facts = gather_machine_facts(
        machine="x86_64",
        device_tree_model=tmp_path / "absent",
        tegra_release=tmp_path / "absent",
        nvidia_gpus_dir=tmp_path / "absent",
        nvidia_smi=smi,
        nvidia_smi_timeout_s=0.5,
        probe_onnxruntime=False,
    )
    assert facts.nvidia_gpus == ()


def test_gather_without_onnxruntime(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    facts = gather_machine_facts(nvidia_gpus_dir=tmp_path / "absent", nvidia_smi=None)
    assert facts.onnxruntime_version is None and facts.ort_providers == ()


def test_gather_probes_onnxruntime_when_installed() -> None:
    ort = pytest.importorskip("onnxruntime")
    facts = gather_machine_facts(nvidia_smi=None)
    assert facts.onnxruntime_version == ort.__version__
    assert "CPUExecutionProvider" in facts.ort_providers


# ------------------------------------------------------------- typed TOML validator


@dataclass(frozen=True)
class _Broker:
    host: str = "localhost"
    port: Annotated[int, at_least(1)] = 1883


@dataclass(frozen=True)
class _Config:
    mode: Literal["strict", "lenient"]
    broker: _Broker
    topics: tuple[str, ...] = ()
    window: tuple[int, float] = (0, 0.0)
    limits: dict[str, Annotated[int, at_least(0)]] = field(default_factory=dict)
    timeout_s: float | None = None
    cache_dir: pathlib.Path | None = None
    backups: list[_Broker] = field(default_factory=list)
    level: Literal[1, 2] = 1


@dataclass(frozen=True)
class _Range:
    low: int
    high: int

    def __post_init__(self) -> None:
        if self.high < self.low:
            raise InvalidField("high", f"must be >= low ({self.low})")
        if self.high == self.low:
            raise ValueError("empty range")


@dataclass(frozen=True)
class _WithRange:
    range: _Range


def _cfg(text: str) -> _Config:
    return from_mapping(_Config, parse_toml(text, source="cfg.toml"), source="cfg.toml")


def test_typed_toml_builds_nested_values_and_applies_defaults() -> None:
    cfg = _cfg(
        """
        mode = "strict"
        topics = ["a/b", "c"]
        window = [3, 2]
        limits = { requests = 5 }
        timeout_s = 10
        cache_dir = "/var/cache/x"
        [broker]
        port = 8883
        [[backups]]
        host = "spare"
        """
    )
    assert cfg == _Config(
        mode="strict",
        broker=_Broker(port=8883),
        topics=("a/b", "c"),
        window=(3, 2.0),
        limits={"requests": 5},
        timeout_s=10.0,
        cache_dir=pathlib.Path("/var/cache/x"),
        backups=[_Broker(host="spare")],
    )
    assert isinstance(cfg.timeout_s, float) and isinstance(cfg.window[1], float)
    assert _cfg('mode = "lenient"\n[broker]\n').timeout_s is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[broker]\n", "cfg.toml: mode: missing key"),
        ('mode = "strict"\n', "cfg.toml: broker: missing key"),
        (
            'mode = "fast"\n[broker]\n',
            "cfg.toml: mode: expected one of 'strict', 'lenient', got 'fast'",
        ),
        (
            'mode = "strict"\nlevel = true\n[broker]\n',
            "cfg.toml: level: expected one of 1, 2, got True",
        ),
        ('mode = "strict"\nextra = 1\n[broker]\n',
         "cfg.toml: extra: unknown key (the keys here: mode, broker, topics, window, limits, timeout_s, cache_dir, "
         "backups, level)"),
        ('mode = "strict"\n[broker]\nhots = "x"\n', "cfg.toml: broker.hots: unknown key (did you mean 'host'?)"),
        (
            'mode = "strict"\n[broker]\nport = "1883"\n',
            "cfg.toml: broker.port: expected int, got str",
        ),
        (
            'mode = "strict"\n[broker]\nport = 0\n',
            "cfg.toml: broker.port: expected a value >= 1, got 0",
        ),
        ('mode = "strict"\nbroker = 5\n', "cfg.toml: broker: expected table, got int"),
        (
            'mode = "strict"\ntopics = "a"\n[broker]\n',
            "cfg.toml: topics: expected array of str, got str",
        ),
        (
            'mode = "strict"\ntopics = ["a", 1]\n[broker]\n',
            "cfg.toml: topics[1]: expected str, got int",
        ),
        (
            'mode = "strict"\nwindow = [1]\n[broker]\n',
            "cfg.toml: window: expected an array of 2 items, got 1",
        ),
        (
            'mode = "strict"\nwindow = [1, true]\n[broker]\n',
            "cfg.toml: window[1]: expected float, got bool",
        ),
        (
            'mode = "strict"\nlimits = { a = -1 }\n[broker]\n',
            "cfg.toml: limits.a: expected a value >= 0, got -1",
        ),
        (
            'mode = "strict"\nlimits = [1]\n[broker]\n',
            "cfg.toml: limits: expected table of int, got array",
        ),
        (
            'mode = "strict"\ntimeout_s = "soon"\n[broker]\n',
            "cfg.toml: timeout_s: expected float, got str",
        ),
        (
            'mode = "strict"\ncache_dir = 3\n[broker]\n',
            "cfg.toml: cache_dir: expected str (a path), got int",
        ),
        (
            'mode = "strict"\n[broker]\n[[backups]]\nport = -1\n',
            "cfg.toml: backups[0].port: expected a value >= 1, got -1",
        ),
    ],
)
def test_typed_toml_errors_name_the_dotted_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(text)
    assert str(info.value) == expected


@dataclass(frozen=True)
class _Union:
    value: int | str


def test_typed_toml_union_of_several_types() -> None:
    assert from_mapping(_Union, {"value": 3}, source="s").value == 3
    assert from_mapping(_Union, {"value": "x"}, source="s").value == "x"
    with pytest.raises(ConfigError, match=r"^s: value: expected int \| str, got float$"):
        from_mapping(_Union, {"value": 1.5}, source="s")
    with pytest.raises(ConfigError, match=r"^s: value: expected int \| str, got bool$"):
        from_mapping(_Union, {"value": True}, source="s")


def test_typed_toml_post_init_errors_are_reported_against_the_table() -> None:
    with pytest.raises(ConfigError, match=r"^c\.toml: range\.high: must be >= low \(5\)$"):
        from_mapping(_WithRange, {"range": {"low": 5, "high": 1}}, source="c.toml")
    with pytest.raises(ConfigError, match=r"^c\.toml: range: empty range$"):
        from_mapping(_WithRange, {"range": {"low": 1, "high": 1}}, source="c.toml")


def test_typed_toml_prefix_and_non_mapping_input() -> None:
    with pytest.raises(ConfigError, match=r"^f: daemon\.broker\.port: expected int, got str$"):
        from_mapping(_Broker, {"port": "x"}, source="f", prefix="daemon.broker")
    with pytest.raises(ConfigError, match=r"^f: \(top level\): expected table, got array$"):
        from_mapping(_Broker, [1], source="f")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        from_mapping(dict, {}, source="f")  # type: ignore[type-var]


def test_typed_toml_load_toml_and_parse_errors(tmp_path: pathlib.Path) -> None:
    good = tmp_path / "broker.toml"
    good.write_text('host = "mqtt.local"\n')
    assert load_toml(_Broker, good) == _Broker(host="mqtt.local")
    assert load_toml(_Broker, str(good), source="daemon.toml") == _Broker(host="mqtt.local")
    bad = tmp_path / "bad.toml"
    bad.write_text("host = \n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: invalid TOML:")):
        load_toml(_Broker, bad)
    bad.write_bytes(b'host = "\xff"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: invalid TOML")):
        load_toml(_Broker, bad)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'none.toml'}: cannot read file")):
        load_toml(_Broker, tmp_path / "none.toml")


def test_typed_toml_rejects_non_finite_floats() -> None:
    with pytest.raises(ConfigError, match="expected a finite float, got inf"):
        from_mapping(_Config, {"mode": "strict", "broker": {}, "timeout_s": math.inf}, source="s")


def test_the_gpu_a_profile_names_is_where_the_buffers_go():
    """A profile copied for the second GPU (device_id = 1): the session runs there, and so must
    the KV cache and the bound buffers (the engine passes the choice's device_id to the decoder),
    or every step copies between the two GPUs."""
    from edge_runtime.errors import ConfigError
    from edge_runtime.providers import choose_providers

    both = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    second = [("CUDAExecutionProvider", {"device_id": 1}), ("CPUExecutionProvider", {})]
    choice = choose_providers(second, both, allow_cpu_fallback=False, profile_name="gpu1")
    assert (choice.device, choice.device_id) == ("cuda", 1)
    trt = [("TensorrtExecutionProvider", {"device_id": "1"}), ("CUDAExecutionProvider", {"device_id": 1})]
    assert choose_providers(trt, both, allow_cpu_fallback=False, profile_name="gpu1").device_id == 1
    assert choose_providers([("CUDAExecutionProvider", {})], both, allow_cpu_fallback=False,
                            profile_name="gpu").device_id == 0
    fallback = choose_providers(second, ["CPUExecutionProvider"], allow_cpu_fallback=True, profile_name="gpu1")
    assert (fallback.device, fallback.device_id) == ("cpu", 0)
    with pytest.raises(ConfigError, match="device_id 'second' is not a GPU number"):
        choose_providers([("CUDAExecutionProvider", {"device_id": "second"})], both, allow_cpu_fallback=False,
                         profile_name="gpu")


def test_the_two_pass_lm_head_applies_to_int4_gptq_graphs_with_float32_activations() -> None:
    """lm_head_refine_top_k: where an export takes it (the rule memory_fit's estimate shares)."""
    q = load_profile("cpu-x86_64").quantization
    assert q.lm_head_refine_top_k == 32
    assert q.head_refine_top_k_for("int4", "float32", "gptq") == 32
    assert q.head_refine_top_k_for("int4", "float32", "rtn") == 0  # a rounded int4 head's tail is too far
    assert q.head_refine_top_k_for("int8", "float32", "gptq") == 0  # the head is int8 already
    assert q.head_refine_top_k_for("int4", "float16", "gptq") == 0  # the GPU graphs' activations
    assert load_profile("nvidia-gpu").quantization.head_refine_top_k_for("int4", "float32", "gptq") == 0
