"""Small Code Llama-shaped Hugging Face checkpoints with random weights.

Tests and benchmarks need checkpoint folders that look exactly like the ones
users download (``config.json``, safetensors weights, the tokenizer files, a
``LICENSE``) without a model hub. This module writes them locally:

* :func:`build_checkpoint` instantiates a ``LlamaForCausalLM`` with seeded random
  weights and saves it with ``save_pretrained`` (optionally sharded).
* :func:`build_checkpoint_streamed` writes big (7B-shaped) checkpoints one layer
  at a time with numpy, never holding more than about one layer in memory.
* :func:`write_checkpoint_files` writes everything except the weights; the
  trained demo model (:mod:`edge_export.demo_model`) uses it too.

The tokenizer is the real Code Llama tokenizer shipped in
``assets/codellama-tokenizer.json`` (32016 ids, infilling tokens at 32007..32010).
``vocab="no-infill"`` writes the 32000-id Llama 2 variant that Code Llama 34B and
the Python variants use; ``vocab="step"`` the Code Llama 70B one (32016 ids, id
32015 is the ``<step>`` control token that ends a 70B Instruct turn).
:data:`LLAMA2_CHAT_TEMPLATE` and :data:`SOURCE_STEP_CHAT_TEMPLATE` are the chat
templates the 7B/13B/34B Instruct and the 70B Instruct checkpoints carry.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

Vocab = Literal["infill", "no-infill", "step"]
DType = Literal["float32", "float16", "bfloat16"]

TOKENIZER_ASSET = Path(__file__).resolve().parent / "assets" / "codellama-tokenizer.json"
"""The Code Llama tokenizer (``tokenizers`` JSON) with the infilling tokens."""

LLAMA2_NOTICE = (
    "Llama 2 is licensed under the LLAMA 2 Community License, "
    "Copyright (c) Meta Platforms, Inc. All Rights Reserved."
)
"""The attribution line every Llama 2 derived checkpoint carries in its LICENSE."""

LLAMA2_VOCAB_SIZE = 32000
"""Ids below this are the Llama 2 vocabulary; Code Llama adds 16 more (infilling)."""

BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
RMS_NORM_EPS = 1e-5

INFILL_TOKENS = ("▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>")
"""Code Llama's infilling pieces, in the order its ``special_tokens_map.json`` lists them."""

STEP_TOKEN = "<step>"
STEP_TOKEN_ID = 32015
"""Code Llama 70B's turn separator (``vocab="step"``), in place of ``<reserved_32015>``."""

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
"""The Llama 2 ``[INST]`` chat template of Code Llama 7B/13B/34B Instruct."""

SOURCE_STEP_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set user_index = 1 %}{% else %}{% set user_index = 0 %}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != ((loop.index0 - user_index) % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 %}{{ '<s>' }}{% endif %}"
    "{% set content = 'Source: ' + message['role'] + '\\n\\n ' + message['content'] | trim %}"
    "{{ content + ' <step> ' }}{% endfor %}{{'Source: assistant\\nDestination: user\\n\\n '}}"
)
"""The ``Source: ... <step>`` chat template of Code Llama 70B Instruct."""

_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
_NO_SHARDING = "100000GB"
_RANDOM_BLOCK = 1 << 22  # values drawn per block by the streamed builder
_SAFETENSORS_METADATA = {"format": "pt"}


def tokenizer_json(vocab: Vocab = "infill") -> dict[str, Any]:
    """Return the tokenizer (``tokenizers`` JSON document) for ``vocab``.

    ``"infill"`` is the Code Llama tokenizer as shipped (32016 ids).
    ``"no-infill"`` drops the added tokens and vocabulary entries with ids at or
    above 32000, leaving the Llama 2 vocabulary (32000 ids).
    """
    document = json.loads(TOKENIZER_ASSET.read_text(encoding="utf-8"))
    if vocab == "infill":
        return document
    if vocab == "step":
        reserved = f"<reserved_{STEP_TOKEN_ID}>"
        for token in document["added_tokens"]:
            if token["id"] == STEP_TOKEN_ID:
                # it absorbs the spaces around it, as the 70B template's " <step> " needs
                token.update(content=STEP_TOKEN, lstrip=True, rstrip=True)
        pieces = document["model"]["vocab"]
        del pieces[reserved]
        pieces[STEP_TOKEN] = STEP_TOKEN_ID
        return document
    if vocab != "no-infill":
        raise ValueError(f"vocab must be 'infill', 'no-infill' or 'step', not {vocab!r}")
    document["added_tokens"] = [
        token for token in document["added_tokens"] if token["id"] < LLAMA2_VOCAB_SIZE
    ]
    model = document["model"]
    model["vocab"] = {
        piece: index for piece, index in model["vocab"].items() if index < LLAMA2_VOCAB_SIZE
    }
    return document


