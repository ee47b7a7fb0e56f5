"""Reliability suite (issue #7): faults, floods and hostile input against real
Mosquitto and real daemon processes. See docs/reliability.md.

Tests marked `long` (20 kills, 10 000 payloads, ...) are skipped in the default
run and run by `bash scripts/reliability.sh` (``pytest -m long tests/reliability``).
Sizes come from environment variables so the same test runs quick in CI and long
from the script; measured figures go to $EDGE_RELIABILITY_FIGURES when set.
"""

from __future__ import annotations

import os

import pytest

import reliability_kit  # noqa: F401  (puts tests/ and tests/service on sys.path)


def _long_selected(config) -> bool:
    return "long" in (config.option.markexpr or "") and "not long" not in (config.option.markexpr or "")


def pytest_collection_modifyitems(config, items):
    if _long_selected(config) or os.environ.get("EDGE_RELIABILITY_LONG") == "1":
        return
    skip = pytest.mark.skip(reason="long reliability run: bash scripts/reliability.sh (pytest -m long)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)

