"""Memory fit: weights + KV cache + overhead against each profile's budget, for the
published Code Llama shapes (the README's table) and for real bundles."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_runtime import memory_fit
from edge_runtime.memory_fit import (
    CODE_LLAMA_SHAPES,
    GiB,
    estimate_plan,
    estimate_weight_bytes,
    fit_table,
    kv_cache_bytes,
    largest_fitting_context,
    size_class,
    weight_tensor_bytes,
    written_file_bytes,
)
from edge_runtime.profiles import list_profiles, load_profile

README = Path(__file__).resolve().parents[2] / "README.md"


def test_published_shapes_and_parameter_counts():
    counts = {name: s.parameter_count for name, s in CODE_LLAMA_SHAPES.items()}
    assert counts == {"7B": 6_738_546_688, "13B": 13_016_028_160, "34B": 33_743_970_304, "70B": 68_976_910_336}
    for name, s in CODE_LLAMA_SHAPES.items():
        assert size_class(hidden_size=s.hidden_size, num_layers=s.num_layers, num_heads=s.num_heads,
                          num_kv_heads=s.num_kv_heads, intermediate_size=s.intermediate_size) == name
    assert size_class(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=1) == "custom"
    assert size_class(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2) == "custom"


def test_kv_cache_formula():
    s70 = CODE_LLAMA_SHAPES["70B"]
    # layers x 2 x kv_heads x head_dim x context x bytes: 80 x 2 x 8 x 128 x 4096 x 2 = 1.25 GiB
    assert kv_cache_bytes(num_layers=s70.num_layers, num_kv_heads=s70.num_kv_heads, head_dim=s70.head_dim,
                          context=4096, dtype_bytes=2) == int(1.25 * GiB)
    s7 = CODE_LLAMA_SHAPES["7B"]
    assert kv_cache_bytes(num_layers=32, num_kv_heads=32, head_dim=s7.head_dim, context=4096, dtype_bytes=4,
                          buffers=2) == 8 * GiB  # optimum graph: past and present buffers


def test_weight_estimates():
    s7 = CODE_LLAMA_SHAPES["7B"]
    assert estimate_weight_bytes(s7, "fp16", block_size=32, symmetric=False, float_dtype="float16") == \
        2 * s7.parameter_count
    # cpu-x86_64 int4 (block 32, zero points, float32 scales, embedding + lm_head float32):
    # a fused 7B graph exported with that recipe measured 5.1 GB
    int4 = estimate_weight_bytes(s7, "int4", block_size=32, symmetric=False, float_dtype="float32")
    assert 4.9e9 < int4 < 5.4e9
    smaller_blocks = estimate_weight_bytes(s7, "int4", block_size=128, symmetric=True, float_dtype="float16")
    assert smaller_blocks < int4
    assert estimate_weight_bytes(s7, "int8", block_size=32, symmetric=False, float_dtype="float32") > int4


def test_who_fits_where():
    profiles = {p.name: p for p in list_profiles()}
    fits = {(m, p): largest_fitting_context(CODE_LLAMA_SHAPES[m], profiles[p], "int4") is not None
            for m in CODE_LLAMA_SHAPES for p in profiles}
    assert [p for p in profiles if fits["70B", p]] == ["jetson-orin-agx"]
    assert all(fits["7B", p] for p in profiles)
    plan = largest_fitting_context(CODE_LLAMA_SHAPES["70B"], profiles["jetson-orin-agx"], "int4")
    assert plan.kv_dtype == "float16" and plan.total_bytes <= 48 * GiB and "70B" in plan.what
    too_long = estimate_plan(CODE_LLAMA_SHAPES["13B"], profiles["jetson-orin-nano"], "int4", 2048)
    assert not too_long.fits and "> memory budget 5.12 GiB" in too_long.describe()


def test_an_int8_kv_cache_is_a_quarter_of_float32_and_fp32_bundles_keep_float():
    import dataclasses

    profiles = {p.name: p for p in list_profiles()}
    assert profiles["cpu-x86_64"].kv_cache.bits == profiles["cpu-arm64"].kv_cache.bits == 8
    cpu = profiles["cpu-x86_64"]
    float_cpu = dataclasses.replace(cpu, kv_cache=dataclasses.replace(cpu.kv_cache, bits=0))
    s7 = CODE_LLAMA_SHAPES["7B"]
    int4 = estimate_plan(s7, cpu, "int4", 4096)
    fp32 = estimate_plan(s7, cpu, "fp32", 4096)
    assert int4.kv_dtype == "int8" and fp32.kv_dtype == "float32"
    assert int4.kv_cache_bytes * 4 == fp32.kv_cache_bytes == 2 * 32 * 32 * 128 * 4096 * 4
    # the scales of the int4 weights stay float32 (the activations' dtype), not int8; a written
    # bundle adds its rotary tables, its data file's alignment and its graph file
    recipe = dict(block_size=128, symmetric=False, float_dtype="float32", keep_bits=8, keep_block_size=128,
                  head_two_pass=True, embedding_bits=8)
    assert int4.weights_bytes == estimate_weight_bytes(s7, "int4", **recipe) + written_file_bytes(
        weight_tensor_bytes(s7, "int4", **recipe), head_dim=128, context=4096, float_dtype="float32", num_layers=32)
    # the lm_head in two passes (lm_head_refine_top_k) keeps an int4 copy beside the int8 one:
    # half a byte a weight, a float32 scale and half a byte of zero point a block of 128
    blocks = 32016 * 4096 // 128
    assert estimate_weight_bytes(s7, "int4", **recipe) - estimate_weight_bytes(
        s7, "int4", **{**recipe, "head_two_pass": False}) == 32016 * 4096 // 2 + blocks * 4 + blocks // 2
    # the embedding table in int8 blocks of 32 (embedding_bits): a byte a weight, a float32 scale
    # and a zero point a block, instead of four bytes a weight
    assert estimate_weight_bytes(s7, "int4", block_size=128, symmetric=False, float_dtype="float32") \
        - estimate_weight_bytes(s7, "int4", block_size=128, symmetric=False, float_dtype="float32",
                                embedding_bits=8) == 32016 * 4096 * 3 - 32016 * 4096 // 32 * 5
    # the int8 lm_head's block size is its own (keep_block_size): in blocks of 32 it carries 4x the scales
    assert estimate_weight_bytes(s7, "int4", block_size=32, symmetric=True, float_dtype="float32", keep_bits=8) \
        - estimate_weight_bytes(s7, "int4", block_size=32, symmetric=True, float_dtype="float32", keep_bits=8,
                                keep_block_size=128) == 32016 * 4096 * (1 / 32 - 1 / 128) * 4
    assert estimate_plan(s7, profiles["nvidia-gpu"], "int4", 4096).kv_dtype == "float16"
    float_kv = estimate_plan(s7, float_cpu, "int4", 4096)
    assert float_kv.kv_dtype == "float32" and float_kv.kv_cache_bytes == fp32.kv_cache_bytes
    # a prompt over the int8 cache attends in float: one layer's keys and values, dequantized
    # and present, on top of the float cache's overhead, and every layer's codes of a chunk's
    # new rows (512) before the decoder copies them into its buffers
    assert int4.overhead_bytes - float_kv.overhead_bytes == 2 * 2 * 32 * 128 * 4096 * 4 + 2 * 32 * 32 * 128 * 512


def test_the_readme_table_is_the_commands_output():
    table = fit_table(list_profiles(), markdown=True)
    assert table in README.read_text(encoding="utf-8"), "regenerate with: edge-runtime fit --table --markdown"
    rows = [r for r in table.splitlines()[2:]]
    assert len(rows) == 4 * 4 and all(re.match(r"\| (7B|13B|34B|70B) \|", r) for r in rows)


def test_the_fit_table_marks_refused_what_the_export_refuses(tiny_checkpoint, tmp_path, capsys):
    """A cell the table gives as fitting is one the exporter makes: where the export refuses the
    precision for the profile (fp32 on a GPU profile's fused graph), the table says "refused"."""
    from edge_export.pipeline import ExportError, ExportOptions, run_export

    assert memory_fit.main(["--table"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    profiles = re.findall(r"([a-z0-9_-]+) \(\d+ GiB, max \d+\)", lines[0])
    refused = set()
    for line in lines[1:17]:
        cells = line.split()
        precision = cells[3]
        for name, cell in zip(profiles, re.findall(r"refused|no|\d+ \([\d.]+ GiB\)", line.split(precision, 1)[1])):
            if cell == "refused":
                refused.add((name, precision))
    assert ("nvidia-gpu", "fp32") in refused and ("jetson-orin-agx", "fp32") in refused
    assert not any(name.startswith("cpu-") for name, _ in refused)
    assert "refused: the export refuses it" in out
    for name, precision in sorted(refused):
        with pytest.raises(ExportError, match=f"but the {name} profile runs on the GPU"):
            run_export(ExportOptions(checkpoint=tiny_checkpoint, profile=name, output=tmp_path / name,
                                     precision=precision, skip_fidelity=True))
    # the optimum graph's table refuses nothing (its cache follows the precision)
    assert memory_fit.main(["--table", "--graph", "optimum"]) == 0
    assert "refused" not in capsys.readouterr().out


def test_a_bundle_of_a_profile_file_says_to_pass_that_file(tiny_checkpoint, tmp_path):
    """A bundle exported with --profile my-x86.toml records the name "my-x86": fit --bundle
    and generate without --profile cannot find it, and say to give the file."""
    import subprocess
    import sys

    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress
    from edge_runtime.profiles import profile_text

    toml = tmp_path / "my-x86.toml"
    toml.write_text(profile_text("cpu-x86_64").replace('name = "cpu-x86_64"', 'name = "my-x86"'))
    bundle = tmp_path / "b"
    run_export(ExportOptions(checkpoint=tiny_checkpoint, profile=toml, output=bundle, precision="fp32",
                             skip_fidelity=True), Progress(5, enabled=False))
    for argv in (["fit", "--bundle", str(bundle)], ["generate", "--bundle", str(bundle), "--prompt", "def f():"]):
        cli = subprocess.run([sys.executable, "-m", "edge_runtime", *argv], capture_output=True, text=True,
                             timeout=300)
        assert cli.returncode == 2 and "unknown device profile 'my-x86'" in cli.stderr, cli.stderr
        assert "--profile path/to/my-x86.toml" in cli.stderr and "give that file: --profile FILE" in cli.stderr
        assert "Traceback" not in cli.stderr
    fits = subprocess.run([sys.executable, "-m", "edge_runtime", "fit", "--bundle", str(bundle), "--profile", str(toml)],
                          capture_output=True, text=True, timeout=300)
    assert fits.returncode == 0 and "on profile my-x86" in fits.stdout


def test_fit_command_table_and_bundle(tiny_bundle, capsys):
    assert memory_fit.main(["--table"]) == 0
    out = capsys.readouterr().out
    assert "jetson-orin-agx" in out and "70B" in out
    assert memory_fit.main(["--bundle", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    assert "tiny-codellama (fp32) on profile cpu-x86_64: weights" in out and out.strip().endswith(": fits")
    assert memory_fit.main(["--bundle", str(tiny_bundle), "--context", "2048"]) == 0  # the bundle's limit
    assert "2048 tokens" in capsys.readouterr().out
    for beyond in ("2049", "0"):  # past what the engine would run: no "fits" for a context it refuses
        assert memory_fit.main(["--bundle", str(tiny_bundle), "--context", beyond]) == 2
        captured = capsys.readouterr()
        assert not captured.out and (f"--context {beyond}: the engine runs this bundle with cpu-x86_64 at 1 to 2048 "
                                     "tokens (the bundle's context_limit 2048, the profile's max_context 4096)"
                                     in captured.err)


def test_an_unknown_profile_is_named_before_the_bundle_is_hashed(tiny_bundle, tmp_path, capsys):
    """A bundle whose graph no longer matches its hash, asked with a wrong profile name: the
    name is what is wrong first (and what the user is told at once, not after hashing GiBs)."""
    import shutil

    from edge_runtime.engine import Engine
    from edge_runtime.errors import ConfigError

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    with open(bundle / "tokenizer.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(ConfigError, match="unknown device profile 'no-such-profile'"):
        Engine.from_bundle(bundle, "no-such-profile")
    assert memory_fit.main(["--bundle", str(bundle), "--profile", "no-such-profile"]) == 2
    assert "unknown device profile 'no-such-profile'" in capsys.readouterr().err


def test_fit_says_refused_where_the_engine_would_refuse_the_bundle_on_the_gpu(tiny_bundle, capsys):
    # the tiny bundle's KV cache is float32: the fused graph's attention on CUDA takes float16 only
    assert memory_fit.main(["--bundle", str(tiny_bundle), "--profile", "nvidia-gpu"]) == 1
    out = capsys.readouterr().out
    assert "but REFUSED: this bundle's KV cache is float32, and nvidia-gpu runs on the GPU" in out


@pytest.mark.parametrize("argv", [["--table", "--bundle", "B"], ["--table", "--profile", "cpu-arm64"],
                                  ["--table", "--context", "5"]])
def test_fit_flags_that_would_be_ignored_are_refused(argv, tiny_bundle, capsys):
    argv = [str(tiny_bundle) if a == "B" else a for a in argv]
    assert memory_fit.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.slow
def test_the_jetson_orin_nano_budget_holds_a_written_7b_int4_bundle_at_its_context(tmp_path, exporter):
    """The profile is sized for Code Llama 7B int4 at its 2048 tokens. memory_fit's estimate
    of the weights counts the rotary tables, the external data's alignment (at its most) and
    the graph file, so a written bundle is at most the estimate, and within a few MiB of it
    (the alignment's bound: about 64 KiB a large tensor against half that written on average).
    Its weights here: 7B-wide exports of 1 and 3 layers, extrapolated to 32 (every layer has
    the same tensors)."""
    import shutil

    from edge_export.synthetic import build_checkpoint_streamed
    from edge_runtime.bundle import load_bundle
    from edge_runtime.profiles import profile_text

    profile = load_profile("jetson-orin-nano")
    quick = tmp_path / "nano-rtn.toml"  # the same bytes as the profile's own recipe, exported in seconds
    quick.write_text(profile_text("jetson-orin-nano").replace("scale_search = true", "scale_search = false")
                     .replace('algorithm = "gptq"', 'algorithm = "rtn"'))
    weights = {}
    for layers in (1, 3):
        checkpoint = build_checkpoint_streamed(tmp_path / f"7b-wide-{layers}", num_layers=layers)
        bundle = exporter(checkpoint, tmp_path / f"bundle-{layers}", precision="int4", profile=quick,
                          skip_fidelity=True)
        shutil.rmtree(checkpoint)
        weights[layers] = memory_fit.bundle_plan(load_bundle(bundle), profile).weights_bytes
    seven_b = weights[1] + 31 * (weights[3] - weights[1]) // 2
    estimate = estimate_plan(CODE_LLAMA_SHAPES["7B"], profile, "int4", profile.max_context)
    print(f"written 7B (extrapolated) {seven_b}, estimate {estimate.weights_bytes}: "
          f"{(estimate.weights_bytes - seven_b) / 2**20:.1f} MiB under")
    assert seven_b <= estimate.weights_bytes < seven_b + 12 * 2**20
    assert estimate.fits


@pytest.mark.parametrize("name", [p.name for p in list_profiles()])
def test_profile_budget_fits_its_default_7b_at_some_context(name):
    p = load_profile(name)
    assert largest_fitting_context(CODE_LLAMA_SHAPES["7B"], p, p.precision) is not None