def tokenizer_vocab_size(document: dict[str, Any]) -> int:
    """Number of ids a tokenizer document defines (the model's ``vocab_size``)."""
    ids = set(document["model"]["vocab"].values())
    ids.update(token["id"] for token in document["added_tokens"])
    return max(ids) + 1


def llama_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    max_position_embeddings: int,
    rope_theta: float,
) -> Any:
    """A ``transformers.LlamaConfig`` with Code Llama's fixed settings.

    Untied embeddings, bos 1 / eos 2, RMSNorm epsilon 1e-5, SiLU MLP, no biases.
    """
    from transformers import LlamaConfig

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        rms_norm_eps=RMS_NORM_EPS,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def write_checkpoint_files(
    out_dir: Path,
    config: Any,
    *,
    vocab: Vocab,
    dtype: str,
    chat_template: str | None = None,
) -> None:
    """Write every file of a checkpoint folder except the weights.

    ``config.json`` (hub style: ``torch_dtype`` names the weights' dtype),
    ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``
    (with ``chat_template`` when given), ``special_tokens_map.json`` and ``LICENSE``.
    ``config.vocab_size`` must match the tokenizer chosen by ``vocab``.
    """
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = tokenizer_json(vocab)
    vocab_size = tokenizer_vocab_size(document)
    if config.vocab_size != vocab_size:
        raise ValueError(
            f"config vocab_size {config.vocab_size} does not match the {vocab!r} "
            f"tokenizer ({vocab_size} ids)"
        )

    config_dict = config.to_diff_dict()
    config_dict.pop("dtype", None)
    config_dict["torch_dtype"] = dtype
    config_dict["transformers_version"] = transformers.__version__
    _write_json(out_dir / "config.json", dict(sorted(config_dict.items())))
    _write_json(
        out_dir / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID,
            "transformers_version": transformers.__version__,
        },
    )
    (out_dir / "tokenizer.json").write_text(
        json.dumps(document, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(vocab, chat_template))
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map(vocab))
    (out_dir / "LICENSE").write_text(LLAMA2_NOTICE + "\n", encoding="utf-8")


