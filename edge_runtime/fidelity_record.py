"""What a bundle's manifest says of its accuracy against the original model.

The export measures the quantized graph against torch fp32 (export/fidelity.py) and
records the numbers, the export profile's thresholds and the verdict under
bundle.json's `fidelity`. An export with `--skip-fidelity` records ``{"skipped": true}``
and one with `--allow-degraded` may record a bundle below the thresholds. Both load and
serve like any other, so the device side says so: `verify` prints the verdict, the
engine logs a warning at load, and the daemon's retained status carries it
(`FidelityRecord.as_status`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .types import is_number


def _number(value: Any) -> float | None:
    """A finite number as a float; anything else (missing, NaN, text, 10**400) None: not a figure to show."""
    return float(value) if is_number(value) else None


def _shown(value: float | None, spec: str) -> str:
    return "?" if value is None else format(value, spec)


@dataclass(frozen=True)
class FidelityRecord:
    measured: bool  # False: exported with --skip-fidelity (or a manifest without the measure)
    passed: bool  # measured and within the export profile's thresholds
    profile: str | None  # the profile whose thresholds were applied (the export's)
    greedy_agreement: float | None = None  # through ties (export/fidelity.py)
    greedy_agreement_strict: float | None = None  # every flip a difference: what greedy output shares
    max_logit_diff: float | None = None
    kl_divergence_mean: float | None = None
    min_greedy_agreement: float | None = None
    max_logit_diff_allowed: float | None = None
    problems: tuple[str, ...] = ()

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "FidelityRecord":
        """Never raises: a field that is missing or of another type reads as not measured
        (or not passed), the cautious reading."""
        fid = manifest.get("fidelity")
        profile = manifest.get("profile")
        name = profile.get("name") if isinstance(profile, dict) and isinstance(profile.get("name"), str) else None
        if not isinstance(fid, dict) or fid.get("skipped") or "greedy_agreement" not in fid:
            return cls(measured=False, passed=False, profile=name)
        threshold = fid.get("threshold") if isinstance(fid.get("threshold"), dict) else {}
        problems = fid.get("problems") if isinstance(fid.get("problems"), list) else []
        return cls(measured=True, passed=fid.get("passed") is True, profile=name,
                   greedy_agreement=_number(fid.get("greedy_agreement")),
                   greedy_agreement_strict=_number(fid.get("greedy_agreement_strict")),
                   max_logit_diff=_number(fid.get("max_logit_diff")),
                   kl_divergence_mean=_number(fid.get("kl_divergence_mean")),
                   min_greedy_agreement=_number(threshold.get("min_greedy_agreement")),
                   max_logit_diff_allowed=_number(threshold.get("max_logit_diff")),
                   problems=tuple(str(p) for p in problems))

    @property
    def trusted(self) -> bool:
        """Measured at export and within its profile's thresholds."""
        return self.measured and self.passed

    def as_status(self) -> dict[str, Any]:
        """The daemon's retained status `fidelity` (docs/protocol.md)."""
        return {"measured": self.measured, "passed": self.passed, "profile": self.profile,
                "greedy_agreement": self.greedy_agreement, "greedy_agreement_strict": self.greedy_agreement_strict,
                "max_logit_diff": self.max_logit_diff, "kl_divergence_mean": self.kl_divergence_mean}

    def describe(self) -> str:
        """One line for `verify` and the engine's log."""
        if not self.measured:
            return ("fidelity NOT MEASURED: the bundle was exported with --skip-fidelity; its accuracy against the "
                    "original model was never checked (export it again without --skip-fidelity)")
        numbers = (f"greedy agreement {_shown(self.greedy_agreement, '.3f')} (threshold "
                   f"{_shown(self.min_greedy_agreement, 'g')}")
        if self.greedy_agreement_strict is not None:
            numbers += f"; {self.greedy_agreement_strict:.3f} with ties as differences"
        numbers += (f"), max logit diff {_shown(self.max_logit_diff, '.4g')} (threshold "
                    f"{_shown(self.max_logit_diff_allowed, 'g')})")
        if self.kl_divergence_mean is not None:
            numbers += f", corpus KL divergence {self.kl_divergence_mean:.4g}"
        if self.passed:
            return f"fidelity measured at export, passed the {self.profile} profile's thresholds: {numbers}"
        return (f"fidelity BELOW the {self.profile} profile's thresholds (exported with --allow-degraded): {numbers}"
                + (f"; {'; '.join(self.problems)}" if self.problems else ""))
