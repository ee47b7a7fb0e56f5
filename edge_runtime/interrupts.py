"""SIGTERM and SIGHUP as interruptions: the long workstation and install commands (export,
demo-model, install-service) clean up after Ctrl-C's KeyboardInterrupt; a `timeout`, a
cancelled CI job or `docker stop` (SIGTERM) and a dropped ssh session (SIGHUP) killed them on
the spot instead, leaving their staging folders (as large as the bundle) behind."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C's KeyboardInterrupt would be, so the same cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While open, SIGTERM and SIGHUP raise `Terminated`. A signal ignored when the command
    started (`nohup`) stays ignored. Main thread only (where Python runs signal handlers)."""
    def raise_terminated(signum, frame):
        raise Terminated(signum)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, raise_terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
