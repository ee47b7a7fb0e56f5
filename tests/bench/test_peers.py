"""benchmarks/peers.py's own logic: the table, the best-of-rounds
merge, skipping peers that are not installed, and one end-to-end run of our engine alone on a
tiny checkpoint (seconds; no peers needed, no timing asserted)."""

from __future__ import annotations

import json
import sys

import pytest


def _info(peers, engine, weights, kv_bytes=4):
    return peers.ModelInfo(engine, "int4", weights + 1000, weights, kv_bytes)


def test_rows_percent_of_roofline_and_ratio_to_ours(peers):
    arch = {"layers": 1, "kv_heads": 1, "head_dim": 1}
    infos = {peers.OURS: _info(peers, peers.OURS, 1000), peers.GENAI: _info(peers, peers.GENAI, 500),
             peers.LLAMACPP: _info(peers, peers.LLAMACPP, 800, kv_bytes=2)}
    runs = {peers.OURS: peers.EngineRun(peers.OURS, decode_tokens_per_s={100: 50.0, 200: 40.0}),
            peers.LLAMACPP: peers.EngineRun(peers.LLAMACPP, decode_tokens_per_s={100: 25.0, 200: 40.0})}
    rows = peers.build_rows(infos, runs, bandwidth=1e5, arch=arch, contexts=[100, 200])
    assert [r["engine"] for r in rows] == [peers.OURS, peers.LLAMACPP]  # genai did not run: no row
    ours, llama = rows
    # ours: 1000 weight bytes + 2 x 100 tokens x 4 bytes of KV = 1800 bytes -> 1e5 / 1800 tok/s
    assert ours["roofline_tokens_per_s"][100] == pytest.approx(1e5 / 1800)
    assert ours["roofline_percent"][100] == pytest.approx(100 * 50 / (1e5 / 1800))
    # llama.cpp: f16 KV: 800 + 2 x 200 x 2 = 1600 bytes at context 200
    assert llama["roofline_tokens_per_s"][200] == pytest.approx(1e5 / 1600)
    assert ours["ours_over_this"] == {100: 1.0, 200: 1.0}
    assert llama["ours_over_this"] == {100: 2.0, 200: 1.0}
    assert ours["read_roofline_percent"] == {}  # no read bandwidth given: no read roofline


def test_read_roofline_is_the_same_bytes_over_the_read_bandwidth(peers):
    arch = {"layers": 1, "kv_heads": 1, "head_dim": 1}
    infos = {peers.OURS: _info(peers, peers.OURS, 1000)}
    runs = {peers.OURS: peers.EngineRun(peers.OURS, decode_tokens_per_s={100: 50.0})}
    rows = peers.build_rows(infos, runs, bandwidth=1e5, read_bandwidth=0.5e5, arch=arch, contexts=[100])
    # 1800 bytes a step (as above) at 0.5e5 bytes/s: 27.8 tok/s, so 50 tok/s is 180 %
    assert rows[0]["read_roofline_percent"][100] == pytest.approx(100 * 50 / (0.5e5 / 1800))
    assert rows[0]["roofline_percent"][100] == pytest.approx(100 * 50 / (1e5 / 1800))
    table = peers.format_table(rows, [100]).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    cells = dict(zip(header, (c.strip() for c in table[2].strip("|").split("|"))))
    assert cells["% roofline @100"] == "90%" and cells["% read roofline @100"] == "180%"


def test_table_has_one_line_per_row_and_dashes_for_missing_points(peers):
    arch = {"layers": 1, "kv_heads": 1, "head_dim": 1}
    infos = {peers.OURS: _info(peers, peers.OURS, 1000)}
    runs = {peers.OURS: peers.EngineRun(peers.OURS, prefill_tokens=512, prefill_tokens_per_s=100.0, ttft_ms=5120.0,
                                        decode_tokens_per_s={128: 20.0}, peak_rss_bytes=2**30)}
    rows = peers.build_rows(infos, runs, bandwidth=1e6, arch=arch, contexts=[128])
    table = peers.format_table(rows, [128, 2048]).splitlines()
    assert len(table) == 3
    assert "decode tok/s @2048" in table[0] and "% roofline @128" in table[0] and "ours ÷ engine @128" in table[0]
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[0] == peers.OURS and cells[3] == "100.0" and cells[4] == "5120 ms"
    assert cells[5:7] == ["20.00", "-"] and cells[7] == "1024 MiB"
    assert "read roofline" not in table[0]  # measured without a read bandwidth