def build_checkpoint(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 172,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    vocab: Vocab = "infill",
    max_position_embeddings: int = 2048,
    rope_theta: float = 1_000_000.0,
    seed: int = 0,
    dtype: DType = "float32",
    chat_template: str | None = None,
    shard_size: str | None = None,
) -> Path:
    """Write a small random-weight Code Llama-shaped checkpoint to ``out_dir``.

    The weights come from ``LlamaForCausalLM``'s own initialisation under
    ``torch.manual_seed(seed)`` (the caller's RNG state is left untouched), cast
    to ``dtype``, and are saved with ``save_pretrained``: one ``model.safetensors``
    or, with ``shard_size`` (e.g. ``"2MB"``), shards plus
    ``model.safetensors.index.json``. Returns ``out_dir``.
    """
    import torch
    from transformers import LlamaForCausalLM

    _check_dtype(dtype)
    out_dir = Path(out_dir)
    config = llama_config(
        vocab_size=tokenizer_vocab_size(tokenizer_json(vocab)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(
        out_dir,
        safe_serialization=True,
        max_shard_size=shard_size if shard_size is not None else _NO_SHARDING,
    )
    write_checkpoint_files(out_dir, config, vocab=vocab, dtype=dtype, chat_template=chat_template)
    return out_dir


def build_checkpoint_streamed(
    out_dir: Path,
    *,
    hidden_size: int = 4096,
    intermediate_size: int = 11008,
    num_layers: int = 32,
    num_heads: int = 32,
    num_kv_heads: int = 32,
    vocab: Vocab = "infill",
    max_position_embeddings: int = 16384,
    rope_theta: float = 1_000_000.0,
    seed: int = 0,
    dtype: DType = "float16",
    std: float = 0.02,
) -> Path:
    """Write a big random-weight checkpoint shard by shard (defaults: Code Llama 7B).

    Weights are drawn from ``numpy.random.default_rng(seed)`` (normal with
    standard deviation ``std``; RMSNorm weights are ones) and written with
    safetensors one shard at a time: the embedding, then one shard per decoder
    layer, then the final norm with ``lm_head``. Peak memory stays around one
    layer's tensors, so a 7B-shaped float16 checkpoint (about 13.5 GB on disk)
    needs well under 1 GB of RAM. Writes ``model.safetensors.index.json`` and
    the files of :func:`write_checkpoint_files`. Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    _check_dtype(dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = llama_config(
        vocab_size=tokenizer_vocab_size(tokenizer_json(vocab)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
    )
    rng = np.random.default_rng(seed)
    groups = list(_llama_tensor_groups(config))
    weight_map: dict[str, str] = {}
    total_size = 0
    for number, group in enumerate(groups, start=1):
        filename = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            name: _random_tensor(rng, shape, std=std, ones=ones, dtype=dtype)
            for name, shape, ones in group
        }
        save_file(tensors, str(out_dir / filename), metadata=_SAFETENSORS_METADATA)
        for name, tensor in tensors.items():
            weight_map[name] = filename
            total_size += tensor.numel() * tensor.element_size()
        del tensors
    _write_json(
        out_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
    )
    write_checkpoint_files(out_dir, config, vocab=vocab, dtype=dtype)
    return out_dir


# A tensor to create: (name, shape, whether it is an RMSNorm weight of ones).
_TensorSpec = tuple[str, tuple[int, ...], bool]


def _llama_tensor_groups(config: Any) -> Iterator[list[_TensorSpec]]:
    """Yield LlamaForCausalLM's tensors grouped by shard, in ``state_dict`` names."""
    hidden = config.hidden_size
    head_dim = hidden // config.num_attention_heads
    kv_dim = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    yield [("model.embed_tokens.weight", (config.vocab_size, hidden), False)]
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        yield [
            (f"{prefix}.input_layernorm.weight", (hidden,), True),
            (f"{prefix}.self_attn.q_proj.weight", (hidden, hidden), False),
            (f"{prefix}.self_attn.k_proj.weight", (kv_dim, hidden), False),
            (f"{prefix}.self_attn.v_proj.weight", (kv_dim, hidden), False),
            (f"{prefix}.self_attn.o_proj.weight", (hidden, hidden), False),
            (f"{prefix}.post_attention_layernorm.weight", (hidden,), True),
            (f"{prefix}.mlp.gate_proj.weight", (inter, hidden), False),
            (f"{prefix}.mlp.up_proj.weight", (inter, hidden), False),
            (f"{prefix}.mlp.down_proj.weight", (hidden, inter), False),
        ]
    yield [
        ("model.norm.weight", (hidden,), True),
        ("lm_head.weight", (config.vocab_size, hidden), False),
    ]


def _random_tensor(
    rng: np.random.Generator, shape: tuple[int, ...], *, std: float, ones: bool, dtype: str
) -> Any:
    """One weight as a torch tensor of ``dtype``: N(0, std) or, for norms, ones.

    Drawn in float32 blocks of ``_RANDOM_BLOCK`` values written straight into
    the result, so no full-size float32 copy of a big tensor ever exists. Each
    block has its own generator, seeded by (a seed drawn from ``rng``, the block's
    number), so blocks fill on a thread pool (numpy releases the GIL) and the
    values do not depend on the number of threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    storage = np.float16 if dtype == "float16" else np.float32
    values = np.empty(shape, dtype=storage)
    if ones:
        values.fill(1.0)
    else:
        flat = values.reshape(-1)
        tensor_seed = int(rng.integers(2**63))

        def fill(number: int) -> None:
            start = number * _RANDOM_BLOCK
            block = np.random.default_rng([tensor_seed, number]).standard_normal(
                min(_RANDOM_BLOCK, flat.size - start), dtype=np.float32)
            block *= std
            flat[start : start + block.size] = block

        blocks = range(-(-flat.size // _RANDOM_BLOCK))
        with ThreadPoolExecutor(max_workers=min(len(blocks), os.cpu_count() or 1) or 1) as pool:
            list(pool.map(fill, blocks))
    tensor = torch.from_numpy(values)
    return tensor.to(torch.bfloat16) if dtype == "bfloat16" else tensor


def _tokenizer_config(vocab: Vocab, chat_template: str | None) -> dict[str, Any]:
    """``tokenizer_config.json`` as Code Llama's hub checkpoints carry it."""
    document = tokenizer_json(vocab)
    infill = vocab in ("infill", "step")
    config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(token["id"]): {
                "content": token["content"],
                "lstrip": token["lstrip"],
                "normalized": token["normalized"],
                "rstrip": token["rstrip"],
                "single_word": token["single_word"],
                "special": token["special"],
            }
            for token in document["added_tokens"]
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": None,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "CodeLlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    if infill:
        config["additional_special_tokens"] = list(INFILL_TOKENS)
        config.update(
            prefix_token="▁<PRE>",
            middle_token="▁<MID>",
            suffix_token="▁<SUF>",
            eot_token="▁<EOT>",
            fill_token="<FILL_ME>",
            suffix_first=False,
        )
    else:
        config.update(prefix_token=None, middle_token=None, suffix_token=None, eot_token=None)
    if chat_template is not None:
        config["chat_template"] = chat_template
    return dict(sorted(config.items()))


def _special_tokens_map(vocab: Vocab) -> dict[str, Any]:
    special: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if vocab in ("infill", "step"):
        special["additional_special_tokens"] = list(INFILL_TOKENS)
    return dict(sorted(special.items()))


def _check_dtype(dtype: str) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
