"""Read a Hugging Face Code Llama checkpoint folder: what it is, before any
heavy work. Refuses anything that is not a Llama-architecture causal LM."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.bundle import Architecture, Family
from edge_runtime.errors import BadRequest
from edge_runtime.types import is_int, is_number

from . import family as family_detection

INFILL_PIECES = {"pre": "▁<PRE>", "suf": "▁<SUF>", "mid": "▁<MID>", "eot": "▁<EOT>"}
STEP_PIECE = "<step>"
LICENCE_NAME = re.compile(r"(licen[cs]e|notice|use[_-]?policy|acceptable[_-]?use|responsible[_-]?use)", re.I)


class CheckpointError(BadRequest):
    """The folder is not a checkpoint this exporter handles; the message says what was found."""


FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors dtype names the exporter reads
SHARD_INDEX = "model.safetensors.index.json"


def read_safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where
    its data begins. CheckpointError when the file is cut short or is not safetensors:
    an interrupted download is found here, before any work, not an hour into an export."""
    try:
        size = file.stat().st_size
    except OSError as exc:  # e.g. a link into a cache whose blob is gone
        raise CheckpointError(f"{file.name} cannot be read ({exc.strerror or exc}); a broken link or an "
                              "interrupted download? Copy or download it again") from None
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"its header claims {header_len} bytes")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file.name} is not a readable safetensors file ({exc}); download it again") from None
    base = 8 + header_len
    if not isinstance(header, dict) or not all(
            name == "__metadata__" or (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                                       and isinstance(entry.get("shape"), list) and _offsets(entry) is not None)
            for name, entry in header.items()):
        raise CheckpointError(f"{file.name} is not a readable safetensors file (its header does not describe "
                              "tensors); download it again")
    end = max((e["data_offsets"][1] for n, e in header.items() if n != "__metadata__"), default=0)
    if base + end > size:
        raise CheckpointError(f"{file.name} is truncated ({size:,} of {base + end:,} bytes): an interrupted copy or "
                              "download; download it again")
    return header, base


def _offsets(entry: dict[str, Any]) -> tuple[int, int] | None:
    offsets = entry.get("data_offsets")
    if (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return offsets[0], offsets[1]
    return None


SINGLE_FILE = "model.safetensors"


def weight_files(path: Path) -> tuple[list[Path], list[Path]]:
    """The files that hold the weights, chosen as transformers chooses them (the fidelity
    reference loads the checkpoint with it): the shards the index names, or
    ``model.safetensors``; and the other ``*.safetensors`` files, which nothing reads (stale
    shards of an earlier download, say). A file the choice needs that is missing, or a choice
    that is not one, is a CheckpointError before any work."""
    present = sorted(path.glob("*.safetensors"))
    if not present:
        found = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".gguf"})
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        how = ""
        if any(name.startswith("pytorch_model") and name.endswith(".bin") for name in found):
            how = (": transformers writes them beside the .bin files (it holds the model in memory once): python -c "
                   "\"from transformers import AutoModelForCausalLM; "
                   f"AutoModelForCausalLM.from_pretrained('{path}', dtype='auto').save_pretrained('{path}')\"")
        raise CheckpointError(f"{path.name}: no *.safetensors weights found"
                              + (f" (found {shown}; convert them to safetensors{how})" if found else ""))
    index = path / SHARD_INDEX
    single = path / SINGLE_FILE
    if index.is_file() and single in present:
        raise CheckpointError(f"{path.name} has both {SINGLE_FILE} and {SHARD_INDEX} (the shards'): two sets of "
                              "weights, and transformers would read the single file; remove the set that is stale")
    if index.is_file():
        chosen = [path / name for name in sorted(set(_weight_map(path).values()))]
        missing = [p.name for p in chosen if not p.is_file()]
        if missing:
            raise CheckpointError(f"{path.name}: {SHARD_INDEX} names {len(chosen)} weight files and "
                                  f"{len(missing)} are missing ({', '.join(missing)}); copy or download them")
    elif single in present:
        chosen = [single]
    else:
        names = ", ".join(p.name for p in present[:4]) + (", ..." if len(present) > 4 else "")
        raise CheckpointError(f"{path.name}: weights in {names} but no {SINGLE_FILE} nor {SHARD_INDEX} to say which "
                              f"files hold the model; copy the checkpoint's {SHARD_INDEX} too (a sharded "
                              f"checkpoint), or name a single weights file {SINGLE_FILE}")
    return chosen, [p for p in present if p not in chosen]