def test_merge_keeps_each_numbers_best_round(peers):
    a = peers.EngineRun(peers.OURS, 512, 100.0, 900.0, {128: 20.0}, {128: 22.0}, 10, 2.0)
    b = peers.EngineRun(peers.OURS, 512, 90.0, 800.0, {128: 21.0}, {128: 21.5}, 20, 1.0)
    m = peers.merge_runs([a, b], "best")
    assert (m.prefill_tokens_per_s, m.ttft_ms, m.decode_tokens_per_s, m.decode_best_tokens_per_s,
            m.peak_rss_bytes, m.load_s) == (100.0, 800.0, {128: 21.0}, {128: 22.0}, 20, 1.0)


def test_merge_by_default_keeps_each_numbers_median_round(peers):
    """One lucky round (the third) does not decide the number."""
    rounds = [peers.EngineRun(peers.OURS, 512, 100.0, 900.0, {128: 20.0}, {128: 22.0}, 10, 2.0),
              peers.EngineRun(peers.OURS, 512, 90.0, 950.0, {128: 21.0}, {128: 21.5}, 20, 1.0),
              peers.EngineRun(peers.OURS, 512, 140.0, 600.0, {128: 30.0}, {128: 31.0}, 15, 1.5)]
    m = peers.merge_runs(rounds)
    assert (m.prefill_tokens_per_s, m.ttft_ms, m.decode_tokens_per_s, m.decode_best_tokens_per_s,
            m.peak_rss_bytes, m.load_s) == (100.0, 900.0, {128: 21.0}, {128: 31.0}, 20, 1.0)
    with pytest.raises(ValueError, match="aggregate"):
        peers.merge_runs(rounds, "mean")


def test_paired_ratio_is_the_median_over_turns_of_ours_over_the_engine_in_the_same_turn(peers):
    """Turn by turn, not median over median: a turn where the machine was slow for both counts
    as a tie, and the middle half of the ratios shows how far the turns agree."""
    turns = {peers.OURS: {128: [100.0, 50.0, 80.0, 120.0]},
             peers.GENAI: {128: [90.0, 50.0, 100.0, 100.0]}}
    ours_row, genai_row = peers.paired_rows(turns)
    assert ours_row["engine"] == peers.OURS and ours_row["ours_over_this"] == {128: 1.0}
    assert genai_row["decode_tokens_per_s"] == {128: 95.0}
    # ratios 100/90, 50/50, 80/100, 120/100 = 1.111, 1.0, 0.8, 1.2: median 1.056 (the medians' ratio: 90/95 = 0.947)
    assert genai_row["ours_over_this"][128] == pytest.approx((100 / 90 + 1.0) / 2)
    low, high = genai_row["ours_over_this_middle_half"][128]
    assert low == pytest.approx(0.95) and high == pytest.approx(100 / 90 + 0.25 * (1.2 - 100 / 90))
    table = peers.format_paired_table([ours_row, genai_row], [128, 2048])
    assert "| edge-runtime | 90.00 | - | 1.00 | - |" in table
    assert f"| onnxruntime-genai | 95.00 | - | 1.06 (0.95-{high:.2f}) | - |" in table


