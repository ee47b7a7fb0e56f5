"""External classifiers for the policy: a local command, or a second model
bundle, judges request text before generation.

* command: the text goes to the program's stdin. With `block_labels`, the first
  word of its stdout is the label and a label in the list blocks; without, exit
  code 0 allows, 1 blocks. Any other exit code, a timeout, or a program that
  cannot start is a failure.
* bundle: the text is put into the classifier's `prompt` (at ``{text}``) and the
  second bundle generates a few greedy tokens; their first word is the label.

A failure blocks when `on_failure = "closed"` and allows when "open"; either way
the verdict says it failed, so the audit log shows it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from .policy import ClassifierSpec
from .types import GenerationRequest, GenerationResult, SamplingParams

log = logging.getLogger(__name__)

MAX_LABEL_CHARS = 64


@dataclass(frozen=True)
class Verdict:
    blocked: bool
    label: str  # the classifier's label, or what happened ("exit 3", "timeout", ...)
    failed: bool = False


class Classifier(Protocol):
    def classify(self, text: str) -> Verdict: ...


def _first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,:;!\"'()[]").lower()[:MAX_LABEL_CHARS] if words else ""


def failed(spec: ClassifierSpec, who: str, what: str, label: str | None = None) -> Verdict:
    """The verdict when the classifier could not judge: blocked or let through as on_failure says."""
    log.error("policy classifier %s: %s (failing %s)", who, what, spec.on_failure)
    return Verdict(blocked=spec.on_failure == "closed", label=label or what, failed=True)


def too_long(spec: ClassifierSpec, text: str) -> str | None:
    """Why `text` is not judged at all (never a cut: the end is where a request hides), or None."""
    if len(text) <= spec.max_text_chars:
        return None
    return f"a text of {len(text):,} characters, over max_text_chars ({spec.max_text_chars:,})"


class CommandClassifier:
    def __init__(self, spec: ClassifierSpec) -> None:
        self.spec = spec
        self.command = list(spec.command)
        self.block_labels = frozenset(label.lower() for label in spec.block_labels)

    def _failure(self, what: str) -> Verdict:
        return failed(self.spec, self.command[0], what)

    def classify(self, text: str) -> Verdict:
        if why := too_long(self.spec, text):
            return self._failure(why)
        data = text.encode("utf-8", errors="replace")
        try:
            proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            return self._failure(f"cannot start: {exc.strerror or exc}")
        try:
            out, _ = proc.communicate(data, timeout=self.spec.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return self._failure(f"timeout after {self.spec.timeout_s:g} s")
        if self.block_labels:
            if proc.returncode != 0:
                return self._failure(f"exit {proc.returncode}")
            label = _first_word(out.decode("utf-8", errors="replace"))
            return Verdict(blocked=label in self.block_labels, label=label or "(no label)")
        if proc.returncode in (0, 1):
            return Verdict(blocked=proc.returncode == 1, label=f"exit {proc.returncode}")
        return self._failure(f"exit {proc.returncode}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
    proc.communicate()


class BundleClassifier:
    """A second model as the judge (loaded once, at start-up). Requests are judged
    one at a time, under the classifier's timeout."""

    LABEL_TOKENS = 4

    def __init__(self, spec: ClassifierSpec, engine: Any) -> None:
        self.spec = spec
        self.engine = engine
        self.block_labels = frozenset(label.lower() for label in spec.block_labels)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, spec: ClassifierSpec) -> "BundleClassifier":
        from .engine import Engine

        assert spec.bundle is not None
        # no prompt cache: the text classified is one client's, the request timed by the next one another's
        return cls(spec, Engine.from_bundle(spec.bundle, prompt_cache="off"))

    def classify(self, text: str) -> Verdict:
        if why := too_long(self.spec, text):
            return failed(self.spec, "bundle", why, label="too long")
        prompt = self.spec.prompt.replace("{text}", text)
        request = GenerationRequest(mode="complete", prompt=prompt, max_tokens=self.LABEL_TOKENS,
                                    sampling=SamplingParams(temperature=0.0, top_p=1.0),
                                    deadline=time.monotonic() + self.spec.timeout_s)
        try:
            with self._lock:
                result = None
                for item in self.engine.generate(request):
                    result = item
        except Exception as exc:  # DeadlineExceeded, ContextLengthExceeded, ...
            return failed(self.spec, "bundle", f"{type(exc).__name__}: {exc}", label=type(exc).__name__)
        label = _first_word(result.text) if isinstance(result, GenerationResult) else ""
        return Verdict(blocked=label in self.block_labels, label=label or "(no label)")


def make_classifier(spec: ClassifierSpec | None) -> Classifier | None:
    if spec is None:
        return None
    if spec.command:
        return CommandClassifier(spec)
    return BundleClassifier.load(spec)
