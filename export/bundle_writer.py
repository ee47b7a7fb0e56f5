"""Write a bundle folder: graph files, tokenizer, licence files and bundle.json
with every file's size and SHA-256. The only export-side code that lays out a
bundle; `edge_runtime/bundle.py` is its reader."""

from __future__ import annotations

import json
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

from edge_runtime import __version__
from edge_runtime.bundle import FORMAT_NAME, MANIFEST_NAME, format_version_for, sha256_file

# Written into `<output>.partial/` when an export creates it (and removed before the rename to
# --output): how a later export knows a leftover scratch folder is an export's, not someone's.
EXPORT_MARKER = ".edge-runtime-export"
TOOLS = ("onnxruntime", "onnx", "torch", "transformers", "optimum", "optimum-onnx", "tokenizers", "numpy")


def tool_versions() -> dict[str, str]:
    versions = {"edge-runtime": __version__, "python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def file_entries(root: Path, progress=None) -> list[dict]:
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST_NAME, EXPORT_MARKER)):
        if progress:
            progress(f"hashing {path.relative_to(root)}")
        entries.append({"path": path.relative_to(root).as_posix(), "size": path.stat().st_size,
                        "sha256": sha256_file(path)})
    return entries


def copy_into(root: Path, sources: list[Path], names: list[str] | None = None) -> list[Path]:
    out = []
    for i, src in enumerate(sources):
        dst = root / (names[i] if names else src.name)
        shutil.copy2(src, dst)
        out.append(dst)
    return out


def write_manifest(root: Path, manifest: dict, progress=None) -> Path:
    """Hash every file now in `root` and write bundle.json (atomically)."""
    manifest = {"format": FORMAT_NAME, "format_version": format_version_for(manifest),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **manifest,
                "tools": tool_versions(), "files": file_entries(root, progress)}
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(root / MANIFEST_NAME)
    return root / MANIFEST_NAME
