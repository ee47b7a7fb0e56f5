"""Fixtures for the benchmark scripts' tests: each script is loaded from benchmarks/ as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_benchmark(name: str):
    """benchmarks/<name>.py as the module ``bench_<name>``."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peers():
    return load_benchmark("peers")


@pytest.fixture(scope="module")
def recipes():
    return load_benchmark("int4_recipes")


@pytest.fixture(scope="module")
def op_profile():
    return load_benchmark("op_profile")


@pytest.fixture(scope="module")
def export_bench():
    return load_benchmark("export_bench")


@pytest.fixture(scope="module")
def gpu_decode():
    return load_benchmark("gpu_decode")


@pytest.fixture(scope="module")
def gpu_kernels():
    return load_benchmark("gpu_kernels")
