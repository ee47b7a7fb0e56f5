"""benchmarks/op_profile.py on the tiny bundle: the decode steps' kernel time split by
operator, and the weights' nodes by projection with the bytes they read, printed and
written as JSON."""

from __future__ import annotations

import json

import pytest


def test_profiles_decode_steps_by_operator(op_profile, tiny_checkpoint, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "ops.json"
    assert op_profile.main(["--bundle", str(tiny_bundle), "--contexts", "8", "20", "--steps", "3", "--threads", "1",
                            "--bandwidth-mib", "16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    bandwidth = result["bandwidth"]  # bytes/s: any machine copies and reads 100 MB/s
    assert bandwidth["bandwidth"] > 1e8 and bandwidth["read_bandwidth"] > 1e8
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert [r["context"] for r in rows] == [8, 20] and all(r["steps"] == 3 for r in rows)
    for r in rows:
        ops = {o["op"]: o for o in r["ops"]}
        # the fused fp32 graph: attention in one node per layer, float projections
        assert {"GroupQueryAttention", "MatMul"} <= set(ops)
        assert sum(o["share"] for o in r["ops"]) == pytest.approx(1.0, abs=0.01)
        assert r["step_ms"] > 0 and r["kernels_ms"] > 0 and r["prefill_ms"] > 0
        assert "GroupQueryAttention" in {o["op"] for o in r["prefill_ops"]}
        assert sum(o["share"] for o in r["prefill_ops"]) == pytest.approx(1.0, abs=0.01)
        weights = {w["weight"]: w for w in r["weights"]}
        # every projection of the checkpoint, float32 [K, N], bytes from the architecture
        h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
        kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
        expected = {"qkv_proj": h * (h + 2 * kv), "o_proj": h * h, "gate_proj": h * inter, "up_proj": h * inter,
                    "down_proj": inter * h}
        for name, params in expected.items():
            assert weights[name]["nodes"] == layers
            assert weights[name]["mib"] == pytest.approx(layers * params * 4 / 2**20, abs=0.01)
        assert weights["lm_head"]["nodes"] == 1
        assert weights["lm_head"]["mib"] == pytest.approx(h * config["vocab_size"] * 4 / 2**20, abs=0.01)
        assert weights["all"]["nodes"] == 5 * layers + 1
        assert weights["all"]["ms_per_step"] == pytest.approx(ops["MatMul"]["ms_per_step"], abs=0.005)
        assert all(w["gb_per_s"] > 0 for w in r["weights"])
    printed = capsys.readouterr().out
    assert "| GroupQueryAttention |" in printed and "context 20, 1 threads" in printed
    assert f"| down_proj | {config['num_hidden_layers']} |" in printed
    assert "memory bandwidth: copy " in printed and "| GB/s | of copy bandwidth | of read bandwidth |" in printed
    all_rows = [line for line in printed.splitlines() if line.startswith("| all |")]
    rate = weights["all"]["gb_per_s"] * 1e9  # the last context's, printed last
    assert len(all_rows) == 2 and all_rows[-1].endswith(f" {100 * rate / bandwidth['bandwidth']:.0f} % | "
                                                        f"{100 * rate / bandwidth['read_bandwidth']:.0f} % |")
    assert "prefill of 20 tokens" in printed


def test_rejects_a_non_positive_step_count(op_profile, tiny_bundle):
    with pytest.raises(SystemExit):
        op_profile.main(["--bundle", str(tiny_bundle), "--steps", "0"])


def test_bandwidth_zero_skips_the_measure(op_profile, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "ops.json"
    assert op_profile.main(["--bundle", str(tiny_bundle), "--contexts", "8", "--steps", "1", "--threads", "1",
                            "--bandwidth-mib", "0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["bandwidth"] is None
    printed = capsys.readouterr().out
    assert "memory bandwidth" not in printed and "| GB/s |\n|---|---|---|---|---|\n" in printed


def test_an_if_counts_its_branch_nodes_under_their_types_and_its_own_time_apart(op_profile):
    """An int8-cache graph's If spans its branch's node events: those count under their own
    types, the If only what it spans beyond them ("If (own)"), in the prefill or the decode
    steps by when it ran; weight nodes are counted in the decode steps only."""
    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [node("l0/qkv_Q4", "MatMulNBits", 0, 50), node("l0/If", "If", 60, 40),
              node("l0/int8", "GroupQueryAttention", 65, 30),  # inside the prefill's If
              node("l0/qkv_Q4", "MatMulNBits", 1000, 20), node("l0/If", "If", 1030, 25),
              node("l0/int8", "GroupQueryAttention", 1035, 12), node("l0/Add", "Add", 1060, 3),
              {"cat": "Session", "name": "model_run", "ts": 1000, "dur": 70}]
    decode, prefill, weights = op_profile.op_times(events, first_step=1000)
    assert dict(prefill) == {"MatMulNBits": 50, "GroupQueryAttention": 30, "If (own)": 10}
    assert dict(decode) == {"MatMulNBits": 20, "GroupQueryAttention": 12, "If (own)": 13, "Add": 3}
    assert dict(weights) == {"l0/qkv_Q4": 20}
