"""The policy's audit log: one JSON object per line in the state directory
(``audit.jsonl``, rotated to ``audit.jsonl.1`` past a size), written when a rule,
limit or the classifier refuses, stops or flags a request.

Each event holds the time, request id, client id, mode, rule, action, where it
matched and the SHA-256 of the text that was checked; the text itself only when
the policy's ``[audit] record_text`` is on. `edge-runtime audit` reads it back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .durable_files import fsync_path
from .policy import text_sha256

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"


@dataclass(frozen=True)
class AuditEvent:
    ts: float  # seconds since the epoch
    request_id: str
    client_id: str
    mode: str
    rule: str
    action: str  # refuse | stop | flag
    where: str  # input | output | limit | classifier
    text_sha256: str
    text: str | None = None
    detail: str = ""

    @property
    def time_iso(self) -> str:
        return _iso(self.ts)


class AuditLog:
    """Appends events; thread-safe. A write that fails (disk full, read-only) is
    logged as an error and counted in `failed_writes`; the decision it records
    still takes effect."""

    def __init__(self, path: Path, *, record_text: bool = False, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.record_text = record_text
        self.max_bytes = max_bytes
        self.failed_writes = 0
        self._lock = threading.Lock()

    def record(self, *, request_id: str, client_id: str, mode: str, rule: str, action: str, where: str,
               text: str, detail: str = "") -> AuditEvent:
        event = AuditEvent(ts=round(time.time(), 3), request_id=request_id, client_id=client_id, mode=mode,
                           rule=rule, action=action, where=where, text_sha256=text_sha256(text),
                           text=text if self.record_text else None, detail=detail)
        fields = {k: v for k, v in asdict(event).items() if v is not None and v != ""}
        line = json.dumps(fields, ensure_ascii=False, separators=(",", ":")) + "\n"
        log.warning("policy: request %r from client %r: rule %r -> %s (%s)", request_id, client_id or "-",
                    rule, action, where)
        data = line.encode("utf-8", errors="surrogatepass")
        with self._lock:
            try:
                self._rotate_if_needed(len(data))
                created = not self.path.exists()
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    size = os.fstat(fd).st_size
                    if size and os.pread(fd, 1, size - 1) != b"\n":
                        # the last line was cut short (a crash, a full disk): end it, or this event
                        # would be glued to it and skipped with it
                        data = b"\n" + data
                    while data:  # a write can take part of the line (a disk that fills up)
                        data = data[os.write(fd, data):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if created:  # the file's name (and a rotation's rename before it), on the disk too
                    fsync_path(self.path.parent)
            except OSError as exc:
                self.failed_writes += 1
                log.error("policy: could not write the audit log %s: %s", self.path, exc.strerror or exc)
        return event

    def _rotate_if_needed(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size + incoming > self.max_bytes:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))


# The latest time an event can have (9999-12-31T23:59:59Z, the last one a listing can print).
_LATEST_TS = 253402300799.0
_REQUIRED_STRINGS = ("request_id", "client_id", "mode", "rule", "action", "where", "text_sha256")


def _brief(value: object) -> str:
    shown = json.dumps(value, ensure_ascii=True)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def event_from_json(obj: object) -> AuditEvent:
    """The event one parsed line holds. ValueError, saying what is wrong, when it is not one:
    a required key missing, or one of the wrong type (`ts`: finite seconds since the epoch,
    up to the year 9999; `text`: a string or null; the others strings). Keys it does not know
    (a newer daemon's) are ignored."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_brief(obj)}")
    missing = [key for key in ("ts", *_REQUIRED_STRINGS) if key not in obj]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    ts = obj["ts"]
    # NaN fails both comparisons; infinity and 1e20 the second
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0 <= ts <= _LATEST_TS:
        raise ValueError(f"ts: expected seconds since the epoch, got {_brief(ts)}")
    for key in (*_REQUIRED_STRINGS, "text", "detail"):
        value = obj.get(key)
        if not isinstance(value, str) and not (value is None and key in ("text", "detail")):
            raise ValueError(f"{key}: expected a string, got {_brief(value)}")
    return AuditEvent(ts=ts, **{key: obj[key] for key in _REQUIRED_STRINGS}, text=obj.get("text"),
                      detail=obj.get("detail") or "")


def read_events(path: Path) -> Iterator[AuditEvent]:
    """Events of `path` and its rotated predecessor, oldest first. Lines that are
    not valid events (a write cut short by a crash, a field of the wrong type) are
    skipped with a warning naming the file, the line and what is wrong; keys an
    event does not have (a newer daemon's) are ignored."""
    path = Path(path)
    for p in (path.with_name(path.name + ".1"), path):
        try:
            lines = p.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        except FileNotFoundError:
            continue
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                event = event_from_json(json.loads(line))
            except ValueError as exc:  # json's errors are ValueErrors too
                log.warning("%s:%d: not an audit event (%s); skipped", p, n, exc)
                continue
            except RecursionError:  # json nested thousands deep
                log.warning("%s:%d: not an audit event (nested too deeply); skipped", p, n)
                continue
            yield event


_AGO = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd])", re.ASCII)  # ASCII digits: float() takes no '²'
# An ISO 8601 date and time as `date -I...`, `date +%FT%T%z` and logs print them: 2026-12-03 or
# 20261203; then T or a space and 10, 10:00, 10:00:00 or 100000, a fraction after '.' or ',' (any
# number of digits, microseconds kept); then (or after the date alone) Z, +01, +01:00 or +0100. Read here, not by
# datetime.fromisoformat, which before Python 3.11 reads only isoformat()'s own forms: on
# Python 3.10 (JetPack 6, Ubuntu 22.04) it refused +0100, a 9-digit or 1-digit fraction and ','.
_ISO_TIME = re.compile(
    r"(?P<year>\d{4})(?P<dash>-?)(?P<month>\d{2})(?P=dash)(?P<day>\d{2})"
    r"(?:[T ](?P<hour>\d{2})(?:(?P<colon>:?)(?P<minute>\d{2})(?:(?P=colon)(?P<second>\d{2})"
    r"(?:[.,](?P<fraction>\d+))?)?)?)?"
    r"(?P<zone>Z|(?P<sign>[+-])(?P<zone_hours>\d{2})(?::?(?P<zone_minutes>\d{2}))?)?", re.ASCII)


