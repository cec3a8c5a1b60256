"""Giving the memory of freed events back to the operating system.

glibc keeps freed memory for reuse rather than returning it, and cannot
return the free parts inside its heap by itself. Events come and go in bulk
(a run's history forgotten at once, a channel's trimmed by age), so a server
kept its peak size: bench W9 measured 503 MB after the runs and channel
histories (of 2 KB events) that took it from 63 MB were all gone, and 103 MB
after a `malloc_trim`. So a trim follows the expiry of runs
(`Runs._forget`), and one runs every minute for whatever else was freed.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

__all__ = ["trim", "trim_forever"]

logger = logging.getLogger("tidewire")

#: Seconds between the periodic trims. A trim holds the event loop while it
#: walks the heap: W9 measured ~7 ms on a 600 MB heap with nothing to
#: return, 60 ms to return 430 MB.
INTERVAL = 60.0


def _malloc_trim() -> Callable[[int], int] | None:
    # glibc only (Linux); musl, macOS and Windows have no malloc_trim.
    try:
        function: Callable[[int], int] = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return function


_MALLOC_TRIM = _malloc_trim()


def trim() -> bool:
    """Return the free memory of the heap to the operating system; False where it cannot."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


async def trim_forever(interval: float = INTERVAL) -> None:
    """Trim every `interval` seconds, until cancelled (from the app's lifespan)."""
    if _MALLOC_TRIM is None:
        return
    while True:
        await asyncio.sleep(interval)
        trim()
