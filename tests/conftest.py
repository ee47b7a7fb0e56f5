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


# -- checkpoints and bundles, built once per test session ---------------------------------------
def export_bundle(checkpoint: Path, output: Path, precision: str = "fp32", profile: str = "cpu-x86_64",
                  **kwargs) -> Path:
    """The real export pipeline, quietly."""
    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress

    run_export(ExportOptions(checkpoint=checkpoint, profile=profile, output=output, precision=precision, **kwargs),
               Progress(5, enabled=False))
    return output


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight Code Llama-shaped checkpoint: GQA (4 heads, 2 kv heads), real tokenizer with infill."""
    from edge_export.synthetic import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-codellama", hidden_size=64,
                            intermediate_size=172, num_layers=2, num_heads=4, num_kv_heads=2, seed=1234)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundle") / "tiny-fp32")


@pytest.fixture(scope="session")
def noinfill_checkpoint(tmp_path_factory) -> Path:
    """Shaped like Code Llama 34B / Python: Llama 2 tokenizer without infilling tokens, 8 kv heads."""
    from edge_export.synthetic import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-noinfill", hidden_size=128,
                            intermediate_size=256, num_layers=2, num_heads=16, num_kv_heads=8, vocab="no-infill",
                            seed=7)


@pytest.fixture(scope="session")
def noinfill_bundle(noinfill_checkpoint, tmp_path_factory) -> Path:
    return export_bundle(noinfill_checkpoint, tmp_path_factory.mktemp("bundle") / "noinfill-fp32")


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The small trained demo model (trained once, then cached outside the repo)."""
    from edge_export.demo_model import ensure_demo_model

    return ensure_demo_model(progress=False)


def _cuda_available() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where onnxruntime-gpu sees a GPU (the lent GPU machine)."""
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs onnxruntime-gpu with a CUDA device (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
