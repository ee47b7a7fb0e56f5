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


def benchmark_fixture(name: str):
    """A module-scoped fixture giving benchmarks/<name>.py."""
    return pytest.fixture(scope="module")(lambda: load_benchmark(name))


# fixture name -> the benchmark script it loads
peers = benchmark_fixture("peers")
recipes = benchmark_fixture("int4_recipes")
op_profile = benchmark_fixture("op_profile")
export_bench = benchmark_fixture("export_bench")
gpu_decode = benchmark_fixture("gpu_decode")
gpu_kernels = benchmark_fixture("gpu_kernels")
lookup_bench = benchmark_fixture("prompt_lookup")
huge_pages = benchmark_fixture("huge_pages")
int8_follow_up = benchmark_fixture("int8_follow_up")
