"""Model bundles: the one artefact between the workstation and the device.

A bundle is a folder with the ONNX graph (and its external data), the
tokenizer, licence files and `bundle.json`, whose `files` list names every
other file with its size and SHA-256. This module is the only device-side code
that reads those files; it verifies every hash before a session is created.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from . import onnx_proto_scan
from .errors import BundleError
from .profiles import PROFILE_NAME_PATTERN
from .prompts import CHAT_FORMATS
from .types import is_int

MANIFEST_NAME = "bundle.json"
FORMAT_NAME = "edge-runtime-bundle"
FORMAT_VERSION = 1  # the first format: every runtime reads it, and a bundle is written as it unless
# it needs 2: what a runtime that reads only 1 would serve wrongly or not at all, so it refuses the
# bundle by its version ("unsupported format_version 2") instead (docs/deployment.md, rolling back):
# - tokenizer.stop_ids holds an id besides tokenizer.eos (a fine-tune's own end-of-turn token):
#   such a runtime ignores stop_ids and ran on past that token to max_tokens;
# - an int8 KV cache (kv_cache.dtype): its graph's prompt branch hands back only the prompt's own
#   rows (export/kv_cache_quant.py, revision 5 of 2026-12-02), which runtimes from before then ran
#   into onnxruntime's output-shape error at the first request (and those from before the int8
#   cache into a KeyError), both tracebacks. Bundles of revision 5 written as 1 still load here.
FORMAT_VERSION_2 = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
# Graph flavours the engine knows how to drive.
FLAVOUR_OPTIMUM_KV_CONCAT = "optimum-kv-concat"  # optimum export: past in, past+new out
FLAVOUR_GQA_SHARED_KV = "gqa-shared-kv"  # built from the tensors: GroupQueryAttention, one shared KV buffer
GRAPH_FLAVOURS = (FLAVOUR_OPTIMUM_KV_CONCAT, FLAVOUR_GQA_SHARED_KV)
KV_CACHE_DTYPES = ("float32", "float16", "int8")  # profile.kv_cache_dtype: the cache the graph keeps

_CHUNK = 1 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def format_version_for(manifest: dict[str, Any]) -> int:
    """The format_version to write for a manifest: the oldest whose readers serve its bundle right."""
    tok = manifest.get("tokenizer") or {}
    extra_stops = set(tok.get("stop_ids") or ()) - {tok.get("eos")}
    int8_cache = (manifest.get("kv_cache") or {}).get("dtype") == "int8"
    return FORMAT_VERSION_2 if extra_stops or int8_cache else FORMAT_VERSION


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def safe_relative_path(root: Path, name: str, *, what: str) -> Path:
    """Resolve `name` inside `root`, refusing absolute paths and any path that leaves it."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or "\\" in name or any(p == ".." for p in pure.parts) or ":" in pure.parts[0]:
        raise BundleError(f"{what} {name!r} is not a plain relative path inside the bundle")
    try:
        resolved = (root / pure).resolve()
    except (RuntimeError, OSError) as exc:  # a symbolic link that loops (RuntimeError before Python 3.13)
        raise BundleError(f"{what} {name!r} cannot be resolved inside the bundle: {_reason(exc)}") from None
    if not resolved.is_relative_to(resolve_root(root)):
        raise BundleError(f"{what} {name!r} leaves the bundle folder")
    return resolved


