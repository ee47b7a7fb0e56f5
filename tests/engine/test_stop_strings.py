"""StopStringMatcher: stop strings across chunk boundaries."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.errors import BadRequest
from edge_runtime.stopping import StopStringMatcher, validate_stop_strings


def run(stops: tuple[str, ...], deltas: list[str]) -> tuple[list[str], bool]:
    m = StopStringMatcher(stops)
    out: list[str] = []
    for d in deltas:
        emit, stopped = m.feed(d)
        out.append(emit)
        if stopped:
            return out, True
    out.append(m.flush())
    return out, False


def reference(stops: tuple[str, ...], text: str) -> tuple[str, bool]:
    """Whole-text answer: cut before the stop occurrence that ends first (longest on a tie)."""
    for end in range(len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(stop):
                return text[: end - len(stop)], True
    return text, False


def test_no_stops_passes_through() -> None:
    assert run((), ["a", "b"]) == (["a", "b", ""], False)


def test_match_inside_one_delta() -> None:
    assert run(("STOP",), ["abcSTOPdef"]) == (["abc"], True)


def test_match_across_chunks() -> None:
    out, stopped = run(("</code>",), ["x = 1<", "/co", "de>", "never"])
    assert stopped and "".join(out) == "x = 1"
    assert out == ["x = 1", "", ""]


def test_partial_match_that_fails_is_released() -> None:
    out, stopped = run(("\n\n",), ["a\n", "b", "\n", "c"])
    assert not stopped and out == ["a", "\nb", "", "\nc", ""]


def test_held_text_flushed_at_end() -> None:
    out, stopped = run(("###",), ["text#", "#"])
    assert not stopped and out == ["text", "", "##"]


def test_overlapping_prefixes() -> None:
    # "aab": after "aa" fails on the next "a", the tail "aa" could still start a match
    out, stopped = run(("aab",), ["a", "a", "a", "b", "z"])
    assert stopped and "".join(out) == "a"
    out, stopped = run(("abab",), ["ab", "ab", "c"])
    assert stopped and "".join(out) == ""
    out, stopped = run(("abac",), ["aba", "bac"])
    assert stopped and "".join(out) == "ab"


def test_first_completed_stop_wins() -> None:
    out, stopped = run(("world", "lo w"), ["hel", "lo world"])
    assert stopped and "".join(out) == "hel"
    # "b" completes before "abc" does, however the text is chunked
    assert run(("abc", "b"), ["abc"]) == (["a"], True)
    assert run(("abc", "b"), ["a", "b", "c"]) == (["", "a"], True)
    # same end: the longer stop string (earlier start) wins
    assert run(("bc", "abc"), ["xabc"]) == (["x"], True)


def test_feed_after_stop_is_ignored() -> None:
    m = StopStringMatcher(("x",))
    assert m.feed("ax") == ("a", True)
    assert m.feed("more") == ("", True) and m.stopped
    assert m.flush() == ""


@pytest.mark.parametrize("stops", [("",), ("ok", "")])
def test_empty_stop_string_is_bad_request(stops: tuple[str, ...]) -> None:
    with pytest.raises(BadRequest, match="stop"):
        StopStringMatcher(stops)
    with pytest.raises(BadRequest, match="stop"):
        validate_stop_strings(stops)


def test_stop_must_be_a_list_of_strings() -> None:
    with pytest.raises(BadRequest, match="stop"):
        validate_stop_strings("abc")  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="stop"):
        validate_stop_strings((1,))  # type: ignore[arg-type]


@settings(max_examples=500, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), max_size=3).map(tuple),
    deltas=st.lists(st.text(alphabet="abc\n", max_size=4), max_size=12),
)
def test_matches_reference_on_any_chunking(stops: tuple[str, ...], deltas: list[str]) -> None:
    out, stopped = run(stops, deltas)
    want_text, want_stopped = reference(stops, "".join(deltas))
    assert stopped == want_stopped
    assert "".join(out) == want_text