def test_paired_roofline_divides_each_turn_by_the_bandwidth_measured_in_that_turn(peers):
    """A turn's % of the roofline is its tokens/s over that turn's bandwidth / bytes a step:
    a slow turn on a slow machine is not set against a fast turn's bandwidth."""
    turns = {peers.OURS: {128: [100.0, 50.0, 80.0]}, peers.GENAI: {128: [90.0, 45.0, 90.0]}}
    gb = 1e9
    bandwidth = {128: [{"bandwidth": 40 * gb, "read_bandwidth": 50 * gb},
                       {"bandwidth": 20 * gb, "read_bandwidth": 25 * gb},
                       {"bandwidth": 40 * gb, "read_bandwidth": 50 * gb}]}
    step = {peers.OURS: {128: 320_000_000}, peers.GENAI: {128: 400_000_000}}
    ours_row, genai_row = peers.paired_rows(turns, bandwidth=bandwidth, bytes_per_step=step)
    # ours: 100*0.32/40 = 80 %, 50*0.32/20 = 80 %, 80*0.32/40 = 64 % -> median 80 % (medians' ratio: 80*0.32/40 = 64 %)
    assert ours_row["roofline_percent"][128] == pytest.approx(80.0)
    assert ours_row["roofline_percent_middle_half"][128] == pytest.approx([72.0, 80.0])
    assert ours_row["read_roofline_percent"][128] == pytest.approx(64.0)
    # genai: 90*0.4/40 = 90 %, 45*0.4/20 = 90 %, 90 % -> 90 %
    assert genai_row["roofline_percent"][128] == pytest.approx(90.0)
    table = peers.format_paired_table([ours_row, genai_row], [128])
    assert table.splitlines()[0].endswith("| % roofline @128 (middle half) |")
    assert "| edge-runtime | 80.00 | 1.00 | 80% (72-80) |" in table
    # without the bandwidth (or an engine's bytes) no roofline column or cell
    assert "roofline" not in peers.format_paired_table(peers.paired_rows(turns), [128])
    rows = peers.paired_rows(turns, bandwidth=bandwidth, bytes_per_step={peers.OURS: step[peers.OURS]})
    assert "roofline_percent" not in rows[1] and peers.format_paired_table(rows, [128]).endswith("| - |")


