"""The repository paths the docs name exist: a path in backticks that starts at one of this
repository's top folders (`export/family.py`, `benchmarks/int8_follow_up.py`, a test's
`tests/...::name`), the script of a backticked `python X.py ...` / `bash X.sh ...` command, and
every relative Markdown link. README named `edge_export/family.py`, the import name's path,
which no checkout has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = ("export/", "edge_runtime/", "benchmarks/", "scripts/", "deploy/", "docs/", "systemd/", "tests/",
       "device_profiles/", "edge_export/")
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")), "systemd/README.md"]


@pytest.mark.parametrize("doc", DOCS)
def test_paths_named_in_the_docs_exist(doc):
    path = ROOT / doc
    text = path.read_text(encoding="utf-8")
    named = [m.group(1) for m in re.finditer(r"`(?:python3? |bash )?([A-Za-z0-9_./-]+)(?:::[^`]*|\s[^`]*)?`", text)]
    named = [p.rstrip("/") for p in named if p.startswith(TOP)]
    links = [m.group(1).split("#")[0] for m in re.finditer(r"\]\(([^)\s]+)\)", text)]
    links = [p for p in links if p and "://" not in p]
    missing = [p for p in named if not (ROOT / p).exists()]
    missing += [p for p in links if not (path.parent / p).exists()]
    assert not missing, f"{doc} names paths that do not exist: {missing}"
