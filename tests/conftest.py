"""Shared fixtures. Tests mirror the flow: tests/export, tests/engine,
tests/service (real Mosquitto), tests/system (real processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mosquitto_broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_JSON = REPO / "export" / "assets" / "codellama-tokenizer.json"


@pytest.fixture
def broker(tmp_path):
    """A fresh anonymous Mosquitto on a free loopback port, stopped afterwards."""
    b = MosquittoBroker(tmp_path / "broker").start()
    yield b
    b.stop()
