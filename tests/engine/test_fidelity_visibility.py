"""A bundle exported with --skip-fidelity (never measured) or --allow-degraded (below its
profile's thresholds) loads and serves like any other: verify, the engine's log and the
daemon's retained status must say so, or nobody on the device side can tell."""

import json
import logging
import shutil
import subprocess
import sys

import pytest

from edge_runtime.engine import Engine
from edge_runtime.protocol import encode_status


def verify(bundle, *flags):
    return subprocess.run([sys.executable, "-m", "edge_runtime", "verify", "--bundle", str(bundle), *flags],
                          capture_output=True, text=True)


def status_of(engine) -> dict:
    return json.loads(encode_status("online", device_id="d", model_info=engine.info, queue_depth=0, queue_limit=1,
                                    version="x"))


@pytest.fixture(scope="module")
def unmeasured_bundle(tiny_checkpoint, tmp_path_factory, exporter):
    return exporter(tiny_checkpoint, tmp_path_factory.mktemp("skip") / "b", skip_fidelity=True)


def test_a_bundle_never_measured_says_so_in_verify_the_log_and_the_status(unmeasured_bundle, caplog):
    assert json.loads((unmeasured_bundle / "bundle.json").read_text())["fidelity"]["skipped"] is True
    for flags in ((), ("--quiet",)):
        cli = verify(unmeasured_bundle, *flags)
        assert cli.returncode == 0 and cli.stdout.startswith("ok: "), cli.stderr  # the files are intact
        assert "warning: fidelity NOT MEASURED" in cli.stderr and "--skip-fidelity" in cli.stderr
    with caplog.at_level(logging.WARNING, logger="edge_runtime.engine"):
        engine = Engine.from_bundle(unmeasured_bundle)
    assert any("NOT MEASURED" in r.getMessage() for r in caplog.records)
    fid = status_of(engine)["fidelity"]
    assert fid["measured"] is False and fid["passed"] is False and fid["greedy_agreement"] is None


def test_a_measured_bundle_shows_its_numbers_and_no_warning(tiny_bundle, caplog):
    manifest = json.loads((tiny_bundle / "bundle.json").read_text())["fidelity"]
    assert manifest["passed"] is True
    cli = verify(tiny_bundle)
    assert cli.returncode == 0 and "warning" not in cli.stderr
    assert "passed the cpu-x86_64 profile's thresholds" in cli.stderr
    assert f"greedy agreement {manifest['greedy_agreement']:.3f}" in cli.stderr
    assert "fidelity" not in verify(tiny_bundle, "--quiet").stderr
    with caplog.at_level(logging.WARNING, logger="edge_runtime.engine"):
        engine = Engine.from_bundle(tiny_bundle)
    assert not any("fidelity" in r.getMessage() for r in caplog.records)
    fid = status_of(engine)["fidelity"]
    assert fid["measured"] is True and fid["passed"] is True and fid["profile"] == "cpu-x86_64"
    assert fid["greedy_agreement"] == manifest["greedy_agreement"]
    assert fid["max_logit_diff"] == manifest["max_logit_diff"]
    assert fid["greedy_agreement_strict"] == manifest["greedy_agreement_strict"]


def test_a_degraded_bundle_is_flagged_below_threshold(tiny_bundle, tmp_path, caplog):
    """What an --allow-degraded export writes (tests/export/test_quantized_fidelity.py makes one
    for a stricter profile): passed false, degraded true, the problems named."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["fidelity"].update(passed=False, degraded=True, problems=["greedy agreement 0.500 < 0.980"],
                                greedy_agreement=0.5)
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    cli = verify(bundle, "--quiet")
    assert cli.returncode == 0
    assert "warning: fidelity BELOW the cpu-x86_64 profile's thresholds" in cli.stderr
    assert "greedy agreement 0.500 < 0.980" in cli.stderr
    with caplog.at_level(logging.WARNING, logger="edge_runtime.engine"):
        engine = Engine.from_bundle(bundle)
    assert any("BELOW" in r.getMessage() for r in caplog.records)
    fid = status_of(engine)["fidelity"]
    assert fid["measured"] is True and fid["passed"] is False and fid["greedy_agreement"] == 0.5


@pytest.mark.parametrize("odd", [None, float("nan"), 10**400, "0.4", True])
def test_a_recorded_measure_with_a_missing_or_odd_number_is_still_described(odd):
    """verify prints, the engine logs and the status carries whatever a manifest records: a
    measured fidelity whose max logit difference is missing, NaN (an --allow-degraded export
    of a NaN graph), too large for a float, text or a bool must read as "?" / null, never stop
    verify (after its "ok") or the engine's load with a TypeError or OverflowError."""
    from edge_runtime.fidelity_record import FidelityRecord

    fidelity = {"greedy_agreement": 0.5, "passed": False, "problems": ["max logit diff nan > 2.0"],
                "threshold": {"min_greedy_agreement": 0.9, "max_logit_diff": 2.0}}
    if odd is not None:
        fidelity["max_logit_diff"] = odd
    record = FidelityRecord.from_manifest({"fidelity": fidelity, "profile": {"name": "cpu-x86_64"}})
    assert record.measured and not record.trusted
    assert "max logit diff ? (threshold 2)" in record.describe() and "BELOW" in record.describe()
    status = record.as_status()
    assert status["max_logit_diff"] is None and json.loads(json.dumps(status, allow_nan=False)) == status
