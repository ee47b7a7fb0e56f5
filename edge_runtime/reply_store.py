"""A bounded, durable store of recent final replies by request key.

The daemon acknowledges a request to the broker only after its final reply is
written here, so a request redelivered after a crash, SIGKILL or reconnect gets
its stored final reply again instead of a second generation.

Backed by sqlite3 (stdlib) in WAL mode with ``synchronous=FULL``: a committed
reply survives a killed process and a power cut. The file holds generated text,
so it is created with mode 0600 inside the state directory. Lookups are served
from memory; only writes touch the disk.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 2000
# The bytes of keys and payloads kept (in memory for lookups, and on disk): a final reply is up to
# ~26 bytes a token (the longest Code Llama token, JSON-escaped), ~55 KB at max_tokens 2048, so the
# entry bound alone let one client make the store hold ~110 MB of long answers (more with a larger
# [limits] max_tokens). 2,000 replies of ~16 KB fit; a longer run of long replies keeps fewer.
DEFAULT_MAX_BYTES = 32 * 1024 * 1024


def request_key(reply_topic: str, request_id: str) -> str:
    """The store key of a request: its id scoped by its reply topic, so two clients
    that both number their requests "1", "2", ... do not see each other's replies."""
    key = f"{reply_topic}\n{request_id}"
    # a lone surrogate ("\ud800" in the JSON) cannot be stored as sqlite TEXT: keep it escaped
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _entry_bytes(key: str, payload: bytes) -> int:
    return len(key.encode("utf-8")) + len(payload)


class ReplyStore:
    """Final replies (encoded payloads) of the most recent requests: at most `max_entries` of
    them, and at most `max_bytes` of keys and payloads (the newest reply is kept even when it
    alone is larger)."""

    def __init__(self, path: Path | str, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.path = Path(path)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._bytes = 0  # _entry_bytes of everything in _cache
        self._lock = threading.Lock()  # the in-memory index (lookups never wait on the disk)
        self._db_lock = threading.Lock()  # the sqlite connection
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        self._db: sqlite3.Connection | None = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # seq orders the replies by age. Not AUTOINCREMENT: that rewrites sqlite_sequence's page at
        # every insert (a page more on the flash per request); the newest row, whose seq is the
        # largest, is never the one deleted, so the next seq is still larger than every other.
        # A store an older version made keeps its AUTOINCREMENT; both read the other's.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS replies ("
            " seq INTEGER PRIMARY KEY,"
            " key TEXT NOT NULL UNIQUE,"
            " payload BLOB NOT NULL,"
            " created REAL NOT NULL)")
        self._prune()
        rows = self._db.execute(
            "SELECT key, payload FROM replies ORDER BY seq").fetchall()
        for key, payload in rows:
            self._cache[key] = bytes(payload)
            self._bytes += _entry_bytes(key, self._cache[key])
        self._delete(self._evict())
        log.debug("reply store %s: %d entries", self.path, len(self._cache))

    def get(self, key: str) -> bytes | None:
        """The stored final reply payload for `key`, or None."""
        with self._lock:
            return self._cache.get(key)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._cache

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

    def put(self, key: str, payload: bytes) -> None:
        """Store (or replace) the final reply of `key`; durable when this returns.
        Lookups see it only once it is on disk. The reply and the deletion of the oldest ones
        it pushes out of the bounds are one transaction: one commit (one fsync, and the pages
        both touch written once) a request, where they were two once the store was full."""
        with self._db_lock:
            if self._db is None:
                raise RuntimeError("reply store is closed")
            with self._lock:  # only put changes the cache (under _db_lock): the plan holds until it does
                evicted = self._evicted_by(key, payload)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO replies (key, payload, created) VALUES (?, ?, ?)",
                                 (key, payload, time.time()))
                self._delete(evicted)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            with self._lock:
                old = self._cache.pop(key, None)
                if old is not None:
                    self._bytes -= _entry_bytes(key, old)
                self._cache[key] = payload
                self._bytes += _entry_bytes(key, payload)
                for gone in evicted:
                    self._bytes -= _entry_bytes(gone, self._cache.pop(gone))

    def _evicted_by(self, key: str, payload: bytes) -> list[str]:
        """The oldest keys that storing `payload` under `key` pushes beyond the bounds."""
        count = len(self._cache) + (key not in self._cache)
        total = self._bytes + _entry_bytes(key, payload)
        if key in self._cache:
            total -= _entry_bytes(key, self._cache[key])
        evicted = []
        for old_key, old_payload in self._cache.items():  # oldest first
            if count <= 1 or (count <= self.max_entries and total <= self.max_bytes):
                break
            if old_key == key:  # replaced: the newest now, never evicted
                continue
            count -= 1
            total -= _entry_bytes(old_key, old_payload)
            evicted.append(old_key)
        return evicted

    def _evict(self) -> list[str]:
        """Drop the oldest entries from memory beyond the bounds; their keys, to delete on disk."""
        evicted = []
        while len(self._cache) > 1 and (len(self._cache) > self.max_entries or self._bytes > self.max_bytes):
            key, payload = self._cache.popitem(last=False)
            self._bytes -= _entry_bytes(key, payload)
            evicted.append(key)
        return evicted

    def _delete(self, keys: list[str]) -> None:
        assert self._db is not None
        if keys:
            self._db.executemany("DELETE FROM replies WHERE key = ?", [(key,) for key in keys])

    def _prune(self) -> None:
        assert self._db is not None
        self._db.execute(
            "DELETE FROM replies WHERE seq NOT IN "
            "(SELECT seq FROM replies ORDER BY seq DESC LIMIT ?)", (self.max_entries,))

    def close(self) -> None:
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> "ReplyStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
