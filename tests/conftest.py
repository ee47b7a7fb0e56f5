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
def exporter():
    """`export_bundle` for test modules (a `from conftest import` would be ambiguous:
    tests/reliability has a conftest module of its own)."""
    return export_bundle


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


# A chat the 70B-style checkpoint below is rigged to answer with `<step>` as its STEP_AT-th token.
STEP_DIALOG = (("system", "Answer briefly."), ("user", "Write a function that reverses a list."))
STEP_AT = 3


def _rig_step_token(checkpoint: Path, prompt_ids: list[int], step_id: int, at: int) -> int:
    """Swap lm_head rows so that greedy decoding of `prompt_ids` samples `step_id` as its
    `at`-th new token (the token it made there before, if new, trades places with <step>).
    Returns how many tokens precede <step>."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    seq, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(at + 24):
            out.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(out[-1])
    index = next(i for i in range(at, len(out)) if out[i] not in out[:i] and out[i] not in (2, step_id))
    path = checkpoint / "model.safetensors"
    tensors = load_file(str(path))
    head = tensors["lm_head.weight"]
    head[[out[index], step_id]] = head[[step_id, out[index]]].clone()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return index


@pytest.fixture(scope="session")
def rig_greedy_token():
    """`_rig_step_token` for test modules: make greedy decoding of a prompt sample a given id."""
    return _rig_step_token


@pytest.fixture(scope="session")
def step_checkpoint(tmp_path_factory) -> Path:
    """Shaped like Code Llama 70B Instruct: its chat template (Source:/<step>), a tokenizer with
    <step>, GQA with 8 key/value heads (16 heads), folder named as the published one; rigged so
    that greedy chat on STEP_DIALOG emits <step> after a few tokens."""
    from edge_export.synthetic import SOURCE_STEP_CHAT_TEMPLATE, build_checkpoint
    from edge_runtime.prompts import build_prompt
    from edge_runtime.tokenizer import CodeLlamaTokenizer
    from edge_runtime.types import GenerationRequest, Message

    path = build_checkpoint(tmp_path_factory.mktemp("ckpt") / "CodeLlama-70b-Instruct-hf", hidden_size=256,
                            intermediate_size=344, num_layers=2, num_heads=16, num_kv_heads=8, vocab="step",
                            chat_template=SOURCE_STEP_CHAT_TEMPLATE, seed=71)
    tok = CodeLlamaTokenizer.from_file(path / "tokenizer.json")
    request = GenerationRequest(mode="chat", messages=tuple(Message(r, c) for r, c in STEP_DIALOG))
    _rig_step_token(path, build_prompt(request, tok, "source-step").ids, tok.step_id, STEP_AT)
    return path


@pytest.fixture(scope="session")
def step_dialog() -> tuple[tuple[tuple[str, str], ...], int]:
    """(STEP_DIALOG, STEP_AT) for tests (a module named conftest may be another folder's)."""
    return STEP_DIALOG, STEP_AT


@pytest.fixture(scope="session")
def step_bundle(step_checkpoint, tmp_path_factory) -> Path:
    return export_bundle(step_checkpoint, tmp_path_factory.mktemp("bundle") / "codellama-70b-instruct-fp32")


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The small trained demo model (trained once, then cached outside the repo)."""
    from edge_export.demo_model import ensure_demo_model

    return ensure_demo_model(progress=False)


@pytest.fixture(scope="session")
def demo_int4_bundle(demo_checkpoint, tmp_path_factory) -> Path:
    """The demo model as the CPU profile exports it (int4, int8 KV cache), fidelity skipped:
    for tests that compare two runs of the same bundle."""
    return export_bundle(demo_checkpoint, tmp_path_factory.mktemp("bundle") / "demo-int4", precision="int4",
                         skip_fidelity=True)


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
