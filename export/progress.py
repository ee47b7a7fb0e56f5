"""Progress for long export steps: one line per step with its time and the
process's peak resident memory so far, on stderr."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from edge_runtime.memory_fit import human_bytes


def peak_rss_bytes() -> int:
    """Peak resident set size of this process and its finished children (Linux: ru_maxrss is KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * 1024


class Progress:
    def __init__(self, total_steps: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = total_steps
        self.index = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.timings: dict[str, float] = {}

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.index += 1
        self.say(f"[{self.index}/{self.total}] {name} ...")
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.timings[name] = elapsed
        self.say(f"[{self.index}/{self.total}] {name}: done in {elapsed:.1f} s "
                 f"(peak memory {human_bytes(peak_rss_bytes())})")

    def detail(self, text: str) -> None:
        self.say(f"      {text}")