def _iso_time(value: str) -> float | None:
    """Seconds since the epoch of an ISO 8601 time of the forms _ISO_TIME reads (UTC when it
    names no zone); None for any other text. ValueError for an impossible date or time."""
    m = _ISO_TIME.fullmatch(value)
    if m is None:
        return None
    zone = timezone.utc
    if m["sign"]:
        offset = timedelta(hours=int(m["zone_hours"]), minutes=int(m["zone_minutes"] or 0))
        zone = timezone(-offset if m["sign"] == "-" else offset)  # ValueError from +24:00 on
    microseconds = int((m["fraction"] or "0")[:6].ljust(6, "0"))
    moment = datetime(int(m["year"]), int(m["month"]), int(m["day"]), int(m["hour"] or 0), int(m["minute"] or 0),
                      int(m["second"] or 0), microseconds, tzinfo=zone)
    return moment.timestamp()


def parse_since(value: str, now: float | None = None) -> float:
    """'30m', '2h', '7d' (ago) or an ISO 8601 time -> seconds since the epoch. ValueError
    naming --since for anything else, the empty text included."""
    now = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    wrong = ValueError(f"--since: expected e.g. 30m, 2h, 7d or an ISO time, got {value!r}")
    if ago := _AGO.fullmatch(value):
        seconds = float(ago[1]) * units[ago[2]]
        if not math.isfinite(seconds):
            raise wrong
        return now - seconds
    try:
        moment = _iso_time(value)
    except (ValueError, OverflowError):
        raise wrong from None
    if moment is None:
        raise wrong
    return moment


def events_since(events: Iterable[AuditEvent], since: float) -> list[AuditEvent]:
    """The events after the last one stamped before `since`. The log is in the order the events
    happened, whatever their stamps say: an event stamped at or after `since` that an event stamped
    before it follows was written before the clock went back (a board without a battery-backed clock
    starts at the same date at every boot), so before that event: not since. With a clock that never
    went back, the events stamped at or after `since`."""
    kept: list[AuditEvent] = []
    for e in events:
        if e.ts < since:
            kept.clear()
        else:
            kept.append(e)
    return kept


