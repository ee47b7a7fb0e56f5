"""benchmarks/export_bench.py on the tiny checkpoint: one export per precision in its own
process, its time, peak memory and bundle size, with the export flags passed through."""

from __future__ import annotations

import json

from edge_runtime.bundle import load_bundle


def test_measures_an_export_with_the_flags_passed_through(export_bench, tiny_checkpoint, tmp_path, capsys,
                                                          monkeypatch):
    kept = tmp_path / "kept"
    real_run_export = export_bench.run_export

    def run_and_keep(checkpoint, precision, profile, out, skip_fidelity, extra):
        row = real_run_export(checkpoint, precision, profile, out, skip_fidelity, extra)
        out.rename(kept)  # the benchmark deletes its bundles; keep this one to look at
        return row

    monkeypatch.setattr(export_bench, "run_export", run_and_keep)
    out = tmp_path / "rows.json"
    assert export_bench.main(["--checkpoint", str(tiny_checkpoint), "--precision", "int4", "--skip-fidelity",
                              "--algorithm", "rtn", "--graph", "fused", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["precision"] == "int4" and row["seconds"] > 0 and row["peak_rss_mib"] > 50
    assert row["greedy_agreement"] is None  # --skip-fidelity
    bundle = load_bundle(kept)
    assert bundle.graph_flavour == "gqa-shared-kv" and bundle.manifest["quantization"]["algorithm"] == "rtn"
    assert row["bundle_mib"] == round(sum(f["size"] for f in bundle.manifest["files"]) / 2**20, 1)
    assert "int4" in capsys.readouterr().out
