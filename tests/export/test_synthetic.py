"""Synthetic Code Llama-shaped checkpoints load as real Hugging Face folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer  # noqa: E402

from edge_export.synthetic import (  # noqa: E402
    INFILL_TOKENS,
    LLAMA2_NOTICE,
    build_checkpoint,
    build_checkpoint_streamed,
)

INFILL_IDS = {"▁<PRE>": 32007, "▁<SUF>": 32008, "▁<MID>": 32009, "▁<EOT>": 32010}
FOLDER_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "LICENSE",
}


def _load(folder: Path, **kwargs):
    return transformers.LlamaForCausalLM.from_pretrained(folder, **kwargs)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def infill_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("infill") / "model")


def test_folder_has_the_files_users_download(infill_checkpoint: Path) -> None:
    names = {path.name for path in infill_checkpoint.iterdir()}
    assert FOLDER_FILES | {"model.safetensors"} <= names
    assert LLAMA2_NOTICE in (infill_checkpoint / "LICENSE").read_text(encoding="utf-8")
    config = _config(infill_checkpoint)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["rms_norm_eps"] == 1e-5
    assert config["rope_theta"] == 1_000_000.0
    assert config["torch_dtype"] == "float32"
    assert config["vocab_size"] == 32016
    generation = json.loads((infill_checkpoint / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_small_checkpoint_loads_and_runs(infill_checkpoint: Path) -> None:
    model = _load(infill_checkpoint)
    assert model.config.hidden_size == 64
    assert model.config.num_hidden_layers == 2
    assert model.lm_head.weight.shape == (32016, 64)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 822, 788]])).logits
    assert logits.shape == (1, 3, 32016)
    assert torch.isfinite(logits).all()


def test_infill_tokenizer_has_the_infilling_tokens(infill_checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_file(str(infill_checkpoint / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 32016
    for piece, token_id in INFILL_IDS.items():
        assert tokenizer.token_to_id(piece) == token_id
    tokenizer_config = json.loads((infill_checkpoint / "tokenizer_config.json").read_text())
    assert tokenizer_config["prefix_token"] == "▁<PRE>"
    assert "chat_template" not in tokenizer_config
    special = json.loads((infill_checkpoint / "special_tokens_map.json").read_text())
    assert special["additional_special_tokens"] == list(INFILL_TOKENS)


def test_same_seed_same_weights(tmp_path: Path, infill_checkpoint: Path) -> None:
    again = build_checkpoint(tmp_path / "again")
    other = build_checkpoint(tmp_path / "other", seed=1)
    reference = _load(infill_checkpoint).state_dict()
    assert all(torch.equal(reference[k], v) for k, v in _load(again).state_dict().items())
    assert not torch.equal(
        reference["lm_head.weight"], _load(other).state_dict()["lm_head.weight"]
    )


def test_no_infill_variant_is_the_llama2_vocabulary(tmp_path: Path) -> None:
    folder = build_checkpoint(
        tmp_path / "no-infill", vocab="no-infill", chat_template="{{ messages }}"
    )
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 32000
    for piece in INFILL_IDS:
        assert tokenizer.token_to_id(piece) is None
    assert tokenizer.encode("def add(a, b):").ids[:2] == [1, 822]
    assert _config(folder)["vocab_size"] == 32000
    assert _load(folder).lm_head.weight.shape == (32000, 64)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == "{{ messages }}"
    assert all(int(token_id) < 32000 for token_id in tokenizer_config["added_tokens_decoder"])


def test_sharded_checkpoint_has_a_working_index(tmp_path: Path) -> None:
    folder = build_checkpoint(tmp_path / "sharded", shard_size="2MB", dtype="float16")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards == sorted(path.name for path in folder.glob("model-*.safetensors"))
    assert not (folder / "model.safetensors").exists()
    assert _config(folder)["torch_dtype"] == "float16"
    model = _load(folder, dtype="auto")
    assert model.dtype == torch.float16
    assert set(index["weight_map"]) == set(model.state_dict())


def test_streamed_builder_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    folder = build_checkpoint_streamed(
        tmp_path / "streamed",
        hidden_size=64,
        intermediate_size=172,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    assert FOLDER_FILES <= {path.name for path in folder.iterdir()}
    config = _config(folder)
    assert config["torch_dtype"] == "float16"
    assert config["max_position_embeddings"] == 16384
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4  # embedding, 2 layers, norm + lm_head

    model = _load(folder, dtype="auto")
    assert model.dtype == torch.float16
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in state.values())
    assert state["model.embed_tokens.weight"].shape == (32016, 64)
    assert state["lm_head.weight"].shape == (32016, 64)
    assert state["model.layers.1.self_attn.q_proj.weight"].shape == (64, 64)
    assert state["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
    assert state["model.layers.1.mlp.down_proj.weight"].shape == (64, 172)
    assert torch.equal(state["model.norm.weight"], torch.ones(64, dtype=torch.float16))
    std = state["model.layers.0.mlp.up_proj.weight"].float().std().item()
    assert 0.015 < std < 0.025
    with torch.no_grad():
        logits = model.float()(torch.tensor([[1, 822, 788]])).logits
    assert torch.isfinite(logits).all()


def test_streamed_builder_is_deterministic(tmp_path: Path) -> None:
    shape = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    first = build_checkpoint_streamed(tmp_path / "a", **shape)
    second = build_checkpoint_streamed(tmp_path / "b", **shape)
    for shard in sorted(first.glob("model-*.safetensors")):
        assert shard.read_bytes() == (second / shard.name).read_bytes()


def test_rejects_unknown_vocab_and_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab"):
        build_checkpoint(tmp_path / "bad-vocab", vocab="llama3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        build_checkpoint_streamed(tmp_path / "bad-dtype", dtype="int8")  # type: ignore[arg-type]
