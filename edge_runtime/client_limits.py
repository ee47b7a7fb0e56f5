"""Requests per minute per client id: a sliding one-minute window of admission
times for each client, bounded in the number of clients it remembers and in the
memory each takes (a client id, a level of a topic the client chose, can be tens of
kilobytes: it is remembered by its digest)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 60.0


def _key(client_id: str) -> bytes:
    """A client id's fixed-size stand-in (10,000 ids of 60 KB each were 600 MB held)."""
    return hashlib.blake2b(client_id.encode("utf-8", errors="surrogatepass"), digest_size=16).digest()


class RequestRateLimiter:
    """`admit(client, limit)` is True when the client made fewer than `limit` requests
    in the last minute (and counts this one); `refund` takes the last one back (a
    request refused for another reason, e.g. a full queue, does not count)."""

    def __init__(self, *, max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._seen: dict[bytes, deque[float]] = {}  # by _key(client id)
        self._refused: dict[bytes, int] = {}  # refusals since the client was last admitted (a subset of _seen's keys)
        self._lock = threading.Lock()
        self._max_clients = max_clients
        self._clock = clock

    def admit(self, client_id: str, limit: int) -> bool:
        if limit <= 0:
            return True
        now = self._clock()
        key = _key(client_id)
        with self._lock:
            times = self._seen.get(key)
            if times is None:
                if len(self._seen) >= self._max_clients:
                    self._forget_idle(now)
                times = self._seen.setdefault(key, deque())
            while times and now - times[0] >= WINDOW_S:
                times.popleft()
            if len(times) >= limit:
                self._refused[key] = self._refused.get(key, 0) + 1
                return False
            self._refused.pop(key, None)
            times.append(now)
            return True

    def refusals_in_a_row(self, client_id: str) -> int:
        """How many times `admit` refused the client since it last admitted it: 1 at the first
        refusal of a spell over the rate (the policy audits that one, not each one after it)."""
        with self._lock:
            return self._refused.get(_key(client_id), 0)

    def refund(self, client_id: str) -> None:
        with self._lock:
            times = self._seen.get(_key(client_id))
            if times:
                times.pop()

    def retry_after_s(self, client_id: str) -> float:
        """Seconds until the oldest request of the window leaves it."""
        with self._lock:
            times = self._seen.get(_key(client_id))
            if not times:
                return 0.0
            return max(0.0, WINDOW_S - (self._clock() - times[0]))

    def _forget_idle(self, now: float) -> None:
        for client in [c for c, t in self._seen.items() if not t or now - t[-1] >= WINDOW_S]:
            self._forget(client)
        if len(self._seen) >= self._max_clients:  # all active: forget the least recently seen
            self._forget(min(self._seen, key=lambda c: self._seen[c][-1]))

    def _forget(self, key: bytes) -> None:
        del self._seen[key]
        self._refused.pop(key, None)

    def __len__(self) -> int:
        return len(self._seen)