def _weight_map(path: Path) -> dict[str, str]:
    weight_map = _load_json(path / SHARD_INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path.name}: {SHARD_INDEX} has no weight_map of tensor names to file names")
    return weight_map


def _check_weights(path: Path, weights: list[Path], config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The weights are whole floats, and where the index says: tensor name -> shape."""
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise CheckpointError(f"{path.name} is already quantized (config.json quantization_config, quant_method "
                              f"{method!r}); export from the original float16/bfloat16 checkpoint")
    shapes: dict[str, tuple[int, ...]] = {}
    held: dict[str, str] = {}
    for file in weights:
        header, _ = read_safetensors_header(file)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry.get("dtype") not in FLOAT_DTYPES:
                raise CheckpointError(f"{path.name}: {file.name}: tensor {name} is {entry.get('dtype')}, not a float "
                                      f"({', '.join(FLOAT_DTYPES)}): a quantized or non-Llama checkpoint; export "
                                      "from the original float16/bfloat16 checkpoint")
            if name in held:
                raise CheckpointError(f"{path.name}: tensor {name} is in both {held[name]} and {file.name}; a shard "
                                      "from another download? Download the checkpoint again")
            held[name] = file.name
            shapes[name] = tuple(int(d) for d in entry["shape"])
    if (path / SHARD_INDEX).is_file():
        wrong = [(name, file) for name, file in _weight_map(path).items() if held.get(name) != file]
        if wrong:
            name, file = wrong[0]
            raise CheckpointError(f"{path.name}: {SHARD_INDEX} puts {len(wrong)} tensors where they are not, e.g. "
                                  f"{name} in {file}" + (f" (it is in {held[name]})" if name in held else "")
                                  + ": shards of another download? Download the checkpoint again")
    return shapes


REQUIRED_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")  # absent or null: the default
FLOAT_SETTINGS = ("rms_norm_eps", "rope_theta")  # absent: the default; null is not a number


def check_config_numbers(path: Path, config: dict[str, Any]) -> None:
    """The sizes the export reads from config.json are positive integers: a missing or
    hand-edited one (null, "2", 0) is a CheckpointError naming the key, not a traceback."""
    for key in REQUIRED_SIZES + OPTIONAL_SIZES:
        value = config.get(key)
        if value is None and key in OPTIONAL_SIZES:
            continue
        if value is None:
            raise CheckpointError(f"{path.name}: config.json has no {key}" + (" (it is null)" if key in config else "")
                                  + f"; a Llama config.json gives {', '.join(REQUIRED_SIZES)}: copy or download "
                                  "the checkpoint's config.json again")
        if not is_int(value) or value < 1:
            raise CheckpointError(f"{path.name}: config.json's {key} is {json.dumps(value)}, not a positive whole "
                                  "number: copy or download the checkpoint's config.json again")
    for key in FLOAT_SETTINGS:  # absent: transformers' default; present, even null, it is what the model runs with
        value = config.get(key, 1.0)
        if not is_number(value) or value <= 0:
            raise CheckpointError(f"{path.name}: config.json's {key} is {json.dumps(value)}, not a positive "
                                  "number: copy or download the checkpoint's config.json again")


def expected_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors a Llama checkpoint with this config.json holds: name -> (shape, the config
    keys the shape comes from). lm_head.weight is left out when tied to the embedding."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter, vocab = int(config["intermediate_size"]), int(config["vocab_size"])
    q, kv = heads * head_dim, kv_heads * head_dim
    why_q = f"num_attention_heads {heads} x head_dim {head_dim}, hidden_size {hidden}"
    why_kv = f"num_key_value_heads {kv_heads} x head_dim {head_dim}, hidden_size {hidden}"
    why_mlp = f"intermediate_size {inter}, hidden_size {hidden}"
    shapes = {"model.embed_tokens.weight": ((vocab, hidden), f"vocab_size {vocab}, hidden_size {hidden}"),
              "model.norm.weight": ((hidden,), f"hidden_size {hidden}")}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = ((vocab, hidden), f"vocab_size {vocab}, hidden_size {hidden}")
    for i in range(int(config["num_hidden_layers"])):
        at = f"model.layers.{i}"
        shapes.update({
            f"{at}.input_layernorm.weight": ((hidden,), f"hidden_size {hidden}"),
            f"{at}.post_attention_layernorm.weight": ((hidden,), f"hidden_size {hidden}"),
            f"{at}.self_attn.q_proj.weight": ((q, hidden), why_q),
            f"{at}.self_attn.k_proj.weight": ((kv, hidden), why_kv),
            f"{at}.self_attn.v_proj.weight": ((kv, hidden), why_kv),
            f"{at}.self_attn.o_proj.weight": ((hidden, q), why_q),
            f"{at}.mlp.gate_proj.weight": ((inter, hidden), why_mlp),
            f"{at}.mlp.up_proj.weight": ((inter, hidden), why_mlp),
            f"{at}.mlp.down_proj.weight": ((hidden, inter), why_mlp),
        })
    return shapes


def check_tensor_shapes(info: "CheckpointInfo") -> None:
    """Every tensor the config.json implies is in the weights with the shape it implies, and
    no decoder layer beyond num_hidden_layers is: a config that does not match its weights
    (a lost num_key_value_heads, an untied model without its lm_head) is refused before any
    work, not built into a graph that fails on the device or answers with the wrong head."""
    problems = []
    for name, (shape, why) in expected_tensor_shapes(info.config).items():
        found = info.tensor_shapes.get(name)
        if found is None:
            tied = " (config.json tie_word_embeddings is false)" if name == "lm_head.weight" else ""
            problems.append(f"{name} is missing{tied}")
        elif found != shape:
            problems.append(f"{name} is {list(found)}, config.json implies {list(shape)} ({why})")
    layers = int(info.config["num_hidden_layers"])
    if f"model.layers.{layers}.self_attn.q_proj.weight" in info.tensor_shapes:
        problems.append(f"the weights have more decoder layers than config.json's num_hidden_layers ({layers})")
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise CheckpointError(f"{info.path.name}: config.json does not match the weights: "
                              + "; ".join(problems[:4]) + more)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    name: str
    config: dict
    config_sha256: str
    architecture: Architecture
    tokenizer_path: Path
    special_ids: dict[str, int]  # bos, eos, unk
    infill_ids: dict[str, int] | None  # pre/suf/mid/eot, None when any is missing
    step_id: int | None
    chat_format: str  # "llama2" ([INST]) or "source-step" (70B Instruct)
    licence_files: tuple[Path, ...]
    weight_files: tuple[Path, ...]
    weight_bytes: int
    torch_dtype: str
    family: Family  # size class, variant, attention layout, infill, chat format (export/family.py)
    ignored_files: tuple[Path, ...] = ()  # *.safetensors files neither the index nor model.safetensors
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every tensor in weight_files
    # the ids transformers' generate stops at (generation_config.json's eos_token_id): every request stops there
    stop_ids: tuple[int, ...] = ()

    @property
    def supports_infill(self) -> bool:
        """The infilling tokens are present and the member was trained for infilling."""
        return self.infill_ids is not None and self.family.supports_infill


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def detect_chat_format(folder: Path, step_id: int | None = None) -> str:
    """'source-step' (70B Instruct: 'Source: ...' turns ended by '<step>', from the chat
    template or a generation config whose eos is `<step>`), else Llama 2's 'llama2'."""
    return family_detection.detect_chat_format(folder, step_id).name


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings of a config.json, written by transformers 4 (top-level ``rope_theta``
    and ``rope_scaling``) or 5 (one ``rope_parameters`` table: ``rope_theta``, ``rope_type``
    and the scaling's keys). Reading only ``rope_theta`` would take a transformers-5
    checkpoint's base for 10000 -- Code Llama's is 1000000 -- and every position would be
    rotated wrongly."""
    params = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type") or "default")  # "type": the older name
    return params


# RoPE types whose frequencies transformers changes with the sequence's length (dynamic_rope_update)
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
TRANSFORMERS_MAX_POSITIONS = 2048  # LlamaConfig's max_position_embeddings when config.json has none


def rope_length_limit(config: dict[str, Any]) -> tuple[int, str] | None:
    """(tokens, the config.json key that says so) for RoPE scaling whose frequencies
    transformers changes with the sequence's length: "dynamic" (NTK) past
    max_position_embeddings, "longrope" past original_max_position_embeddings (else
    max_position_embeddings). An exported graph keeps the frequencies of the short sequence
    it was traced with, so past that length it is not the model. None for RoPE that does not
    depend on the length (default, linear, yarn, llama3)."""
    rope_type = str(rope_parameters(config)["rope_type"])
    if not any(kind in rope_type for kind in LENGTH_DEPENDENT_ROPE):
        return None
    key = "max_position_embeddings"
    if "longrope" in rope_type and config.get("original_max_position_embeddings"):
        key = "original_max_position_embeddings"
    return int(config.get(key) or TRANSFORMERS_MAX_POSITIONS), key


def rope_theta(config: dict[str, Any]) -> float:
    return float(rope_parameters(config)["rope_theta"])


def torch_config(config: dict[str, Any]):
    """transformers' LlamaConfig for a config.json, with the RoPE base of `rope_parameters()`
    whichever transformers wrote the file (transformers 4 would default a transformers-5
    file's base to 10000), and its scaling, if any, as transformers 4's ``rope_scaling``."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in config.items() if k not in ("torch_dtype", "rope_parameters")})
    rope = rope_parameters(config)
    cfg.rope_theta = float(rope["rope_theta"])
    if rope["rope_type"] != "default" and not config.get("rope_scaling"):
        cfg.rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return cfg


GENERATION_CONFIG = "generation_config.json"


def generation_stop_ids(path: Path, config: dict[str, Any], vocab_size: int) -> tuple[int, ...]:
    """The ids transformers' ``generate`` ends a generation at: generation_config.json's
    ``eos_token_id`` (one id or a list; a fine-tune may add its own end-of-turn token there),
    or config.json's where there is no generation_config.json, as transformers reads them.
    CheckpointError naming the file for an id that is not one of the model's."""
    source = path / GENERATION_CONFIG
    eos = _load_json(source).get("eos_token_id") if source.is_file() else config.get("eos_token_id")
    where = GENERATION_CONFIG if source.is_file() else "config.json"
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    bad = [i for i in ids if not is_int(i) or not 0 <= i < vocab_size]
    if bad:
        raise CheckpointError(f"{path.name}: {where}'s eos_token_id {json.dumps(eos)} has {json.dumps(bad[0])}, not "
                              f"an id of the model (0 to {vocab_size - 1}, config.json's vocab_size): a file from "
                              f"another model? Copy the checkpoint's {where} again")
    return tuple(sorted(set(ids)))


def read_checkpoint(folder: str | Path, *, variant: str | None = None) -> CheckpointInfo:
    """Read `folder`; `variant` (base / python / instruct) overrides the detected variant."""
    path = Path(folder).resolve()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"--checkpoint {path} is a file: give the folder that holds config.json, the "
                              f"tokenizer and the weights{f' ({path.parent})' if path.parent.joinpath('config.json').is_file() else ''}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
    config = _load_json(config_path)
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type != "llama" or "LlamaForCausalLM" not in architectures:
        raise CheckpointError(
            f"{path.name}: found model_type={model_type!r}, architectures={architectures!r}; only Llama-architecture "
            "causal language models (model_type 'llama', LlamaForCausalLM, as Code Llama) can be exported")

    check_config_numbers(path, config)
    weights, ignored = weight_files(path)
    tensor_shapes = _check_weights(path, weights, config)
    tokenizer_path = path / "tokenizer.json"
    if not tokenizer_path.is_file():
        remedy = ""
        if (path / "tokenizer.model").is_file():
            remedy = ("; it has tokenizer.model, from which transformers writes one: pip install sentencepiece "
                      "protobuf, then python -c \"from transformers import AutoTokenizer; "
                      f"AutoTokenizer.from_pretrained('{path}').save_pretrained('{path}')\"")
        raise CheckpointError(f"{path.name}: no tokenizer.json (the fast tokenizer file) in the checkpoint{remedy}")

    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    arch = Architecture(
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        hidden_size=hidden,
        vocab_size=int(config["vocab_size"]),
        rope_theta=rope_theta(config),
        max_position_embeddings=int(config.get("max_position_embeddings") or 4096),  # absent or null
    )

    from tokenizers import Tokenizer  # the device side's tokenizer library reads the same file

    try:
        tok = Tokenizer.from_str(Path(tokenizer_path).read_text(encoding="utf-8"))  # a path from_file could not encode
    except Exception as exc:  # the tokenizers library raises plain Exception: unreadable, not JSON, not a tokenizer
        raise CheckpointError(f"{tokenizer_path} cannot be read as a tokenizer ({exc}): copy or download the "
                              "checkpoint's tokenizer.json again") from None
    if tok.get_vocab_size(with_added_tokens=True) > arch.vocab_size:
        raise CheckpointError(f"{path.name}: tokenizer has {tok.get_vocab_size()} ids but the model's vocab_size "
                              f"is {arch.vocab_size}")
    special = {"unk": tok.token_to_id("<unk>"), "bos": tok.token_to_id("<s>"), "eos": tok.token_to_id("</s>")}
    if special["bos"] is None or special["eos"] is None:
        raise CheckpointError(f"{path.name}: tokenizer lacks <s> or </s>")
    stop_ids = generation_stop_ids(path, config, arch.vocab_size)
    infill = {k: tok.token_to_id(piece) for k, piece in INFILL_PIECES.items()}
    infill_ids = infill if all(v is not None for v in infill.values()) else None
    step_id = tok.token_to_id(STEP_PIECE)
    family = family_detection.detect_family(path, config, infill_tokens=infill_ids is not None, step_id=step_id,
                                            variant_override=variant)
    if family.chat_format == "source-step" and step_id is None:  # chat would fail at every request on the device
        raise CheckpointError(f"{path.name}: its {family.chat_format_source} is Code Llama 70B Instruct's (\"Source:\" "
                              f"turns ended by {STEP_PIECE}), but tokenizer.json has no {STEP_PIECE} token, so no chat "
                              "prompt could be built: the tokenizer.json is another model's; copy the one from the "
                              "same download as the chat template (or the template of the same model as the "
                              "tokenizer)")

    licence_files = tuple(sorted(p for p in path.iterdir() if p.is_file() and LICENCE_NAME.search(p.name)))
    for licence in licence_files:  # copied into the bundle at the end: found unreadable now, not after the work
        try:
            with open(licence, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise CheckpointError(f"{licence} cannot be read ({exc.strerror or exc}), and the bundle carries the "
                                  "checkpoint's licence files: make it readable, or move it out of the checkpoint "
                                  "folder to export without it") from None

    return CheckpointInfo(
        path=path,
        name=family_detection.checkpoint_name(path),
        config=config,
        config_sha256=hashlib.sha256(config_path.read_bytes()).hexdigest(),
        architecture=arch,
        tokenizer_path=tokenizer_path,
        special_ids=special,
        infill_ids=infill_ids,
        step_id=step_id,
        chat_format=family.chat_format,
        licence_files=licence_files,
        weight_files=tuple(weights),
        ignored_files=tuple(ignored),
        tensor_shapes=tensor_shapes,
        stop_ids=stop_ids,
        weight_bytes=sum(p.stat().st_size for p in weights),
        torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        family=family,
    )