def test_round_order_rotates_by_one_a_round(peers):
    engines = ["a", "b", "c"]
    assert [peers.round_order(engines, r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert peers.round_order([], 3) == []


def test_paired_turns_run_every_engine_in_one_process(peers, tiny_checkpoint, tmp_path, capsys):
    """After the rounds, the engines decode taking turns in one process; the table's ratio is
    what the saved turns give."""
    out = tmp_path / "result"
    rc = peers.main(["--checkpoint", str(tiny_checkpoint), "--workdir", str(tmp_path / "work"), "--out", str(out),
                     "--peer-python", str(tmp_path / "no-venv" / "python"), "--contexts", "8", "16",
                     "--table-contexts", "8", "16", "--prefill-tokens", "8", "--decode-tokens", "2",
                     "--rounds", "2", "--threads", "1", "--bandwidth-mib", "8", "--paired-blocks", "3",
                     "--paired-steps", "2", "--engines", peers.OURS, peers.OURS_GENAI_RECIPE])
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out
    # the rounds rotate the engines' order: no engine always runs right after the bandwidth measure
    started = [line.split("]")[1].split(" (load")[0].strip() for line in captured.err.splitlines()
               if ": round " in line or "memory bandwidth" in line]
    assert started == ["memory bandwidth 1/2 ...", f"{peers.OURS}: round 1/2 ...",
                       f"{peers.OURS_GENAI_RECIPE}: round 1/2 ...", "memory bandwidth 2/2 ...",
                       f"{peers.OURS_GENAI_RECIPE}: round 2/2 ...", f"{peers.OURS}: round 2/2 ..."]
    paired = json.loads(out.with_suffix(".json").read_text())["paired"]
    assert paired["table"] in printed and "taking turns" in paired["setup"]
    turns = paired["turns"]
    assert set(turns) == {peers.OURS, peers.OURS_GENAI_RECIPE}
    assert all(len(turns[e][c]) == 3 and min(turns[e][c]) > 0 for e in turns for c in ("8", "16"))
    row = {r["engine"]: r for r in paired["rows"]}[peers.OURS_GENAI_RECIPE]
    ratios = sorted(o / e for o, e in zip(turns[peers.OURS]["16"], turns[peers.OURS_GENAI_RECIPE]["16"]))
    assert row["ours_over_this"]["16"] == pytest.approx(ratios[1])
    # each turn measured the bandwidth first; a turn's % of the roofline is against that turn's
    result = json.loads(out.with_suffix(".json").read_text())
    bandwidth = paired["bandwidth"]["16"]
    assert len(bandwidth) == 3 and all(b["bandwidth"] > 0 and b["read_bandwidth"] > 0 for b in bandwidth)
    models, arch = result["models"][peers.OURS_GENAI_RECIPE], result["architecture"]
    step = peers.step_bytes(peers.ModelInfo(**models), arch, 16)
    shares = sorted(100 * t * step / b["bandwidth"] for t, b in zip(turns[peers.OURS_GENAI_RECIPE]["16"], bandwidth))
    assert row["roofline_percent"]["16"] == pytest.approx(shares[1])
    assert "% roofline @16 (middle half)" in paired["table"] and "memory bandwidth" in paired["setup"]
    low, high = min(b["bandwidth"] for b in bandwidth) / 1e9, max(b["bandwidth"] for b in bandwidth) / 1e9
    assert f"@16 {low:.1f}-{high:.1f} GB/s" in paired["setup"]
    # the plot has two panels side by side, the rounds' medians and the turns': twice as wide as one
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 2 * 7 * 120


def test_a_failed_paired_measurement_leaves_the_rounds_and_a_note(peers, tiny_checkpoint, tmp_path, capsys):
    info = {"engine": peers.GENAI, "precision": "int4", "model_bytes": 1000, "weight_bytes_per_token": 500,
            "kv_bytes_per_element": 4}
    run = {"engine": peers.GENAI, "prefill_tokens": 8, "prefill_tokens_per_s": 100.0, "ttft_ms": 80.0,
           "decode_tokens_per_s": {"8": 50.0}, "decode_best_tokens_per_s": {"8": 60.0}, "peak_rss_bytes": 1 << 20,
           "load_s": 0.1}
    fake = tmp_path / "peer-python"  # a peer whose rounds go well and whose paired process dies
    fake.write_text("#!/bin/sh\n"
                    'case "$*" in\n'
                    "  -c*) exit 0 ;;\n"
                    f"  *prepare-genai*) mkdir -p '{tmp_path / 'work' / 'onnxruntime-genai'}'; echo '{json.dumps(info)}' ;;\n"
                    f"  *run-genai*) echo '{json.dumps(run)}' ;;\n"
                    "  *) echo 'paired: out of memory' >&2; kill -KILL $$ ;;\n"
                    "esac\n")
    fake.chmod(0o755)
    out = tmp_path / "result"
    rc = peers.main(["--checkpoint", str(tiny_checkpoint), "--workdir", str(tmp_path / "work"), "--out", str(out),
                     "--peer-python", str(fake), "--contexts", "8", "--table-contexts", "8", "--prefill-tokens", "8",
                     "--decode-tokens", "2", "--rounds", "1", "--threads", "1", "--bandwidth-mib", "8",
                     "--paired-blocks", "2", "--engines", peers.OURS, peers.GENAI])
    assert rc == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["engine"] for r in result["rows"]] == [peers.OURS, peers.GENAI]
    assert result["paired"] is None
    (note,) = result["skipped"]
    assert note.startswith("the paired measurement failed") and "killed by SIGKILL" in note
    assert note in capsys.readouterr().out


def test_paired_turns_are_left_out_when_the_engines_would_not_fit_in_memory_together(
        peers, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """Every engine open in one process needs their memory added up (three 7B models would not
    fit a 24 GiB machine): the rounds' peak RSS says how much, and the run says why it skips."""
    import edge_export.pipeline

    monkeypatch.setattr(edge_export.pipeline, "host_memory_available", lambda: 64 << 20)
    out = tmp_path / "result"
    rc = peers.main(["--checkpoint", str(tiny_checkpoint), "--workdir", str(tmp_path / "work"), "--out", str(out),
                     "--peer-python", str(tmp_path / "no-venv" / "python"), "--contexts", "8",
                     "--table-contexts", "8", "--prefill-tokens", "8", "--decode-tokens", "2", "--rounds", "1",
                     "--threads", "1", "--bandwidth-mib", "8", "--engines", peers.OURS])
    assert rc == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["paired"] is None and [r["engine"] for r in result["rows"]] == [peers.OURS]
    assert int.from_bytes(out.with_suffix(".png").read_bytes()[16:20], "big") == 7 * 120  # the rounds' panel alone
    (note,) = result["skipped"]
    assert note.startswith("the paired measurement is left out") and "0.1 GiB are available" in note
    assert note in capsys.readouterr().out


def test_missing_peers_are_reported(peers, tmp_path, monkeypatch):
    assert peers.peer_missing(sys.executable, peers.OURS, tmp_path / "none.py") is None
    assert "does not exist" in peers.peer_missing(str(tmp_path / "no-python"), peers.GENAI, tmp_path / "none.py")
    monkeypatch.setitem(peers.PEER_MODULES, peers.GENAI, "no_such_module_for_the_peer_test")
    assert "no_such_module_for_the_peer_test is not installed" in peers.peer_missing(
        sys.executable, peers.GENAI, tmp_path / "none.py")
    monkeypatch.setitem(peers.PEER_MODULES, peers.LLAMACPP, "json")  # importable, but no convert script
    assert "convert_hf_to_gguf.py" in peers.peer_missing(sys.executable, peers.LLAMACPP, tmp_path / "none.py")


def test_bandwidth_is_aggregated_over_the_rounds_as_the_speeds_are(peers):
    """One measurement a round; the roofline divides a median speed by the median bandwidth,
    a best speed by the highest."""
    def measure(copy_one, copy_all, read_one, read_all):
        return {"one_thread": copy_one, "threads": 2, "all_threads": copy_all, "bandwidth": max(copy_one, copy_all),
                "read_one_thread": read_one, "read_all_threads": read_all, "read_bandwidth": max(read_one, read_all)}

    measures = [measure(20e9, 28e9, 12e9, 21e9), measure(15e9, 23e9, 13e9, 17e9), measure(18e9, 36e9, 14e9, 19e9)]
    assert peers.merge_bandwidths(measures, "best") == {
        "one_thread": 20e9, "threads": 2, "all_threads": 36e9, "bandwidth": 36e9,
        "read_one_thread": 14e9, "read_all_threads": 21e9, "read_bandwidth": 21e9, "measurements": 3}
    assert peers.merge_bandwidths(measures) == {
        "one_thread": 18e9, "threads": 2, "all_threads": 28e9, "bandwidth": 28e9,
        "read_one_thread": 13e9, "read_all_threads": 19e9, "read_bandwidth": 19e9, "measurements": 3}
    with pytest.raises(ValueError, match="aggregate"):
        peers.merge_bandwidths(measures, "mean")


def test_end_to_end_ours_alone_with_peers_skipped(peers, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "result"
    rc = peers.main(["--checkpoint", str(tiny_checkpoint), "--workdir", str(tmp_path / "work"), "--out", str(out),
                     "--peer-python", str(tmp_path / "no-venv" / "python"), "--contexts", "8", "16",
                     "--table-contexts", "8", "16", "--prefill-tokens", "8", "--decode-tokens", "2",
                     "--rounds", "2", "--threads", "1", "--bandwidth-mib", "8",
                     "--engines", peers.OURS, peers.GENAI, peers.LLAMACPP])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "onnxruntime-genai skipped" in printed and "llama.cpp skipped" in printed
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["engine"] for r in result["rows"]] == [peers.OURS]
    row = result["rows"][0]
    assert set(row["decode_tokens_per_s"]) == {"8", "16"} and row["ours_over_this"] == {"8": 1.0, "16": 1.0}
    assert 0 < row["weight_bytes_per_token"] < row["model_bytes"]  # the embedding table counts one row
    # the profile's lm_head in two passes, named as such
    assert row["precision"] == "int4 b128 asym gptq+mse acc4, lm_head int4, top 32 int8, embedding int8, KV int8"
    assert row["peak_rss_bytes"] > 0 and result["bandwidth"]["bandwidth"] > 0
    assert result["bandwidth"]["read_bandwidth"] > 0 and set(row["read_roofline_percent"]) == {"8", "16"}
    assert "% read roofline @16" in result["table"] and "read bandwidth" in result["setup"]
    measured = result["bandwidth_rounds"]  # one measurement before each round, their median counts
    assert len(measured) == 2 and result["bandwidth"]["measurements"] == 2
    assert result["bandwidth"]["bandwidth"] == pytest.approx(sum(m["bandwidth"] for m in measured) / 2)
    assert result["bandwidth"]["read_bandwidth"] == pytest.approx(sum(m["read_bandwidth"] for m in measured) / 2)
    assert "median of 2, one before each round" in result["setup"]
    assert len(result["rounds"][peers.OURS]) == 2
    assert len(result["skipped"]) == 2
    # the paired turns ran with ours alone (the default 40 turns a context)
    assert [r["engine"] for r in result["paired"]["rows"]] == [peers.OURS]
    assert [len(result["paired"]["turns"][peers.OURS][c]) for c in ("8", "16")] == [40, 40]
    # a second run reuses the prepared bundle (its stamp matches)
    stamp = json.loads((tmp_path / "work" / f"{peers.OURS}.json").read_text())
    assert stamp["info"]["engine"] == peers.OURS


def test_graph_builder_keep_bits_stores_the_kept_lm_head_as_int8(tiny_checkpoint, tmp_path):
    """The profiles' `keep_bits = 8`: keep_unquantized layers as MatMulNBits int8 instead of float."""
    import onnx

    from edge_export.checkpoint import read_checkpoint
    from edge_export.graph_builder import build_decoder_graph

    info = read_checkpoint(tiny_checkpoint)
    nodes = {}
    for name, keep_bits in (("float", None), ("int8", 8)):
        graph = tmp_path / name / "model.onnx"
        build_decoder_graph(info, graph, precision="int4", block_size=32, symmetric=False, accuracy_level=4,
                            keep_unquantized=("lm_head",), max_length=64, keep_bits=keep_bits)
        model = onnx.load(str(graph), load_external_data=False)
        nodes[name] = {n.name: n for n in model.graph.node if n.name.startswith("/lm_head/")}
    assert nodes["float"]["/lm_head/MatMul"].op_type == "MatMul"
    head = nodes["int8"]["/lm_head/MatMul_Q8"]
    assert head.op_type == "MatMulNBits"
    assert {a.name: a.i for a in head.attribute if a.name in ("bits", "block_size")} == {"bits": 8, "block_size": 32}
    with pytest.raises(ValueError, match="keep_bits"):
        build_decoder_graph(info, tmp_path / "bad" / "model.onnx", precision="int4", max_length=64, keep_bits=3)
    # the profiles' keep_block_size: the kept lm_head in blocks of its own, the rest unchanged
    graph = tmp_path / "int8-b128" / "model.onnx"
    build_decoder_graph(info, graph, precision="int4", block_size=32, symmetric=True, accuracy_level=4,
                        keep_unquantized=("lm_head",), max_length=64, keep_bits=8, keep_block_size=128)
    model = onnx.load(str(graph), load_external_data=False)
    blocks = {n.name: {a.name: a.i for a in n.attribute}["block_size"] for n in model.graph.node
              if n.op_type == "MatMulNBits"}
    assert blocks.pop("/lm_head/MatMul_Q8") == 128 and set(blocks.values()) == {32}
    with pytest.raises(ValueError, match="keep_block_size"):
        build_decoder_graph(info, tmp_path / "bad" / "model.onnx", precision="int4", max_length=64, keep_bits=8,
                            keep_block_size=48)


def test_onnxruntime_genai_is_built_with_its_own_int4_options_at_our_block_size(peers, tmp_path):
    """The builder ignores --extra_options keys it does not know (a `block_size=` got its default)."""
    import argparse

    cmd = peers.genai_builder_command(argparse.Namespace(checkpoint="ck", block_size=64), tmp_path / "m",
                                      tmp_path / "c")
    extra = cmd[cmd.index("--extra_options") + 1:]
    assert extra == ["int4_block_size=64", "int4_is_symmetric=true"]
    assert cmd[cmd.index("-p") + 1] == "int4" and cmd[cmd.index("-e") + 1] == "cpu"


def test_the_peers_block_size_defaults_to_our_profiles(peers):
    """The issue compares at the same block size: without --block-size the onnxruntime-genai
    rows take the cpu-x86_64 profile's, which our bundle is exported with."""
    from edge_runtime.profiles import load_profile

    ours = load_profile(peers.PROFILE).quantization.block_size
    assert peers.parse_args([]).block_size == ours == 128
    assert peers.parse_args(["--block-size", "32"]).block_size == 32


def test_a_peer_that_dies_is_reported_and_the_others_still_measured(peers, tiny_checkpoint, tmp_path, capsys):
    """A peer whose process is killed (here by SIGILL, as llama.cpp's AMX kernel is on some
    virtual machines) costs its own row only: the run goes on, prints and saves the others, and
    says which engine failed, when, and why."""
    convert = tmp_path / "convert_hf_to_gguf.py"
    convert.write_text("")
    info = {"engine": peers.LLAMACPP, "precision": "Q4_0", "model_bytes": 1000, "weight_bytes_per_token": 500,
            "kv_bytes_per_element": 2}
    fake = tmp_path / "peer-python"  # imports succeed, the model is 'prepared', every run dies of SIGILL
    fake.write_text("#!/bin/sh\n"
                    'case "$*" in\n'
                    "  -c*) exit 0 ;;\n"
                    f"  *prepare-llamacpp*) mkdir -p '{tmp_path / 'work' / 'llama.cpp'}'; echo '{json.dumps(info)}' ;;\n"
                    "  *prepare-genai*) echo 'builder: out of memory' >&2; exit 3 ;;\n"
                    "  *) echo 'ggml_backend_amx_mul_mat' >&2; kill -ILL $$ ;;\n"
                    "esac\n")
    fake.chmod(0o755)
    out = tmp_path / "result"
    rc = peers.main(["--checkpoint", str(tiny_checkpoint), "--workdir", str(tmp_path / "work"), "--out", str(out),
                     "--peer-python", str(fake), "--convert-script", str(convert), "--contexts", "8",
                     "--table-contexts", "8", "--prefill-tokens", "8", "--decode-tokens", "2",
                     "--rounds", "2", "--threads", "1", "--bandwidth-mib", "8",
                     "--engines", peers.OURS, peers.GENAI, peers.LLAMACPP])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["engine"] for r in result["rows"]] == [peers.OURS]
    assert len(result["rounds"][peers.OURS]) == 2 and peers.LLAMACPP not in result["rounds"]
    genai_note, llamacpp_note = result["skipped"]
    assert genai_note.startswith("onnxruntime-genai failed preparing its model") and "exit status 3" in genai_note
    assert "builder: out of memory" in genai_note
    assert llamacpp_note.startswith("llama.cpp failed in round 1") and "killed by SIGILL" in llamacpp_note
    assert "LLAMA_CPP_NO_AMX=1 bash scripts/install-peers.sh" in llamacpp_note
    assert genai_note in printed and llamacpp_note in printed


def test_bench_flags_that_peers_would_ignore_are_refused(capsys):
    from edge_runtime.cli import main

    assert main(["bench", "--bundle", "b", "--context", "128", "--peers", "--rounds", "1"]) == 2
    assert "--bundle, --context would be ignored with --peers" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be at least 1, got 0"),
    (["--decode-tokens", "0"], "--decode-tokens must be at least 1, got 0"),
    (["--paired-steps", "0"], "--paired-steps must be at least 1, got 0"),
    (["--contexts", "16", "--table-contexts", "128"], "--table-contexts 128: not among --contexts 16"),
])
def test_bad_counts_are_usage_errors_before_any_work(peers, argv, message, capsys):
    """`--rounds 0` ran the whole preparation and ended in a StatisticsError traceback; contexts
    outside --table-contexts' default gave tables without a decode column."""
    with pytest.raises(SystemExit) as exc:
        peers.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_table_contexts_default_to_the_measured_ones(peers):
    assert peers.parse_args([]).table_contexts == [128, 2048]
    assert peers.parse_args(["--contexts", "128", "512", "2048"]).table_contexts == [128, 2048]
    assert peers.parse_args(["--contexts", "16", "64"]).table_contexts == [16, 64]
