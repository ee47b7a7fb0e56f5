"""The Pythons this project runs on: pyproject.toml's requires-python floor (3.10: JetPack 6 and
Ubuntu 22.04 on the Jetson boards and PCs the device side targets) up to 3.13 (Debian 13). CI runs
one Python (3.11), so these tests keep the floor honest there: vermin (a well-kept tool that
knows which Python each stdlib module, member and syntax needs) checks every Python file against
the floor, and a scan finds the calls whose accepted input widened in 3.11, which no such tool
sees. docs/deployment.md, "Python versions", says how the other versions are tested."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from edge_runtime.providers import cpu_onnxruntime_requirement, int8_kv_python_note
from edge_runtime.typed_toml import parse_toml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("edge_runtime", "export", "systemd", "device_profiles")  # what pyproject.toml installs
PYTHON_DIRS = (*PACKAGES, "tests", "scripts", "benchmarks")
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


def vermin(*paths: Path | str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """vermin's violations of the floor in `paths` (exit status 1 when there are any)."""
    return subprocess.run([sys.executable, "-c", "import sys; from vermin import main; sys.exit(main())",
                           "--no-tips", "--violations", "--eval-annotations", f"-t={floor()}-", *map(str, paths)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_every_python_file_runs_on_the_floor_python():
    done = vermin(*PYTHON_DIRS)
    assert done.returncode == 0, (f"code that Python {floor()} (requires-python) cannot run; guard it with "
                                  f"sys.version_info, or raise the floor:\n{done.stdout}{done.stderr}")


# What Python 3.10 lacks and a change could bring in (this project's CI runs 3.11); the last
# two are imports as the project writes them, which 3.10 can run.
NEWER_THAN_3_10 = {
    "tomllib_unguarded": "import tomllib\n",
    "datetime_utc": "import datetime\nprint(datetime.UTC)\n",
    "datetime_utc_from": "from datetime import UTC\n",
    "typing_self": "from typing import Self\n",
    "strenum": "from enum import StrEnum\n",
    "except_star": "try:\n    pass\nexcept* ValueError:\n    pass\n",
    "exception_group": "raise ExceptionGroup('x', [ValueError()])\n",
    "task_group": "import asyncio\nasyncio.TaskGroup()\n",
    "asyncio_timeout": "import asyncio\nasyncio.timeout(1)\n",
    "file_digest": "import hashlib\nhashlib.file_digest(open(__file__, 'rb'), 'sha256')\n",
    "batched": "import itertools\nitertools.batched([1, 2, 3], 2)\n",
    "contextlib_chdir": "import contextlib\ncontextlib.chdir('.')\n",
}
RUNS_ON_3_10 = {
    "tomllib_guarded": ("import sys\nif sys.version_info >= (3, 11):\n    import tomllib\nelse:\n"
                        "    import tomli as tomllib\n"),
    "type_checking_only": ("import sys\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                           "    from importlib.resources.abc import Traversable  # novermin: the type checker's\n"),
}


def test_the_floor_check_catches_what_python_3_10_lacks(tmp_path):
    for name, code in {**NEWER_THAN_3_10, **RUNS_ON_3_10}.items():
        (tmp_path / f"{name}.py").write_text(code, encoding="utf-8")
    done = vermin(tmp_path, cwd=tmp_path)
    flagged = {Path(m).stem for m in re.findall(r"(\S+\.py)", done.stdout)}
    assert done.returncode == 1
    assert flagged == set(NEWER_THAN_3_10), done.stdout


# Calls that exist on 3.10 but read less there than on 3.11+ (so vermin passes them), each with
# what to use instead.
READ_LESS_BEFORE_3_11 = {
    "fromisoformat": "3.10 reads only isoformat()'s own forms (no +0100, no 9-digit fraction, no "
                     "20261203T100000Z): parse with a regular expression (edge_runtime.audit._iso_time)",
    "add_note": "BaseException.add_note is 3.11+: put the note in the message",
}


def calls_that_read_less_before_3_11(source: str, filename: str) -> list[str]:
    nodes = [node for node in ast.walk(ast.parse(source, filename))
             if isinstance(node, ast.Attribute) and node.attr in READ_LESS_BEFORE_3_11]
    return [f"{filename}:{node.lineno}: .{node.attr}: {READ_LESS_BEFORE_3_11[node.attr]}"
            for node in sorted(nodes, key=lambda node: (node.lineno, node.col_offset))]


def test_no_call_that_reads_less_on_python_3_10():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found += calls_that_read_less_before_3_11(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "\n".join(found)


def test_the_scan_finds_fromisoformat_in_any_spelling():
    code = ("from datetime import datetime, date\nimport datetime as dt\n"
            "datetime.fromisoformat(x)\ndt.datetime.fromisoformat(x)\nf = date.fromisoformat\n")
    assert [line.split(":")[1] for line in calls_that_read_less_before_3_11(code, "m.py")] == ["3", "4", "5"]


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
    assert "Python 3.11 and newer" in note and "this is Python 3.10" in note and "newest onnxruntime is 1.23" in note
    assert int8_kv_python_note((3, 11)) == "" and int8_kv_python_note((3, 13)) == ""
