"""Family detection at export (export/family.py) on checkpoint folders shaped like
each published Code Llama: the real config shapes and tokenizers, chat templates
as the checkpoints carry them. Detection reads only config, tokenizer and file
names, so the weights here are an empty placeholder file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from edge_export.checkpoint import read_checkpoint
from edge_export.synthetic import (
    LLAMA2_CHAT_TEMPLATE,
    SOURCE_STEP_CHAT_TEMPLATE,
    llama_config,
    tokenizer_json,
    tokenizer_vocab_size,
    write_checkpoint_files,
)
from edge_runtime.errors import BadRequest
from edge_runtime.memory_fit import CODE_LLAMA_SHAPES

TEMPLATES = {None: None, "llama2": LLAMA2_CHAT_TEMPLATE, "source-step": SOURCE_STEP_CHAT_TEMPLATE}


def make_folder(root: Path, name: str, size: str, vocab: str, template: str | None = None, *,
                generation_eos: int | None = None, name_or_path: str | None = None) -> Path:
    s = CODE_LLAMA_SHAPES[size]
    config = llama_config(vocab_size=tokenizer_vocab_size(tokenizer_json(vocab)), hidden_size=s.hidden_size,
                          intermediate_size=s.intermediate_size, num_layers=s.num_layers, num_heads=s.num_heads,
                          num_kv_heads=s.num_kv_heads, max_position_embeddings=16384, rope_theta=1e6)
    folder = root / name
    write_checkpoint_files(folder, config, vocab=vocab, dtype="bfloat16", chat_template=TEMPLATES[template])
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")  # no tensors
    if generation_eos is not None:
        gen = json.loads((folder / "generation_config.json").read_text())
        gen["eos_token_id"] = generation_eos
        (folder / "generation_config.json").write_text(json.dumps(gen))
    if name_or_path is not None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["_name_or_path"] = name_or_path
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# name, shape, tokenizer, template -> size, variant, infill served, chat format, kv heads
MEMBERS = [
    ("CodeLlama-7b-hf", "7B", "infill", None, "base", True, "llama2"),
    ("CodeLlama-7b-Python-hf", "7B", "no-infill", None, "python", False, "llama2"),
    ("CodeLlama-7b-Instruct-hf", "7B", "infill", "llama2", "instruct", True, "llama2"),
    ("CodeLlama-13b-hf", "13B", "infill", None, "base", True, "llama2"),
    ("CodeLlama-13b-Python-hf", "13B", "no-infill", None, "python", False, "llama2"),
    ("CodeLlama-13b-Instruct-hf", "13B", "infill", "llama2", "instruct", True, "llama2"),
    ("CodeLlama-34b-hf", "34B", "no-infill", None, "base", False, "llama2"),
    ("CodeLlama-34b-Python-hf", "34B", "no-infill", None, "python", False, "llama2"),
    ("CodeLlama-34b-Instruct-hf", "34B", "no-infill", "llama2", "instruct", False, "llama2"),
    ("CodeLlama-70b-hf", "70B", "infill", None, "base", False, "llama2"),
    ("CodeLlama-70b-Python-hf", "70B", "infill", None, "python", False, "llama2"),
    ("CodeLlama-70b-Instruct-hf", "70B", "step", "source-step", "instruct", False, "source-step"),
]


@pytest.mark.parametrize("name,size,vocab,template,variant,infill,chat", MEMBERS, ids=[m[0] for m in MEMBERS])
def test_each_member_is_detected(tmp_path, name, size, vocab, template, variant, infill, chat):
    info = read_checkpoint(make_folder(tmp_path, name, size, vocab, template))
    fam = info.family
    shape = CODE_LLAMA_SHAPES[size]
    assert fam.size_class == size
    assert abs(fam.parameter_count - {"7B": 6.74e9, "13B": 13.0e9, "34B": 33.7e9, "70B": 69.0e9}[size]) < 0.05e9
    assert fam.variant == variant and fam.variant_source == f"folder name {name!r}"
    assert (fam.num_heads, fam.num_kv_heads) == (shape.num_heads, shape.num_kv_heads)
    assert fam.attention == ("GQA" if size in ("34B", "70B") else "MHA")
    assert fam.infill_tokens == (vocab != "no-infill")
    assert fam.supports_infill is infill and info.supports_infill is infill
    assert (fam.infill_note == "") is infill
    assert fam.chat_format == info.chat_format == chat
    assert fam.chat_format_source == ("chat template" if template else "default")
    assert fam.step_token == (vocab == "step")


def test_infill_notes_say_why(tmp_path):
    python = read_checkpoint(make_folder(tmp_path, "CodeLlama-7b-Python-hf", "7B", "no-infill")).family
    assert "lacks" in python.infill_note and "<PRE>" in python.infill_note
    big = read_checkpoint(make_folder(tmp_path, "CodeLlama-70b-hf", "70B", "infill")).family
    assert big.infill_tokens and "70B was not trained for infilling" in big.infill_note
    forced = read_checkpoint(make_folder(tmp_path, "CodeLlama-7b-hf", "7B", "infill"), variant="python").family
    assert forced.infill_tokens and not forced.supports_infill and "Python" in forced.infill_note


def test_variant_override(tmp_path):
    folder = make_folder(tmp_path, "CodeLlama-7b-Instruct-hf", "7B", "infill", "llama2")
    fam = read_checkpoint(folder, variant="base").family
    assert (fam.variant, fam.variant_source) == ("base", "--variant")
    with pytest.raises(BadRequest, match="--variant 'chat'"):
        read_checkpoint(folder, variant="chat")


def test_variant_from_config_name_when_the_folder_says_nothing(tmp_path):
    folder = make_folder(tmp_path, "snapshot-0123", "13B", "no-infill",
                         name_or_path="/models/codellama/CodeLlama-13b-Python-hf/")
    fam = read_checkpoint(folder).family
    assert fam.variant == "python" and fam.variant_source == "config.json _name_or_path 'CodeLlama-13b-Python-hf'"


def test_variant_from_the_hugging_face_cache_folder(tmp_path):
    # a 34B Python snapshot: no infilling tokens in any 34B, no template, and a hash for a folder name
    snapshots = tmp_path / "models--codellama--CodeLlama-34b-Python-hf" / "snapshots"
    snapshots.mkdir(parents=True)
    folder = make_folder(snapshots, "8b4d7d8ab1b3a1a0d4b6e5b1c2a3f4e5d6c7b8a9", "34B", "no-infill")
    info = read_checkpoint(folder)
    assert info.name == "CodeLlama-34b-Python-hf"
    assert (info.family.variant, info.family.variant_source) == ("python", "folder name 'CodeLlama-34b-Python-hf'")


def test_variant_from_tokens_and_template_without_names(tmp_path):
    # 7B without the infilling tokens: only the Python variant ships like that
    fam = read_checkpoint(make_folder(tmp_path, "finetune-a", "7B", "no-infill")).family
    assert fam.variant == "python" and "without the infilling tokens" in fam.variant_source
    fam = read_checkpoint(make_folder(tmp_path, "finetune-b", "7B", "infill", "llama2")).family
    assert fam.variant == "instruct" and fam.variant_source == "chat template in the checkpoint"
    fam = read_checkpoint(make_folder(tmp_path, "finetune-c", "7B", "infill")).family
    assert fam.variant == "base" and fam.variant_source.startswith("default")


def test_source_step_from_generation_config(tmp_path):
    """A 70B Instruct folder without its template still says <step> ends a turn (eos)."""
    folder = make_folder(tmp_path, "model", "70B", "step", generation_eos=[2, 32015])
    fam = read_checkpoint(folder).family
    assert (fam.chat_format, fam.chat_format_source) == ("source-step", "generation config")
    assert fam.size_class == "70B" and fam.step_token


def test_small_shapes_are_custom(tmp_path):
    from edge_export.synthetic import llama_config as cfg

    config = cfg(vocab_size=32016, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4, num_kv_heads=2,
                 max_position_embeddings=2048, rope_theta=1e6)
    folder = tmp_path / "tiny"
    write_checkpoint_files(folder, config, vocab="infill", dtype="float32")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    fam = read_checkpoint(folder).family
    assert fam.size_class == "custom" and fam.attention == "GQA" and fam.supports_infill
    expected = 2 * 32016 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 172) + 5 * 64
    assert fam.parameter_count == expected


def test_a_real_checkpoint_parameter_count_matches_torch(tiny_checkpoint):
    import torch_reference

    model = torch_reference.load_model(str(tiny_checkpoint))
    assert read_checkpoint(tiny_checkpoint).family.parameter_count == sum(p.numel() for p in model.parameters())


def test_export_command_passes_variant(monkeypatch, tmp_path):
    import edge_export.pipeline as pipeline
    from edge_runtime.cli import main

    seen = {}

    def fake_run_export(opts):
        seen["opts"] = opts
        raise pipeline.ExportError("stopped here")

    monkeypatch.setattr(pipeline, "run_export", fake_run_export)
    assert main(["export", "--checkpoint", str(tmp_path), "--profile", "cpu-x86_64", "--output",
                 str(tmp_path / "b"), "--variant", "python"]) == 2
    assert seen["opts"].variant == "python"
    main(["export", "--checkpoint", str(tmp_path), "--profile", "cpu-x86_64", "--output", str(tmp_path / "b"),
          "--variant", "Instruct"])  # as the folder names spell it
    assert seen["opts"].variant == "instruct"
    main(["export", "--checkpoint", str(tmp_path), "--profile", "cpu-x86_64", "--output", str(tmp_path / "b")])
    assert seen["opts"].variant is None


def test_a_chat_template_of_another_format_is_llama2_saying_so(tmp_path):
    """A fine-tune's ChatML template: neither [INST] nor Source:/<step>, so chat is built as
    [INST] (the only other format the runtime builds), with the source saying so."""
    from edge_runtime.bundle import OTHER_CHAT_TEMPLATE

    folder = make_folder(tmp_path, "finetune-chatml", "7B", "infill")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content']}}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    fam = read_checkpoint(folder).family
    assert (fam.chat_format, fam.chat_format_source, fam.variant) == ("llama2", OTHER_CHAT_TEMPLATE, "instruct")
