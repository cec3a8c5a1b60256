"""Returning freed memory to the operating system (glibc's malloc_trim)."""

from __future__ import annotations

import platform

import psutil

from tidewire import heap

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_trim_is_there_exactly_where_glibc_is() -> None:
    assert heap.trim() is GLIBC


def test_trim_returns_freed_memory_that_glibc_keeps() -> None:
    # Blocks too big for Python's own allocator come from glibc's heap; one
    # kept at the end pins the freed ones below it, as a live event pins the
    # heap under it in a server: glibc does not give them back by itself.
    process = psutil.Process()
    blocks = [bytes(2_000) + bytes([i & 255]) for i in range(100_000)]  # ~200 MB
    survivor = bytes(2_000) + b"!"
    before = process.memory_info().rss
    del blocks
    kept = process.memory_info().rss
    assert heap.trim()
    trimmed = process.memory_info().rss
    assert survivor
    assert before - kept < 50 << 20  # glibc kept (nearly) all of it
    assert kept - trimmed > 150 << 20  # the trim gave it back
