"""Tampered bundles, refused at load with a message that names the problem.

Already proven in tests/export/test_bundle_export.py (referenced from
docs/reliability.md): a flipped byte in model.onnx / tokenizer.json / LICENSE,
external-data names with `..` or absolute paths (hashes re-made to match), a
manifest path leaving the bundle, a truncated ONNX file (hashes re-made), a
missing file, an unknown format version. Here: a flipped byte in *every* file of
the bundle including bundle.json's hash fields, and a graph swapped for another
model's with the manifest's hashes edited to match it; what real files on a board do (a link
that loops, a file the daemon's user may not read); and what only the files themselves can
tell once the hashes are edited to match (external data cut short, a tokenizer that does not
parse, a graph onnxruntime refuses, a context past the graph's rotary tables): each a
BundleError naming the file or key, exit 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from edge_runtime.bundle import MANIFEST_NAME, load_bundle
from edge_runtime.errors import BundleError, EdgeRuntimeError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rehash(bundle) -> None:
    """What an attacker with write access does: make the manifest's hashes match."""
    from edge_export.bundle_writer import write_manifest

    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    for key in ("format", "format_version", "created", "tools", "files"):
        manifest.pop(key)
    write_manifest(bundle, manifest)


def test_flipped_byte_in_every_listed_file(tiny_bundle, tmp_path):
    names = [f["path"] for f in json.loads((tiny_bundle / MANIFEST_NAME).read_text())["files"]]
    assert "model.onnx" in names and "tokenizer.json" in names
    for i, name in enumerate(names):
        bundle = _copy(tiny_bundle, tmp_path / f"b{i}")
        data = bytearray((bundle / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (bundle / name).write_bytes(bytes(data))
        with pytest.raises(BundleError, match=f"{name}: SHA-256 does not match"):
            load_bundle(bundle)


def test_flipped_byte_in_a_manifest_hash_names_the_file(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path / "b")
    text = (bundle / MANIFEST_NAME).read_text()
    manifest = json.loads(text)
    entry = next(f for f in manifest["files"] if f["path"] == "tokenizer.json")
    digest = entry["sha256"]
    flipped = digest[:10] + ("0" if digest[10] != "0" else "1") + digest[11:]
    (bundle / MANIFEST_NAME).write_text(text.replace(digest, flipped))
    with pytest.raises(BundleError, match="tokenizer.json: SHA-256 does not match"):
        load_bundle(bundle)


def test_swapped_graph_with_rehashed_manifest_is_refused_at_load(tiny_bundle, noinfill_bundle, tmp_path):
    """Another model's graph (other heads, head size and vocabulary) under this
    bundle's manifest, hashes edited to match: the engine refuses it before the
    first request, naming what does not match."""
    from edge_runtime.engine import Engine

    bundle = _copy(tiny_bundle, tmp_path / "b")
    shutil.copyfile(noinfill_bundle / "model.onnx", bundle / "model.onnx")
    _rehash(bundle)
    load_bundle(bundle)  # every hash matches: only the graph itself can tell
    with pytest.raises(EdgeRuntimeError, match=r"model.onnx does not match bundle.json.*(kv heads|head size|vocab)"):
        Engine.from_bundle(bundle)


def _verify_cli(bundle, *, without_root_reads=False):
    """`edge-runtime verify --bundle B`; `without_root_reads`: as root, without the capabilities
    that read any file whatever its mode (setpriv), as the service's own user would read it."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "edge_runtime", "verify", "--bundle", str(bundle)]
    if without_root_reads and os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    return subprocess.run(command, capture_output=True, text=True)


def test_a_file_that_is_a_looping_link_is_named_not_a_traceback(tiny_bundle, tmp_path):
    """A copy tool or a hand edit can leave tokenizer.json a link to itself."""
    bundle = _copy(tiny_bundle, tmp_path / "b")
    (bundle / "tokenizer.json").unlink()
    (bundle / "tokenizer.json").symlink_to("tokenizer.json")
    with pytest.raises(BundleError, match="'tokenizer.json' cannot be resolved inside the bundle: a symbolic link "
                                          "that loops"):
        load_bundle(bundle)
    cli = _verify_cli(bundle)
    assert cli.returncode == 2 and "tokenizer.json" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(BundleError, match="cannot be resolved: a symbolic link that loops"):
        load_bundle(loop)


@pytest.mark.parametrize("name, words", [
    ("tokenizer.json", "tokenizer.json: cannot be read: Permission denied"),
    ("bundle.json", "bundle.json cannot be read: Permission denied"),
])
def test_a_file_the_user_may_not_read_is_a_bundle_error_with_exit_2(tiny_bundle, tmp_path, name, words):
    """Copied as root and served as the edge-runtime user: the same exit (2) and naming as any
    other bundle problem, saying what to fix."""
    bundle = _copy(tiny_bundle, tmp_path / "b")
    (bundle / name).chmod(0)
    if os.geteuid() != 0:  # root reads any file in this process; the command below runs without that
        with pytest.raises(BundleError, match=words):
            load_bundle(bundle)
    cli = _verify_cli(bundle, without_root_reads=True)
    assert cli.returncode == 2 and words in cli.stderr and "must be able to read" in cli.stderr, cli.stderr


def _generate_cli(bundle):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(bundle), "--prompt",
                           "def f(", "--max-tokens", "2"], capture_output=True, text=True)


@pytest.mark.parametrize("change", ["garbage", "licence"])
def test_a_tokenizer_that_does_not_parse_is_named_before_the_session(tiny_bundle, tmp_path, change):
    """Hashes that match (the manifest edited, or tokenizer.file naming another listed file):
    only the tokenizer itself can tell. A BundleError naming the file, exit 2, no traceback."""
    from edge_runtime.engine import Engine

    bundle = _copy(tiny_bundle, tmp_path / "b")
    if change == "garbage":
        (bundle / "tokenizer.json").write_text("{not json")
        _rehash(bundle)
        name = "tokenizer.json"
    else:
        manifest = json.loads((bundle / MANIFEST_NAME).read_text())
        manifest["tokenizer"]["file"] = "LICENSE"
        (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
        name = "LICENSE"
    load_bundle(bundle)  # every hash matches
    with pytest.raises(BundleError, match=f"{name} \\(bundle.json's tokenizer.file\\) in bundle .* is not a "
                                          "tokenizer this runtime reads"):
        Engine.from_bundle(bundle)
    cli = _generate_cli(bundle)
    assert cli.returncode == 2 and name in cli.stderr and "Traceback" not in cli.stderr, cli.stderr


def test_external_data_shorter_than_the_graph_reads_is_refused_before_onnxruntime(tiny_bundle, tmp_path):
    """model.onnx.data cut short and the manifest's hashes edited to match: named by the
    loader (which tensor, how many bytes), not an onnxruntime traceback at session creation."""
    bundle = _copy(tiny_bundle, tmp_path / "b")
    data = bundle / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    _rehash(bundle)
    with pytest.raises(BundleError, match=r"external data file 'model.onnx.data' has \d+ bytes, but model.onnx reads "
                                          r"up to byte \d+ of it \(tensor '.+'\)"):
        load_bundle(bundle)
    cli = _verify_cli(bundle)
    assert cli.returncode == 2 and "model.onnx.data" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr


def test_a_context_limit_raised_past_the_graph_is_named_not_a_traceback(tiny_bundle, tmp_path):
    """bundle.json edited by hand for a longer context (not pinned, so no hash stops it): the
    graph's rotary tables were built for the exported context; the engine says so."""
    from edge_runtime.engine import Engine

    bundle = _copy(tiny_bundle, tmp_path / "b")
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["context_limit"] *= 2
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"bundle.json's context_limit \(\d+\) is more than model.onnx's rotary "
                                          r"tables cover \(\d+ positions\)"):
        Engine.from_bundle(bundle)
    cli = _generate_cli(bundle)
    assert cli.returncode == 2 and "context_limit" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr


def test_a_manifest_nested_too_deep_is_refused_not_a_recursion_traceback(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path / "b")
    (bundle / MANIFEST_NAME).write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(BundleError, match="bundle.json is not a bundle manifest: its JSON nests too deep"):
        load_bundle(bundle)
    cli = _verify_cli(bundle)
    assert cli.returncode == 2 and "nests too deep" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr


def test_a_graph_onnxruntime_cannot_load_is_a_bundle_error_with_exit_2(tiny_bundle, tmp_path):
    """model.onnx a well-formed protobuf with no graph (hashes edited to match): the loader's scan
    finds nothing wrong; onnxruntime refuses it, and that is said as a bundle problem."""
    from edge_runtime.engine import Engine

    bundle = _copy(tiny_bundle, tmp_path / "b")
    (bundle / "model.onnx").write_bytes(b"\x08\x07")  # ModelProto with ir_version 7 and nothing else
    _rehash(bundle)
    load_bundle(bundle)
    with pytest.raises(BundleError, match=r"onnxruntime \S+ could not create a session for model.onnx of bundle "):
        Engine.from_bundle(bundle)
    cli = _generate_cli(bundle)
    assert cli.returncode == 2 and "model.onnx" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr


def test_a_graph_whose_tensor_fields_have_the_wrong_wire_type_is_not_a_valid_onnx_file(tiny_bundle, tmp_path):
    """A damaged model.onnx (hashes edited to match) whose initializer's dims field is a
    fixed64: the loader's scan says the file is not valid ONNX, not a TypeError traceback."""
    def field(number, wire, payload):
        return bytes([number << 3 | wire]) + payload

    def length_delimited(number, body):
        return field(number, 2, bytes([len(body)]) + body)

    tensor = field(1, 1, b"\0" * 8) + length_delimited(13, length_delimited(1, b"location") +
                                                       length_delimited(2, b"model.onnx.data"))
    bundle = _copy(tiny_bundle, tmp_path / "b")
    (bundle / "model.onnx").write_bytes(length_delimited(7, length_delimited(5, tensor)))
    _rehash(bundle)
    with pytest.raises(BundleError, match="model.onnx is not a valid ONNX file"):
        load_bundle(bundle)
