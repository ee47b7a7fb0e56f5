"""Stop strings on streamed text.

Text arrives in deltas (one per token), and a stop string can span several of
them, so the matcher holds back the shortest tail that could still begin a stop
string and emits everything before it. On a match the output ends right before
the stop string, which is not emitted. The match is the first to complete in
the stream, so the output does not depend on how the text was chunked.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import BadRequest


def validate_stop_strings(stops: Sequence[str]) -> tuple[str, ...]:
    """The stop strings as a tuple; BadRequest naming `stop` if one is empty or not a string."""
    if isinstance(stops, str):
        raise BadRequest("stop must be a list of strings, not a string")
    for i, s in enumerate(stops):
        if not isinstance(s, str):
            raise BadRequest(f"stop[{i}] must be a string, got {type(s).__name__}")
        if not s:
            raise BadRequest(f"stop[{i}] must not be empty")
    return tuple(stops)


class StopStringMatcher:
    """Feed text deltas; get back the text that is safe to emit, and whether a stop string matched."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = validate_stop_strings(stops)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, delta: str) -> tuple[str, bool]:
        """`(text to emit, stopped)`. After a match, further input is ignored."""
        if self._stopped:
            return "", True
        text = self._held + delta
        at = _first_match(text, self._stops)
        if at is not None:
            self._held, self._stopped = "", True
            return text[:at], True
        keep = _partial_tail_length(text, self._stops)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of generation (no stop string matched)."""
        held, self._held = self._held, ""
        return held


def _first_match(text: str, stops: tuple[str, ...]) -> int | None:
    """Start of the match that completes first in `text` (the longer one on a tie), or None.

    "Completes first" makes the result independent of how the text was split into
    deltas: with stops ("abc", "b"), "abc" stops after "a" however it arrives.
    """
    best: tuple[int, int] | None = None  # (end, start)
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best):
            best = (start + len(stop), start)
    return None if best is None else best[1]


def _partial_tail_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
