"""How the command line's log lines look: timestamped on a terminal or in a file; in
systemd's journal, with the syslog priority journald stores for each line and without
the timestamp journald adds itself.

systemd connects a service's stderr to the journal and says so in ``$JOURNAL_STREAM``
(``DEVICE:INODE`` of that stream). A line that starts with ``<N>`` (sd-daemon's prefixes:
3 error, 4 warning, 6 info, 7 debug) is stored with priority N (``SyslogLevelPrefix=``,
on by default): `journalctl -u edge-runtime -p warning` then finds the warnings and
errors, which were all stored as info."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # --log-level and [service] log_level
TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"


def journal_priority(levelno: int) -> int:
    """The syslog priority of a logging level (sd-daemon.h's SD_ERR ... SD_DEBUG)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def journal_lines(text: str, priority: int) -> str:
    """`text` with the `<priority>` prefix on every line: journald reads each line as an entry."""
    return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


class JournalFormatter(logging.Formatter):
    """``<priority>name: message``; a multi-line record (a traceback) keeps its priority on
    every line, since journald reads each line as an entry of its own."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return journal_lines(super().format(record), journal_priority(record.levelno))


def writes_to_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `stream` is the journal stream systemd names in ``$JOURNAL_STREAM``."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):  # unset or malformed, or a stream with no file
        return False


def configure_logging(level: str | int, stream: TextIO | None = None) -> None:
    """The root logger's one handler on `stream` (default stderr), formatted for the
    journal or for a terminal."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if writes_to_journal(stream) else logging.Formatter(TERMINAL_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
