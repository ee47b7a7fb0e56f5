"""A session stand-in for tests of a failed onnxruntime run (a kernel error mid-prompt)."""

from __future__ import annotations


class FailingRuns:
    """The session, with its `fail_at`-th run raising as onnxruntime does on an error."""

    def __init__(self, session, fail_at: int) -> None:
        self.session, self.fail_at, self.runs = session, fail_at, 0

    def run_with_iobinding(self, binding, options=None):
        self.runs += 1
        if self.runs == self.fail_at:
            raise RuntimeError("onnxruntime: a kernel failed")
        return self.session.run_with_iobinding(binding, options)
