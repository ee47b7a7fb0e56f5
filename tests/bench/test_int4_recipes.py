"""benchmarks/int4_recipes.py on a tiny checkpoint: both modes run end to end and write
what they print; the speed mode keeps every recipe's graph and rebuilds it only when the
checkpoint or the recipe changes."""

from __future__ import annotations

import json

import pytest


def test_recipe_names_cover_symmetry_rounding_and_head(recipes):
    named = recipes.all_recipes()
    # 2 symmetries x 3 roundings x 3 heads, the int8 heads in blocks of 128, and each int8 head
    # (both block sizes) in two passes refining its top 8, 32 or 128
    assert len(named) == 24 + 2 * 3 * 2 * 3
    assert named["asym-gptq-head8b128r32"] == recipes.Recipe("asym-gptq-head8b128r32", False, True, 8, gptq=True,
                                                             head_block=128, head_refine=32)
    assert named["sym-rtn-head8r8"].head_refine == 8 and named["sym-rtn-head8r8"].head_block == 0
    assert named["sym-gptq-head8b128"] == recipes.Recipe("sym-gptq-head8b128", True, True, 8, gptq=True,
                                                         head_block=128)
    g = named["sym-gptq-head4"]
    assert (g.symmetric, g.scale_search, g.head_bits, g.gptq) == (True, True, 4, True)
    assert not named["sym-mse-head4"].gptq
    assert named["asym-mse-headf"] == recipes.Recipe("asym-mse-headf", False, True, 0)
    r = named["sym-mse-head8"]
    assert (r.symmetric, r.scale_search, r.head_bits) == (True, True, 8)
    assert named["asym-rtn-head4"] == recipes.Recipe("asym-rtn-head4", False, False, 4)


