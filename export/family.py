"""Which member of the Code Llama family a checkpoint folder holds, decided once at
export and recorded in bundle.json (`family` section); the device never guesses.

* size class: from the architecture (hidden size, layers, heads, key/value heads,
  MLP width) against the published 7B / 13B / 34B / 70B shapes; anything else is
  "custom" (small test and demo models), with its parameter count either way.
* variant (base / python / instruct), first match wins:
  1. `--variant` (the user's override);
  2. names: the folder's (for a Hugging Face cache snapshot,
     `models--codellama--CodeLlama-7b-hf/snapshots/<hash>`, the repository's), then config.json `_name_or_path`, then
     tokenizer_config.json `name_or_path` (last path component): "instruct" ->
     instruct, "python" -> python, a plain Code Llama name ("CodeLlama-7b-hf") -> base;
  3. a 7B/13B architecture without the infilling tokens -> python (7B and 13B base
     and Instruct ship them; the Python variants do not);
  4. a chat template in the checkpoint -> instruct;
  5. otherwise base.
* infill: the tokenizer has the four tokens, and the member was trained for it
  (not the Python variants, not 34B or 70B); the note says why not.
* chat format: the 70B Instruct template ("Source: ..." turns ended by
  `<step>`) or a generation config whose eos is `<step>` -> "source-step";
  otherwise Llama 2's "llama2" ([INST]); a chat template of neither format (a
  fine-tune's ChatML) is llama2 too, with its source saying so (OTHER_CHAT_TEMPLATE):
  the export warns, and so does each chat reply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.bundle import OTHER_CHAT_TEMPLATE, VARIANTS, Family
from edge_runtime.errors import BadRequest
from edge_runtime.memory_fit import ModelShape, size_class
from edge_runtime.native_paths import name_text

INFILL_SIZES = ("7B", "13B", "custom")  # members trained for infilling (custom: not ours to judge)
_PLAIN_CODE_LLAMA = re.compile(r"code[-_]?llama[-_]?\d+(\.\d+)?b(\b|[-_]hf\b|$)", re.I)


@dataclass(frozen=True)
class ChatFormat:
    name: str  # "llama2" | "source-step"
    source: str  # "chat template" | "generation config" | "default" | OTHER_CHAT_TEMPLATE


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def chat_template_text(folder: Path) -> str:
    """The checkpoint's chat template(s) as text ('' when it has none)."""
    template = ""
    tmpl = _json(folder / "tokenizer_config.json").get("chat_template") or ""
    template = tmpl if isinstance(tmpl, str) else json.dumps(tmpl)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template += jinja.read_text(encoding="utf-8", errors="replace")
    return template


def detect_chat_format(folder: Path, step_id: int | None = None) -> ChatFormat:
    """From the chat template, else the generation config (eos = `<step>`), else llama2."""
    template = chat_template_text(folder)
    if "Source:" in template and "<step>" in template:
        return ChatFormat("source-step", "chat template")
    if "[INST]" in template:
        return ChatFormat("llama2", "chat template")
    eos = _json(folder / "generation_config.json").get("eos_token_id")
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    if step_id is not None and step_id in eos_ids:
        return ChatFormat("source-step", "generation config")
    if template.strip():  # ChatML, Alpaca, ...: not a format the runtime builds
        return ChatFormat("llama2", OTHER_CHAT_TEMPLATE)
    return ChatFormat("llama2", "default")


def checkpoint_name(folder: Path) -> str:
    """The folder's name as text; for a Hugging Face cache snapshot (`models--org--Name/snapshots/<hash>`),
    `Name`."""
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return name_text(repo.split("--")[-1])
    return name_text(folder.name)


def _names(folder: Path, config: dict) -> list[tuple[str, str]]:
    names = [("folder name", checkpoint_name(folder))]
    for where, value in (("config.json _name_or_path", config.get("_name_or_path")),
                         ("tokenizer_config.json name_or_path",
                          _json(folder / "tokenizer_config.json").get("name_or_path"))):
        if isinstance(value, str) and value.strip():
            names.append((where, value.rstrip("/").split("/")[-1]))
    return names


def detect_variant(folder: Path, config: dict, *, size: str, infill_tokens: bool, has_chat_template: bool,
                   override: str | None = None) -> tuple[str, str]:
    """(variant, how it was decided); see the module docstring for the order."""
    if override is not None:
        if override not in VARIANTS:
            raise BadRequest(f"--variant {override!r} is not one of {', '.join(VARIANTS)}")
        return override, "--variant"
    for where, name in _names(folder, config):
        low = name.lower()
        if "instruct" in low:
            return "instruct", f"{where} {name!r}"
        if "python" in low:
            return "python", f"{where} {name!r}"
        if _PLAIN_CODE_LLAMA.search(name):
            return "base", f"{where} {name!r}"
    if size in ("7B", "13B") and not infill_tokens:
        return "python", f"a {size} tokenizer without the infilling tokens"
    if has_chat_template:
        return "instruct", "chat template in the checkpoint"
    return "base", "default (no name, template or token hints)"


def infill_support(*, infill_tokens: bool, size: str, variant: str) -> tuple[bool, str]:
    if not infill_tokens:
        return False, "the tokenizer lacks ▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>"
    if variant == "python":
        return False, "Code Llama - Python was not trained for infilling"
    if size not in INFILL_SIZES:
        return False, f"Code Llama {size} was not trained for infilling (only 7B and 13B base and Instruct)"
    return True, ""


def detect_family(folder: Path, config: dict, *, infill_tokens: bool, step_id: int | None,
                  variant_override: str | None = None) -> Family:
    shape = ModelShape.from_config("checkpoint", config)
    heads, kv_heads = shape.num_heads, shape.num_kv_heads
    size = size_class(hidden_size=shape.hidden_size, num_layers=shape.num_layers, num_heads=heads,
                      num_kv_heads=kv_heads, intermediate_size=shape.intermediate_size or None)
    count = shape.parameter_count
    if config.get("tie_word_embeddings"):
        count -= shape.vocab_size * shape.hidden_size
    chat = detect_chat_format(folder, step_id)
    variant, source = detect_variant(folder, config, size=size, infill_tokens=infill_tokens,
                                     has_chat_template=bool(chat_template_text(folder).strip()),
                                     override=variant_override)
    supports, note = infill_support(infill_tokens=infill_tokens, size=size, variant=variant)
    return Family(size_class=size, parameter_count=count, variant=variant, variant_source=source,
                  num_heads=heads, num_kv_heads=kv_heads, infill_tokens=infill_tokens, supports_infill=supports,
                  infill_note=note, chat_format=chat.name, chat_format_source=chat.source,
                  step_token=step_id is not None)