def resolve_root(path: str | Path) -> Path:
    """The bundle folder's absolute path, links followed (BundleError for a link that loops)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as exc:
        raise BundleError(f"bundle folder {path} cannot be resolved: {_reason(exc)}") from None


_READ_REMEDY = "; the user that runs edge-runtime must be able to read every file of the bundle"


def _copy_again(root: Path) -> str:
    """What to do about a bundle whose files are not as exported (a power cut soon after it was
    copied, a failing SD card): on a device, install-service copies an installed bundle again."""
    return (f"in bundle {root}: copy the bundle again from where it was exported (`edge-runtime install-service "
            "--bundle <that folder>` copies an installed bundle again), or export it again")


def _reason(exc: BaseException) -> str:
    """What went wrong reading a path, in words (a looping link, a permission denied...)."""
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        return "a symbolic link that loops"
    return getattr(exc, "strerror", None) or str(exc)


@dataclass(frozen=True)
class Architecture:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int


VARIANTS = ("base", "python", "instruct")
# family.chat_format_source of a checkpoint whose chat template is neither format this runtime builds
# (a fine-tune's ChatML, say): its chat is built as Llama 2's [INST], and each chat reply says so
OTHER_CHAT_TEMPLATE = "default (the checkpoint's chat template is another format)"


@dataclass(frozen=True)
class Family:
    """Which Code Llama this is, as detected at export (`export/family.py`).

    Bundles made before detection existed have no `family` section in bundle.json;
    `Family.from_manifest` then derives what it can (size class from the
    architecture, infill and chat format from the tokenizer section) and says
    `variant="unknown"`."""

    size_class: str  # "7B", "13B", "34B", "70B" (the published architectures) or "custom"
    parameter_count: int | None
    variant: str  # "base", "python", "instruct", or "unknown" (old bundle)
    variant_source: str  # how the variant was decided
    num_heads: int
    num_kv_heads: int
    infill_tokens: bool  # the tokenizer has ▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>
    supports_infill: bool  # infill is served (tokens present, and a member trained for it)
    infill_note: str  # why not, when not
    chat_format: str  # "llama2" ([INST]) or "source-step" (70B Instruct)
    chat_format_source: str  # "chat template", "generation config", "default" or OTHER_CHAT_TEMPLATE
    step_token: bool  # the tokenizer has <step>

    @property
    def attention(self) -> str:
        return "GQA" if self.num_kv_heads < self.num_heads else "MHA"

    def as_dict(self) -> dict[str, Any]:
        return {"size_class": self.size_class, "parameter_count": self.parameter_count, "variant": self.variant,
                "variant_source": self.variant_source,
                "attention": {"kind": self.attention, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads},
                "infill_tokens": self.infill_tokens, "supports_infill": self.supports_infill,
                "infill_note": self.infill_note, "chat_format": self.chat_format,
                "chat_format_source": self.chat_format_source, "step_token": self.step_token}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], architecture: "Architecture") -> "Family":
        tok = manifest.get("tokenizer") or {}
        section = manifest.get("family")
        if section is None:
            from .memory_fit import size_class

            infill = bool(tok.get("supports_infill"))
            return cls(size_class=size_class(hidden_size=architecture.hidden_size, num_layers=architecture.num_layers,
                                             num_heads=architecture.num_heads,
                                             num_kv_heads=architecture.num_kv_heads),
                       parameter_count=None, variant="unknown",
                       variant_source="not recorded (bundle made before family detection)",
                       num_heads=architecture.num_heads, num_kv_heads=architecture.num_kv_heads,
                       infill_tokens=infill, supports_infill=infill, infill_note="",
                       chat_format=str(tok.get("chat_format", "llama2")), chat_format_source="tokenizer section",
                       step_token=tok.get("step") is not None)
        if not isinstance(section, dict):
            raise BundleError(f"{MANIFEST_NAME}: family is not an object")
        attention = _require(section, "attention", dict, "family.")
        count = section.get("parameter_count")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
            raise BundleError(f"{MANIFEST_NAME}: family.parameter_count has the wrong type ({type(count).__name__})")
        family = cls(
            size_class=_require(section, "size_class", str, "family."), parameter_count=count,
            variant=_require(section, "variant", str, "family."),
            variant_source=_require(section, "variant_source", str, "family."),
            num_heads=_require(attention, "num_heads", int, "family.attention."),
            num_kv_heads=_require(attention, "num_kv_heads", int, "family.attention."),
            infill_tokens=_require(section, "infill_tokens", bool, "family."),
            supports_infill=_require(section, "supports_infill", bool, "family."),
            infill_note=_require(section, "infill_note", str, "family."),
            chat_format=_require(section, "chat_format", str, "family."),
            chat_format_source=_require(section, "chat_format_source", str, "family."),
            step_token=_require(section, "step_token", bool, "family."))
        if family.variant not in (*VARIANTS, "unknown"):
            raise BundleError(f"{MANIFEST_NAME}: family.variant {family.variant!r} is not one of {', '.join(VARIANTS)}")
        if family.chat_format != tok.get("chat_format"):
            raise BundleError(f"{MANIFEST_NAME}: family.chat_format {family.chat_format!r} disagrees with "
                              f"tokenizer.chat_format {tok.get('chat_format')!r}")
        if family.supports_infill and not family.infill_tokens:
            raise BundleError(f"{MANIFEST_NAME}: family.supports_infill without the infilling tokens")
        return family


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: paths resolved inside the folder, manifest parsed."""

    root: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    architecture: Architecture
    graph_path: Path
    graph_flavour: str
    tokenizer_path: Path
    context_limit: int
    precision: str
    profile_name: str
    supports_infill: bool
    chat_format: str
    model_name: str
    family: Family  # which Code Llama member (derived for bundles made before detection)
    # an int8-cache graph: how many new rows after cached ones its attention runs through the
    # int8 kernel (export/kv_cache_quant.py bakes it in; the decoder's prefill chunks stay longer);
    # None: a float cache, or a manifest that does not say
    int8_kernel_rows: int | None = None
    # ids that end every generation besides the mode's own (the checkpoint's generation_config.json
    # eos_token_id: a fine-tune's end-of-turn token); empty in bundles made before the export recorded them
    stop_ids: frozenset[int] = frozenset()


