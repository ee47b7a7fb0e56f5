"""The daemon bounds glibc's malloc arenas before its threads start (see
edge_runtime/malloc_arenas.py for the soak figures behind it)."""

from __future__ import annotations

import platform

import pytest

from edge_runtime.malloc_arenas import limit_malloc_arenas


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt(M_ARENA_MAX) is glibc's")
def test_glibc_accepts_the_arena_limit():
    assert limit_malloc_arenas(2) is True
