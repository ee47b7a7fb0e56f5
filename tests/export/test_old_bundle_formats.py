"""Bundles in the field were exported months ago by older versions of this code, and their
bundle.json lacks what later exporters record. Each older shape is described here as what it
lacks against this exporter's (the keys of bundles exported at those commits, compared key by
key): a copy of the tiny bundle with its manifest cut so must load and give the same greedy
tokens, in every mode, as with the manifest this exporter writes (the graph is the same file).
The older graphs themselves are tested where they are built: the optimum flavour
(`--graph optimum`) beside the fused one, and the int8 cache graph of revision 4
(tests/export/test_kv_cache_quant.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_runtime.bundle import MANIFEST_NAME, load_bundle
from edge_runtime.engine import Engine
from edge_runtime.types import GenerationRequest, Message, SamplingParams

GREEDY = SamplingParams(temperature=0.0)
REQUESTS = (GenerationRequest(mode="complete", prompt="def fib(n):", max_tokens=12, sampling=GREEDY),
            GenerationRequest(mode="infill", prefix="def add(a, b):\n    ", suffix="\n    return c", max_tokens=12,
                              sampling=GREEDY),
            GenerationRequest(mode="chat", messages=(Message("user", "Reverse a list."),), max_tokens=12,
                              sampling=GREEDY))

# What each older exporter's bundle.json lacks (dotted keys), from bundles exported at these commits
OLDER_MANIFESTS = {
    # the first exporter: no family detection, no KV cache section, no stop ids
    "d4d945a-dd39390 (2026-11-23)": ("family", "kv_cache", "tokenizer.stop_ids"),
    # family detection on, up to the release before stop ids (8d563cd ... 51cc5fc)
    "8d563cd-51cc5fc (2026-11-23 to 2026-12-03)": ("tokenizer.stop_ids",),
    # bundle.py reads a profile without kv_cache_dtype as the profile's own: keep it so
    "without profile.kv_cache_dtype": ("family", "kv_cache", "tokenizer.stop_ids", "profile.kv_cache_dtype"),
}


def answers(bundle: Path) -> list[tuple[tuple[int, ...], str]]:
    engine = Engine.from_bundle(bundle, "cpu-x86_64")
    return [(tuple(r.token_ids), r.finish_reason) for r in map(engine.complete, REQUESTS)]


@pytest.fixture(scope="module")
def current_answers(tiny_bundle):
    return answers(tiny_bundle)


@pytest.mark.parametrize("lacks", OLDER_MANIFESTS.values(), ids=OLDER_MANIFESTS.keys())
def test_an_older_exporters_manifest_loads_and_answers_as_this_ones(tiny_bundle, tmp_path, current_answers, lacks):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "old")
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    for dotted in lacks:
        *parents, key = dotted.split(".")
        section = manifest
        for parent in parents:
            section = section[parent]
        del section[key]
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))

    loaded = load_bundle(bundle)
    assert loaded.manifest["format_version"] == 1 and loaded.stop_ids == frozenset()
    if "family" in lacks:  # derived from the architecture and the tokenizer section
        assert loaded.family.variant == "unknown" and loaded.family.size_class == "custom"
        assert loaded.family.supports_infill and loaded.family.chat_format == "llama2"
    assert answers(bundle) == current_answers
    assert any(finish == "length" for _, finish in current_answers)  # the requests generate


def test_version_names_the_bundle_formats_this_runtime_reads():
    """Every version so far calls itself 0.1.0, and pip skips a wheel of the version installed:
    `--version` also names the formats the installed code reads, which tells this runtime (and
    later ones) from those that read format 1 only (docs/deployment.md, "Upgrade the runtime")."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "edge_runtime", "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().endswith("(bundle format_version 1, 2)")


def test_version_is_the_packages_and_above_the_versions_that_all_said_0_1_0():
    """pip installs a wheel over an installed version only when the wheel's is higher: this
    version's must be above 0.1.0 (every version up to 2026-12-03), and `--version` (and the
    status topic's `version`) must say the number pip installed, pyproject.toml's."""
    import pathlib
    import subprocess
    import sys
    import edge_runtime
    from edge_runtime.typed_toml import tomllib  # tomli on Python 3.10

    repo = pathlib.Path(__file__).resolve().parents[2]
    packaged = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"]
    assert edge_runtime.__version__ == packaged
    assert tuple(map(int, packaged.split("."))) > (0, 1, 0)
    out = subprocess.run([sys.executable, "-m", "edge_runtime", "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith(f"edge-runtime {packaged} ")
