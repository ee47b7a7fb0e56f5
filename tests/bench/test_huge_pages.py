"""benchmarks/huge_pages.py on the tiny bundle: decode blocks before and after moving the large
anonymous mappings into huge pages, in one process, and the control without the move."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("control", [False, True])
def test_times_decode_blocks_before_and_after_the_collapse(huge_pages, tiny_bundle, tmp_path, capsys, control):
    out = tmp_path / "huge.json"
    argv = ["--bundle", str(tiny_bundle), "--threads", "1", "--context", "8", "--steps", "3", "--blocks", "2",
            "--json", str(out)] + (["--control"] if control else [])
    assert huge_pages.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == ("control" if control else "collapse")
    assert len(result["before_tokens_per_s"]) == len(result["after_tokens_per_s"]) == 2
    assert all(x > 0 for x in result["before_tokens_per_s"] + result["after_tokens_per_s"])
    assert result["after_over_before"] > 0
    if control:
        assert result["collapsed_mib"] == 0
    assert result["collapsed_mib"] >= 0 and result["anon_huge_mib_after"] >= 0
    assert f"{result['mode']}: {result['collapsed_mib']} MiB collapsed" in capsys.readouterr().out
