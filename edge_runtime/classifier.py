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
import selectors
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
MAX_STDOUT_BYTES = 64 * 1024  # of a command's stdout, what is kept: its first word is the label
EXIT_POLL_S = 0.05  # how often a command whose stdout stays open is checked for having exited


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

    def _failure(self, what: str, label: str | None = None) -> Verdict:
        return failed(self.spec, self.command[0], what, label)

    def classify(self, text: str) -> Verdict:
        if why := too_long(self.spec, text):
            return self._failure(why)
        data = text.encode("utf-8", errors="replace")
        try:
            proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            return self._failure(f"cannot start: {exc.strerror or exc}")
        out = None
        try:
            out = _exchange(proc, data, time.monotonic() + self.spec.timeout_s)
        finally:
            if out is None:  # past its time (or the exchange failed): it and what it started end here
                _kill_group(proc)
            _close_pipes(proc)
        if out is None:
            return self._failure(f"timeout after {self.spec.timeout_s:g} s")
        if self.block_labels:
            if proc.returncode != 0:
                return self._failure(f"exit {proc.returncode}")
            label = _first_word(out.decode("utf-8", errors="replace"))
            if not label:  # it said nothing: not a judgement
                return self._failure("no label on stdout", label="(no label)")
            return Verdict(blocked=label in self.block_labels, label=label)
        if proc.returncode in (0, 1):
            return Verdict(blocked=proc.returncode == 1, label=f"exit {proc.returncode}")
        return self._failure(f"exit {proc.returncode}")


def _exchange(proc: subprocess.Popen, data: bytes, deadline: float) -> bytes | None:
    """Write `data` to the program's stdin and read its stdout (the first MAX_STDOUT_BYTES of it;
    the rest is read and dropped) until it exits, or None when `deadline` passes first. Unlike
    `communicate`, neither a program that prints without end nor one that leaves a process of
    its own holding stdout (one that escaped the process group) can hold the worker past it:
    once the program has exited and its stdout has nothing more to read, it is done."""
    assert proc.stdin is not None and proc.stdout is not None
    out = bytearray()
    with selectors.DefaultSelector() as sel:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ)
        sent = 0
        if not data:
            sel.unregister(proc.stdin.fileno())
            proc.stdin.close()
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready = sel.select(min(left, EXIT_POLL_S))
            if not ready and proc.poll() is not None:
                break  # it has exited and all it wrote is read; a process it left behind holds the pipe
            for key, _ in ready:
                if key.fd == proc.stdout.fileno():
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fd)
                    out += chunk[:MAX_STDOUT_BYTES - len(out)]
                    continue
                try:
                    sent += os.write(key.fd, data[sent:sent + 65536])
                except BlockingIOError:
                    continue
                except BrokenPipeError:  # it does not read its stdin (it may judge by other means)
                    sent = len(data)
                if sent >= len(data):
                    sel.unregister(key.fd)
                    proc.stdin.close()
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # stdout closed, but it goes on
        return None
    return bytes(out)


def _kill_group(proc: subprocess.Popen) -> None:
    """End the program's process group (it may have started others), and the program."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _close_pipes(proc: subprocess.Popen) -> None:
    """Close the program's pipes, never reading them to their end (a process it started may hold them)."""
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:  # stdin with unwritten bytes of a program that is gone
                pass


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
        if not label:  # it said nothing (an end token first): not a judgement
            return failed(self.spec, "bundle", "no label generated", label="(no label)")
        return Verdict(blocked=label in self.block_labels, label=label)


def make_classifier(spec: ClassifierSpec | None) -> Classifier | None:
    if spec is None:
        return None
    if spec.command:
        return CommandClassifier(spec)
    return BundleClassifier.load(spec)
