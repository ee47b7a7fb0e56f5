"""benchmarks/op_profile.py on the tiny bundle: the decode steps' kernel time split by
operator, printed and written as JSON."""

from __future__ import annotations

import json

import pytest


def test_profiles_decode_steps_by_operator(op_profile, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "ops.json"
    assert op_profile.main(["--bundle", str(tiny_bundle), "--contexts", "8", "20", "--steps", "3", "--threads", "1",
                            "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["context"] for r in rows] == [8, 20] and all(r["steps"] == 3 for r in rows)
    for r in rows:
        ops = {o["op"]: o for o in r["ops"]}
        # the fused fp32 graph: attention in one node per layer, float projections
        assert {"GroupQueryAttention", "MatMul"} <= set(ops)
        assert sum(o["share"] for o in r["ops"]) == pytest.approx(1.0, abs=0.01)
        assert r["step_ms"] > 0 and r["kernels_ms"] > 0 and r["prefill_ms"] > 0
        assert "GroupQueryAttention" in {o["op"] for o in r["prefill_ops"]}
        assert sum(o["share"] for o in r["prefill_ops"]) == pytest.approx(1.0, abs=0.01)
    printed = capsys.readouterr().out
    assert "| GroupQueryAttention |" in printed and "context 20, 1 threads" in printed
    assert "prefill of 20 tokens" in printed


def test_rejects_a_non_positive_step_count(op_profile, tiny_bundle):
    with pytest.raises(SystemExit):
        op_profile.main(["--bundle", str(tiny_bundle), "--steps", "0"])
