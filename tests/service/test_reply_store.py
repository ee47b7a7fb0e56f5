"""ReplyStore's bounds: entries and bytes, in memory and in the sqlite file."""

from __future__ import annotations

import sqlite3

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge_runtime.reply_store import DEFAULT_MAX_BYTES, ReplyStore, request_key


def rows_on_disk(path) -> list[str]:
    with sqlite3.connect(str(path)) as db:
        return [key for (key,) in db.execute("SELECT key FROM replies ORDER BY seq")]


def test_long_replies_are_bounded_in_bytes_not_only_in_entries(tmp_path):
    """2,000 entries of long answers (a client asking for max_tokens of long tokens) were all
    kept, in memory and on disk: the store holds at most max_bytes of keys and payloads,
    dropping the oldest, and what it dropped is gone from the file too."""
    path = tmp_path / "replies.sqlite3"
    payload = b"x" * 60_000  # ~ a final reply of 2,048 tokens of ~26 bytes
    keys = [request_key("edge/dev1/v1/reply/c/" + str(i), str(i)) for i in range(700)]
    with ReplyStore(path) as store:
        for key in keys:
            store.put(key, payload)
        kept = [key for key in keys if store.get(key) is not None]
    per_entry = len(keys[0]) + len(payload)
    assert DEFAULT_MAX_BYTES // (len(keys[-1]) + len(payload)) <= len(kept) <= DEFAULT_MAX_BYTES // per_entry
    assert kept == keys[-len(kept):]  # the newest
    assert rows_on_disk(path) == kept
    with ReplyStore(path) as store:  # reopened: the same
        assert len(store) == len(kept) and store.get(keys[-1]) == payload


def test_a_smaller_bound_at_open_drops_the_oldest_and_the_newest_is_kept_even_alone_over_it(tmp_path):
    path = tmp_path / "replies.sqlite3"
    with ReplyStore(path) as store:
        for i in range(10):
            store.put(f"k{i}", bytes([i]) * 1000)
    with ReplyStore(path, max_bytes=3 * 1002) as store:
        assert [k for k in (f"k{i}" for i in range(10)) if k in store] == ["k7", "k8", "k9"]
    assert rows_on_disk(path) == ["k7", "k8", "k9"]
    with ReplyStore(path, max_bytes=100) as store:
        store.put("big", b"y" * 5000)
        assert len(store) == 1 and store.get("big") == b"y" * 5000
    assert rows_on_disk(path) == ["big"]


def test_replacing_a_reply_counts_its_bytes_once(tmp_path):
    with ReplyStore(tmp_path / "r.sqlite3", max_bytes=2 * 1002) as store:
        store.put("a1", b"a" * 1000)
        for _ in range(5):
            store.put("b1", b"b" * 1000)
        assert store.get("a1") == b"a" * 1000 and len(store) == 2


def _written_bytes() -> int:
    """Bytes this process has sent to the storage layer so far (/proc/self/io's write_bytes)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


def test_a_full_store_writes_few_pages_a_reply(tmp_path):
    """Flash wear (an SD card): once the store was full, each reply was two commits, the insert
    and then the deletion of the oldest (two fsyncs), and AUTOINCREMENT rewrote sqlite_sequence's
    page at every insert. One commit a reply and no sequence page: 34 KB written a request
    before, 25 KB since, on the real daemon (docs/deployment.md). Here 1,000 replies of 400
    bytes into a full store of 2,000."""
    path = tmp_path / "replies.sqlite3"
    with ReplyStore(path) as store:
        for i in range(2000):
            store.put(request_key("edge/dev/v1/reply/old", f"{i}"), b"o" * 400)
    n = 1000
    with ReplyStore(path) as store:
        before = _written_bytes()
        for i in range(n):
            store.put(request_key("edge/dev/v1/reply/new", f"{i}"), b"n" * 400)
        per_reply = (_written_bytes() - before) / n
        assert len(store) == 2000
    assert rows_on_disk(path)[-1] == request_key("edge/dev/v1/reply/new", f"{n - 1}")
    assert per_reply <= 32 * 1024, per_reply  # 36 KB before, 27.5 KB since (sqlite 3.40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(puts=st.lists(st.tuples(st.integers(0, 12), st.integers(1, 900)), min_size=1, max_size=40),
       max_entries=st.integers(1, 6), max_bytes=st.integers(1, 3000))
@example(puts=[(0, 10), (1, 10), (0, 2000)], max_entries=6, max_bytes=2010)  # a replaced one, pushing out a newer
def test_the_store_keeps_the_newest_replies_within_both_bounds(tmp_path_factory, puts, max_entries, max_bytes):
    """Against a reference of the bounds as documented: a reply (a replaced one too) is the
    newest; the oldest go while there are more than max_entries or more than max_bytes of keys
    and payloads, the newest staying even alone over them. In memory, on disk and reopened."""
    path = tmp_path_factory.mktemp("store") / "r.sqlite3"
    expected: dict[str, bytes] = {}
    with ReplyStore(path, max_entries=max_entries, max_bytes=max_bytes) as store:
        for n, (k, size) in enumerate(puts):
            key, payload = f"k{k}", bytes([n % 256]) * size
            expected.pop(key, None)
            expected[key] = payload
            while len(expected) > 1 and (len(expected) > max_entries or sum(
                    len(key.encode()) + len(value) for key, value in expected.items()) > max_bytes):
                del expected[next(iter(expected))]
            store.put(key, payload)
            assert {key: store.get(key) for key in expected} == expected and len(store) == len(expected)
    assert rows_on_disk(path) == list(expected)
    with ReplyStore(path, max_entries=max_entries, max_bytes=max_bytes) as store:
        assert {key: store.get(key) for key in expected} == expected and len(store) == len(expected)