def _require(mapping: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in mapping:
        raise BundleError(f"{MANIFEST_NAME}: missing key {where}{key}")
    value = mapping[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise BundleError(f"{MANIFEST_NAME}: {where}{key} has the wrong type ({type(value).__name__})")
    return value


def read_manifest(root: Path) -> tuple[dict[str, Any], str]:
    path = root / MANIFEST_NAME
    try:
        is_dir, is_file = root.is_dir(), path.is_file()
    except OSError as exc:  # a folder on the way that this user may not enter
        raise BundleError(f"bundle folder {root} cannot be read: {_reason(exc)}{_READ_REMEDY}") from None
    if not is_dir:
        raise BundleError(f"bundle folder {root} " + ("is a file, not a folder" if root.exists() else "does not exist"))
    if not is_file:
        raise BundleError(f"{path} is missing: not a bundle folder")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path} cannot be read: {_reason(exc)}{_READ_REMEDY}") from None
    if not raw.strip(b"\0 \t\r\n"):  # what a power cut leaves of a file written and never flushed
        raise BundleError(f"{path} holds no manifest ({len(raw)} bytes, " + ("empty" if not raw else "all zero or blank")
                          + f"): it was not written completely ({_copy_again(root)})")
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc} ({_copy_again(root)})") from exc
    except RecursionError:  # arrays or objects nested thousands deep: no manifest is
        raise BundleError(f"{path} is not a bundle manifest: its JSON nests too deep to read") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path} is not an {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if not is_int(version) or version not in SUPPORTED_FORMAT_VERSIONS:  # true == 1 in Python
        raise BundleError(f"{path}: unsupported format_version {version!r} "
                          f"(this runtime reads {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}): a bundle from "
                          "a newer edge-runtime export? upgrade edge-runtime here, or export the bundle again "
                          "with this version's `edge-runtime export`")
    return manifest, hashlib.sha256(raw).hexdigest()


def manifest_profile_name(path: str | Path) -> str:
    """The profile a bundle was exported for, from its bundle.json alone (no file is hashed):
    what to load before `load_bundle`'s slow verification."""
    manifest, _ = read_manifest(resolve_root(path))
    return _profile_name(_require(manifest, "profile", dict, ""))


def _profile_name(profile: dict[str, Any]) -> str:
    """profile.name: a profile's name, never a path (load_profile would read a name with a "/"
    or ending in .toml as a file: a bundle records only the name, whatever the export was given)."""
    name = _require(profile, "name", str, "profile.")
    if not re.fullmatch(PROFILE_NAME_PATTERN, name):
        raise BundleError(f"{MANIFEST_NAME}: profile.name {name!r} is not a profile name (a lower-case name "
                          "such as 'cpu-x86_64')")
    return name


def verify_files(root: Path, manifest: dict[str, Any], *, progress=None) -> list[Path]:
    """Check that every listed file exists with its size and SHA-256 and that no
    listed name leaves the folder. Returns the resolved paths. Every entry, name and size is
    checked before any file is hashed: a file cut short (a power cut soon after a copy, the
    usual damage) is refused at once, not after hashing gigabytes of the files before it, at
    each of systemd's restarts."""
    files = _require(manifest, "files", list, "")
    if not files:
        raise BundleError(f"{MANIFEST_NAME}: the files list is empty")
    remedy = _copy_again(root)
    checked = []
    for i, entry in enumerate(files):
        if not isinstance(entry, dict):
            raise BundleError(f"{MANIFEST_NAME}: files[{i}] is not an object")
        name = _require(entry, "path", str, f"files[{i}].")
        size = _require(entry, "size", int, f"files[{i}].")
        digest = _require(entry, "sha256", str, f"files[{i}].")
        if size < 0:
            raise BundleError(f"{MANIFEST_NAME}: files[{i}].size is {size}, not a size in bytes ({name})")
        if not _SHA256_HEX.fullmatch(digest):
            raise BundleError(f"{MANIFEST_NAME}: files[{i}].sha256 {digest!r} is not a SHA-256 (64 lowercase hex "
                              f"digits) ({name})")
        path = safe_relative_path(root, name, what="file")
        if not path.is_file():
            what = ((("a folder" if path.is_dir() else "not a regular file") + " in the bundle") if path.exists()
                    else "missing from the bundle")
            raise BundleError(f"{name}: listed in {MANIFEST_NAME} but {what} ({remedy})")
        try:
            actual_size = path.stat().st_size
        except OSError as exc:
            raise BundleError(f"{name}: cannot be read: {_reason(exc)} (in bundle {root}{_READ_REMEDY})") from None
        if actual_size != size:
            how = "truncated" if actual_size < size else "larger than exported: replaced or appended to"
            raise BundleError(f"{name}: size {actual_size} does not match the manifest ({size}): the file is "
                              f"{how} ({remedy})")
        checked.append((name, path, digest))
    paths = []
    for name, path, digest in checked:
        try:
            if progress:
                progress(name)
            actual_digest = sha256_file(path)
        except OSError as exc:  # no permission to read it, or the storage fails under it (EIO)
            raise BundleError(f"{name}: cannot be read: {_reason(exc)} (in bundle {root}{_READ_REMEDY})") from None
        if actual_digest != digest:
            raise BundleError(f"{name}: SHA-256 does not match the manifest: the file changed or is corrupted "
                              f"({remedy})")
        paths.append(path)
    return paths


def unlisted_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """The files (and links) under `folder` that are neither its manifest nor listed in it, as
    relative paths: what is not the bundle's (someone's notes, a copied file)."""
    entries = manifest.get("files")
    listed = {MANIFEST_NAME} | {e["path"] for e in (entries if isinstance(entries, list) else [])
                                if isinstance(e, dict) and isinstance(e.get("path"), str)}
    extra = []
    for here, dirs, files in os.walk(folder):  # links are not followed: a linked folder counts as one entry
        base = Path(here)
        for name in files + [d for d in dirs if (base / d).is_symlink()]:
            rel = (base / name).relative_to(folder).as_posix()
            if rel not in listed:
                extra.append(rel)
    return sorted(extra)


def check_external_data(graph_path: Path, root: Path, listed: set[Path]) -> None:
    """Refuse external-data locations that leave the bundle or are not hashed, and files
    shorter than the graph reads of them."""
    for location, extent in external_data_extents(graph_path).items():
        path = safe_relative_path(root, location, what="external data file")
        if path not in listed:
            raise BundleError(f"external data file {location!r} referenced by {graph_path.name} "
                              f"is not listed (hashed) in {MANIFEST_NAME}")
        size = path.stat().st_size
        if size < extent.end:
            raise BundleError(f"external data file {location!r} has {size} bytes, but {graph_path.name} reads up "
                              f"to byte {extent.end} of it (tensor {extent.tensor!r}): it is cut short or another "
                              "export's, though its hash matches bundle.json (edited to match); export the "
                              "bundle again")


def external_data_extents(graph_path: Path) -> dict[str, onnx_proto_scan.ExternalExtent]:
    """The `location` values of every external-data tensor in an ONNX file, with how far the
    graph reads into each."""
    try:
        return onnx_proto_scan.external_data_extents(graph_path)
    except ValueError as exc:
        raise BundleError(f"{graph_path.name} is not a valid ONNX file: {exc}") from exc
    except OSError as exc:
        raise BundleError(f"{graph_path.name}: cannot be read: {_reason(exc)}{_READ_REMEDY}") from None


SLOWEST_READ_BYTES_PER_S = 10e6  # an old SD card; the bundle is read twice (hashes, then the session)


def load_time_budget_s(path: str | Path) -> float:
    """How long loading the bundle may take on the slowest storage it is likely to sit on:
    its files read twice at SLOWEST_READ_BYTES_PER_S. 0 when the manifest cannot be read
    (the load then says why at once)."""
    try:
        manifest, _ = read_manifest(resolve_root(path))
    except (BundleError, OSError):
        return 0.0
    return 2 * listed_bytes(manifest) / SLOWEST_READ_BYTES_PER_S


def listed_bytes(manifest: dict[str, Any]) -> int:
    """The bytes of the files a manifest lists (entries that are not well formed count 0:
    verification names them)."""
    files = manifest.get("files")
    return sum(f["size"] for f in (files if isinstance(files, list) else [])
               if isinstance(f, dict) and is_int(f.get("size")))


def load_bundle(path: str | Path, *, progress=None, pinned_sha256: str | None = None) -> Bundle:
    """Read and verify a bundle. Raises BundleError naming the problem. `pinned_sha256`:
    the SHA-256 its bundle.json must have (checked first, before the files are hashed)."""
    root = resolve_root(path)
    manifest, manifest_sha = read_manifest(root)
    if pinned_sha256 is not None and manifest_sha != pinned_sha256:
        raise BundleError(f"bundle {root}: {MANIFEST_NAME} has SHA-256 {manifest_sha}, not the {pinned_sha256} that "
                          "[model] bundle_sha256 pins: another or an edited bundle; install the pinned one, or pin "
                          "this one if it is the one meant (edge-runtime verify prints its SHA-256)")
    listed = set(verify_files(root, manifest, progress=progress))

    graph = _require(manifest, "graph", dict, "")
    flavour = _require(graph, "flavour", str, "graph.")
    if flavour not in GRAPH_FLAVOURS:
        raise BundleError(f"{MANIFEST_NAME}: graph.flavour {flavour!r} is not one this runtime drives "
                          f"({', '.join(GRAPH_FLAVOURS)})")
    graph_path = safe_relative_path(root, _require(graph, "file", str, "graph."), what="graph file")
    if graph_path not in listed:
        raise BundleError(f"graph file {graph_path.name} is not listed in {MANIFEST_NAME}")
    check_external_data(graph_path, root, listed)

    tok = _require(manifest, "tokenizer", dict, "")
    tokenizer_path = safe_relative_path(root, _require(tok, "file", str, "tokenizer."), what="tokenizer file")
    if tokenizer_path not in listed:
        raise BundleError(f"tokenizer file {tokenizer_path.name} is not listed in {MANIFEST_NAME}")

    arch = _require(manifest, "architecture", dict, "")
    shape: dict[str, Any] = {}
    for name in Architecture.__dataclass_fields__:  # every later size and offset is computed from these
        value = _require(arch, name, (int, float) if name == "rope_theta" else int, "architecture.")
        if not (math.isfinite(value) and value > 0):
            raise BundleError(f"{MANIFEST_NAME}: architecture.{name} is {value!r}, not a positive number")
        shape[name] = value
    architecture = Architecture(**shape)
    context_limit = _require(manifest, "context_limit", int, "")
    if context_limit < 1:
        raise BundleError(f"{MANIFEST_NAME}: context_limit is {context_limit}, not a number of tokens")
    chat_format = _require(tok, "chat_format", str, "tokenizer.")
    if chat_format not in CHAT_FORMATS:
        raise BundleError(f"{MANIFEST_NAME}: tokenizer.chat_format {chat_format!r} is not a chat format this runtime "
                          f"builds ({', '.join(CHAT_FORMATS)}): a bundle from a newer exporter? update edge-runtime, "
                          "or export the bundle with this one")
    profile = _require(manifest, "profile", dict, "")
    kv_dtype = profile.get("kv_cache_dtype")  # absent in early bundles: the profile's then
    if kv_dtype is not None and kv_dtype not in KV_CACHE_DTYPES:
        raise BundleError(f"{MANIFEST_NAME}: profile.kv_cache_dtype {kv_dtype!r} is not one of "
                          f"{', '.join(KV_CACHE_DTYPES)}")
    licences = manifest.get("licence_files", [])
    if not isinstance(licences, list) or not all(isinstance(name, str) for name in licences):
        raise BundleError(f"{MANIFEST_NAME}: licence_files is not a list of file names")
    family = Family.from_manifest(manifest, architecture)
    kv_cache = manifest.get("kv_cache")
    int8_kernel_rows = None
    if isinstance(kv_cache, dict) and "int8_kernel_rows_after_cache" in kv_cache:
        int8_kernel_rows = _require(kv_cache, "int8_kernel_rows_after_cache", int, "kv_cache.")
        if int8_kernel_rows < 0:
            raise BundleError(f"{MANIFEST_NAME}: kv_cache.int8_kernel_rows_after_cache is {int8_kernel_rows}, "
                              "not a row count")
    stop_ids = tok.get("stop_ids", [])
    if (not isinstance(stop_ids, list)
            or not all(is_int(i) and 0 <= i < architecture.vocab_size for i in stop_ids)):
        raise BundleError(f"{MANIFEST_NAME}: tokenizer.stop_ids is {json.dumps(stop_ids)}, not a list of token ids "
                          f"(0 to architecture.vocab_size - 1); export the bundle again")
    return Bundle(
        root=root,
        manifest=manifest,
        manifest_sha256=manifest_sha,
        architecture=architecture,
        graph_path=graph_path,
        graph_flavour=flavour,
        tokenizer_path=tokenizer_path,
        context_limit=context_limit,
        precision=_require(manifest, "precision", str, ""),
        profile_name=_profile_name(profile),
        supports_infill=bool(_require(tok, "supports_infill", bool, "tokenizer.")) and family.supports_infill,
        chat_format=chat_format,
        model_name=_require(_require(manifest, "source", dict, ""), "name", str, "source."),
        family=family,
        int8_kernel_rows=int8_kernel_rows,
        stop_ids=frozenset(stop_ids),
    )
