"""benchmarks/int8_follow_up.py (README, "The prompt cache") on the demo model's int4 bundle with
its int8 KV cache: both paths of a follow-up after cached rows run and are tabled. Since graph
revision 5 the graph's metadata records the int8 kernel's share and the decoder binds a run's
outputs by it, so the benchmark's copies of the graph must change both."""

from __future__ import annotations


def test_times_both_paths_of_a_follow_up(int8_follow_up, demo_int4_bundle, capsys):
    assert int8_follow_up.main(["--bundle", str(demo_int4_bundle), "--past", "16", "--new", "2", "40",
                                "--threads", "1", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "| P | S | float branch | int8 kernel | faster |"
    rows = [line.split(" | ") for line in lines[3:]]
    assert [(r[0], r[1]) for r in rows] == [("| 16", "2"), ("| 16", "40")]
    assert all(r[2].endswith(" ms") and r[3].endswith(" ms") for r in rows)
