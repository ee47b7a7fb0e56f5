"""The scripts under benchmarks/ answer a missing bundle or checkpoint as the edge-runtime
commands do: one line `error: ...`, exit 2, no traceback (they printed Python's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script, flag", [
    ("op_profile", "--bundle"), ("prompt_cache", "--bundle"), ("huge_pages", "--bundle"),
    ("mqtt_overhead", "--bundle"), ("int8_follow_up", "--bundle"), ("prompt_lookup", "--bundle"),
    ("int4_recipes", "--checkpoint"), ("long_chat", "--bundle"),
])
def test_a_missing_bundle_or_checkpoint_is_one_error_line(script, flag, tmp_path):
    missing = tmp_path / "nowhere"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), flag, str(missing)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and f"{missing}" in run.stderr.splitlines()[-1], run.stderr
    assert run.stderr.splitlines()[-1].startswith("error: ")
