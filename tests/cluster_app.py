"""The app the cluster tests run in several `tidewire serve` processes.

A generator's `finally` leaves a mark in $TIDEWIRE_TEST_MARKS, so a test can
see that a run cancelled from one process was closed in another.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from tidewire import Settings, Tidewire

tw = Tidewire(
    # From the environment too, for what a test sets there (TIDEWIRE_DRAIN_TIMEOUT).
    settings=Settings.from_env(
        heartbeat=0.5,
        lease=1.5,
        disconnect_grace=1.0,
        close_timeout=2.0,
        run_window=16,
        run_history=64,
    )
)


@tw.stream
async def ticks(
    n: int = 1_000_000, interval: float = 0.02, delay: float = 0.0, pad: int = 0
) -> AsyncIterator[dict[str, object]]:
    try:
        await asyncio.sleep(delay)
        for i in range(n):
            yield {"i": i, "pid": os.getpid(), **({"pad": "x" * pad} if pad else {})}
            await asyncio.sleep(interval)
    finally:
        marks = os.environ.get("TIDEWIRE_TEST_MARKS")
        if marks:
            (Path(marks) / f"closed-{os.getpid()}").touch()
