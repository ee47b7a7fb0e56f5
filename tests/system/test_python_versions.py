"""The Pythons this project runs on: pyproject.toml's requires-python floor (3.10: JetPack 6 and
Ubuntu 22.04 on the Jetson boards and PCs the device side targets) up to 3.13 (Debian 13)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from edge_runtime.providers import cpu_onnxruntime_requirement, int8_kv_python_note
from edge_runtime.typed_toml import parse_toml

ROOT = Path(__file__).resolve().parents[2]
# The newest onnxruntime on PyPI for each Python (`pip index versions onnxruntime` run by each,
# 2026-12-03): from 1.24 on it is built for Python 3.11 and newer.
NEWEST_ONNXRUNTIME = {"3.10": "1.23.2", "3.11": "1.32.0", "3.12": "1.32.0", "3.13": "1.32.0"}


def pyproject() -> dict:
    return parse_toml((ROOT / "pyproject.toml").read_text(encoding="utf-8"), source="pyproject.toml")


def floor() -> str:
    """requires-python's floor, e.g. "3.10" of ">=3.10"."""
    match = re.fullmatch(r">=\s*(3\.\d+)", pyproject()["project"]["requires-python"])
    assert match, "requires-python is no longer of the form >=3.X: update this test"
    return match.group(1)


@pytest.mark.parametrize("python", sorted(NEWEST_ONNXRUNTIME))
def test_the_cpu_extra_installs_on_every_supported_python(python):
    """`pip install '.[cpu]'` on Python 3.10 found no onnxruntime >= 1.32 (built for 3.11+ only)
    and installed nothing."""
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(python)
    environment = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0"}
    wanted = [r for r in map(Requirement, pyproject()["project"]["optional-dependencies"]["cpu"])
              if r.marker is None or r.marker.evaluate(environment)]
    assert [r.name for r in wanted] == ["onnxruntime"]
    assert wanted[0].specifier.contains(NEWEST_ONNXRUNTIME[python]), (python, str(wanted[0]))
    # the install hints (a missing onnxruntime, `profiles --detect`) name the same requirement
    assert f"{wanted[0].name}{wanted[0].specifier}" == cpu_onnxruntime_requirement(tuple(map(int, python.split("."))))


def test_the_floor_is_a_python_the_tests_know():
    assert floor() in NEWEST_ONNXRUNTIME


def test_an_int8_kv_cache_on_python_3_10_says_how_to_run_it():
    note = int8_kv_python_note((3, 10))
    assert "Python 3.11 and newer" in note and "this is Python 3.10" in note and "--kv-cache-bits 0" in note
    assert int8_kv_python_note((3, 11)) == "" and int8_kv_python_note((3, 13)) == ""