# A stamp this much earlier than the one before it: the clock went back (threads stamp an event
# before they take the log's lock, so two may be written a few milliseconds out of order).
CLOCK_BACK_S = 60.0


# A stamp this much after the reading machine's clock: one of the two clocks is wrong.
CLOCK_AHEAD_S = 300.0


def clock_jumps_back(events: Iterable[AuditEvent]) -> list[tuple[AuditEvent, AuditEvent]]:
    """(before, after) for each pair of consecutive events whose stamps go back CLOCK_BACK_S or more."""
    jumps = []
    previous: AuditEvent | None = None
    for e in events:
        if previous is not None and e.ts <= previous.ts - CLOCK_BACK_S:
            jumps.append((previous, e))
        previous = e
    return jumps


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def clock_notes(events: list[AuditEvent], now: float | None = None) -> list[str]:
    """What a reader of `events` (the whole log, in order) must know of the clocks that stamped
    them: where the stamps go back, and stamps after this machine's clock (`now`)."""
    now = time.time() if now is None else now
    notes = []
    if jumps := clock_jumps_back(events):
        before, after = jumps[-1]
        notes.append(f"the clock that stamped this log went back {len(jumps)} time{'s' if len(jumps) > 1 else ''}, "
                     f"the last from {before.time_iso} to {after.time_iso} (a board without a battery-backed clock "
                     "starts at the same date at every boot; set its clock, docs/deployment.md): events are listed "
                     "in the order they happened, so their stamps go back there, and --since keeps only the events "
                     "after the last one stamped before its time")
    latest = max(events, key=lambda e: e.ts, default=None)
    if latest is not None and latest.ts - now > CLOCK_AHEAD_S:
        notes.append(f"events are stamped up to {latest.time_iso}, {(latest.ts - now) / 86400:.1f} days after this "
                     f"machine's clock ({_iso(now)}): one of the two clocks is wrong (a board without a "
                     "battery-backed clock starts at the same date at every boot; set its clock, "
                     "docs/deployment.md), and --since counts back from this machine's clock")
    return notes


def filter_events(events: Iterable[AuditEvent], *, client: str | None = None, rule: str | None = None,
                  action: str | None = None, request_id: str | None = None,
                  since: float | None = None) -> Iterator[AuditEvent]:
    """The events that match every filter given; `since`: `events_since`."""
    for e in (events if since is None else events_since(events, since)):
        if ((client is None or e.client_id == client) and (rule is None or e.rule == rule)
                and (action is None or e.action == action) and (request_id is None or e.request_id == request_id)):
            yield e


def _shown(value: str) -> str:
    """A string of the log on one line as it is, or escaped (a newline, a carriage return or an
    ANSI escape in a request id would forge or hide lines of the listing; a lone surrogate, from
    bytes of the file that are not UTF-8, could not be printed at all)."""
    if value.isprintable():
        return value
    return json.dumps(value, ensure_ascii=False)[1:-1].encode("utf-8", "backslashreplace").decode("utf-8")


def format_event(e: AuditEvent) -> str:
    line = (f"{e.time_iso}  {_shown(e.action):<6} {_shown(e.where):<10} rule={_shown(e.rule)}  "
            f"client={_shown(e.client_id) or '-'}  request={_shown(e.request_id)}  mode={_shown(e.mode)}  "
            f"sha256={_shown(e.text_sha256[:16])}")
    if e.detail:
        line += f"  ({_shown(e.detail)})"
    if e.text is not None:
        line += f"\n    text: {e.text!r}"
    return line


def event_json(e: AuditEvent) -> str:
    """The event as one line of JSON (`audit --json`): as written, or with \\u escapes where a
    string holds a lone surrogate (bytes of the file that are not UTF-8), which cannot be printed."""
    fields = {k: v for k, v in asdict(e).items() if v is not None}
    line = json.dumps(fields, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(fields, ensure_ascii=True)
    return line