def test_fidelity_mode_against_torch(recipes, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "fidelity"
    assert recipes.main(["--checkpoint", str(tiny_checkpoint), "--recipes", "asym-rtn-head8", "sym-mse-head4",
                         "asym-mse-headf", "sym-gptq-head8", "asym-rtn-head8r8", "asym-rtn-head4", "--out",
                         str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {r["recipe"]: r for r in result["rows"]}
    assert set(rows) == {"asym-rtn-head8", "sym-mse-head4", "asym-mse-headf", "sym-gptq-head8", "asym-rtn-head8r8",
                         "asym-rtn-head4"}
    assert result["layout"] == {"block_size": 32, "accuracy_level": 4}
    for row in rows.values():
        assert 0.0 <= row["greedy_agreement_min"] <= row["greedy_agreement"] <= 1.0
        assert 0.0 <= row["greedy_agreement_strict"] <= row["greedy_agreement"]  # the same until the first flip
        assert 0.0 <= row["teacher_forced_agreement"] <= 1.0 and row["max_logit_diff"] >= 0.0
        assert row["corpus_positions"] > 1800 and 0.0 <= row["corpus_top1_agreement"] <= 1.0
        assert row["kl_divergence_mean"] > 0.0 and row["kl_divergence_p99"] > 0.0
    # an int4 lm_head reads fewer bytes than an int8 one, which reads fewer than a float one
    assert (rows["sym-mse-head4"]["weight_bytes_per_step"] < rows["asym-rtn-head8"]["weight_bytes_per_step"]
            < rows["asym-mse-headf"]["weight_bytes_per_step"])
    # the head in two passes reads the int4 head and 8 rows of the int8 one: each row 64 codes,
    # two float32 scales and two zero points (blocks of 32); and two int64 constants (k, an axis)
    two_pass = rows["asym-rtn-head8r8"]["weight_bytes_per_step"]
    assert two_pass - rows["asym-rtn-head4"]["weight_bytes_per_step"] == 8 * (64 + 2 * 4 + 2) + 2 * 8
    assert result["table"] in capsys.readouterr().out

    # the GPU profiles' layout: larger blocks store fewer scales and zero points
    out128 = tmp_path / "block128"
    assert recipes.main(["--checkpoint", str(tiny_checkpoint), "--recipes", "asym-mse-headf", "--block-size", "64",
                         "--accuracy-level", "0", "--out", str(out128)]) == 0
    result128 = json.loads(out128.with_suffix(".json").read_text())
    assert result128["layout"] == {"block_size": 64, "accuracy_level": 0}
    assert result128["rows"][0]["weight_bytes_per_step"] < rows["asym-mse-headf"]["weight_bytes_per_step"]


def test_speed_mode_alternates_recipes_and_reuses_graphs(recipes, tiny_checkpoint, tmp_path, capsys):
    args = ["--speed", "--checkpoint", str(tiny_checkpoint), "--recipes", "asym-rtn-head8", "sym-mse-head8",
            "--threads", "1", "--contexts", "8", "16", "--steps", "3", "--workdir", str(tmp_path / "work"),
            "--out", str(tmp_path / "speed")]
    assert recipes.main(args) == 0
    first = capsys.readouterr()
    assert "building asym-rtn-head8" in first.err and "building sym-mse-head8" in first.err
    result = json.loads((tmp_path / "speed.json").read_text())
    assert [r["recipe"] for r in result["rows"]] == ["asym-rtn-head8", "sym-mse-head8"]
    for row in result["rows"]:
        assert set(row["decode_tokens_per_s"]) == {"8", "16"}
        assert all(v > 0 for v in row["decode_tokens_per_s"].values())
    assert "1.00x" in result["table"] and result["table"] in first.out
    assert recipes.main(args) == 0  # same checkpoint, same recipes: the graphs are reused
    assert "building" not in capsys.readouterr().err


def test_speed_mode_runs_each_recipe_at_each_accuracy_level(recipes, tiny_checkpoint, tmp_path, capsys):
    import onnx

    args = ["--speed", "--checkpoint", str(tiny_checkpoint), "--recipes", "sym-rtn-head8", "--accuracy-level", "4",
            "1", "--threads", "1", "--contexts", "8", "--steps", "2", "--workdir", str(tmp_path / "work"),
            "--out", str(tmp_path / "speed")]
    assert recipes.main(args) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    assert [r["recipe"] for r in result["rows"]] == ["sym-rtn-head8@acc4", "sym-rtn-head8@acc1"]
    assert [layout["accuracy_level"] for layout in result["layouts"]] == [4, 1]
    for level in (4, 1):  # each graph's MatMulNBits nodes carry their level
        model = onnx.load(str(tmp_path / "work" / f"sym-rtn-head8@acc{level}" / "model.onnx"), load_external_data=False)
        levels = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                  if a.name == "accuracy_level"}
        assert levels == {level}
    # fidelity runs one level at a time
    with pytest.raises(SystemExit):
        recipes.main(["--recipes", "sym-rtn-head8", "--accuracy-level", "4", "1"])
    assert "several --accuracy-level or --block-size values are for --speed" in capsys.readouterr().err


def test_speed_mode_runs_each_recipe_at_each_block_size(recipes, tiny_checkpoint, tmp_path, capsys):
    import onnx

    args = ["--speed", "--checkpoint", str(tiny_checkpoint), "--recipes", "sym-rtn-head8", "sym-rtn-head4",
            "--block-size", "32", "64", "--threads", "1", "--contexts", "8", "--steps", "2",
            "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "speed")]
    assert recipes.main(args) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    assert [r["recipe"] for r in result["rows"]] == ["sym-rtn-head8@b32", "sym-rtn-head4@b32",
                                                     "sym-rtn-head8@b64", "sym-rtn-head4@b64"]
    for block in (32, 64):  # each graph's MatMulNBits nodes carry their block size
        model = onnx.load(str(tmp_path / "work" / f"sym-rtn-head4@b{block}" / "model.onnx"), load_external_data=False)
        sizes = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                 if a.name == "block_size"}
        assert sizes == {block}
    rows = {r["recipe"]: r for r in result["rows"]}  # fewer scales a block of 64 (the tiny K divides both)
    assert rows["sym-rtn-head4@b64"]["weight_bytes_per_step"] < rows["sym-rtn-head4@b32"]["weight_bytes_per_step"]
    for bad in (["--block-size", "48"], ["--block-size", "8"], ["--block-size", "32", "64"]):
        with pytest.raises(SystemExit):  # not a power of two from 16; several sizes without --speed
            recipes.main(["--recipes", "sym-rtn-head8", *bad])
    err = capsys.readouterr().err
    assert "powers of two from 16" in err and "are for --speed" in err
