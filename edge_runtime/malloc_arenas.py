"""Bound glibc's malloc arenas for the daemon.

glibc gives each thread that contends for the heap an arena of its own (up to 8
per core). The daemon's threads (paho's network loop, the generation worker, the
acker, housekeeping, onnxruntime's pool) hand buffers to one another, so freed
memory stays scattered over many arenas and the resident size creeps up with
every request: +0.75 KB a request in 6 000 requests, without a Python-level leak
(tracemalloc). With two arenas it stays flat after warm-up (146.5 -> 146.9 MiB over
5 500 requests; see docs/reliability.md). Same effect as MALLOC_ARENA_MAX=2, set
from inside the process, before the threads start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(count: int = 2) -> bool:
    """Call glibc's ``mallopt(M_ARENA_MAX, count)``; False where there is no glibc
    (musl, macOS) or it refuses. Call it before starting threads."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_ARENA_MAX, count) == 1
    log.debug("malloc arenas limited to %d: %s", count, ok)
    return ok
