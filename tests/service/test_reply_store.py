"""ReplyStore's bounds: entries and bytes, in memory and in the sqlite file."""

from __future__ import annotations

import sqlite3

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
