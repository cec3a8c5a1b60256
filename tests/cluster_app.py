"""The app the cluster tests run in several `tidewire serve` processes.

A generator's `finally` leaves a mark in $TIDEWIRE_TEST_MARKS, so a test can
see that a run cancelled from one process was closed in another (and, with
`mark=`, which run it was).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from tidewire import Settings, Tidewire

#: Quick settings for tests; a test may set others, or these, as TIDEWIRE_* variables.
QUICK = {
    "heartbeat": 0.5,
    "lease": 1.5,
    "disconnect_grace": 1.0,
    "close_timeout": 2.0,
    "run_window": 16,
    "run_history": 64,
    # SIGTERM (a test's teardown) does not wait long for the endless runs.
    "drain_timeout": 2.0,
}

tw = Tidewire(
    settings=Settings.from_env(
        **{k: v for k, v in QUICK.items() if f"TIDEWIRE_{k.upper()}" not in os.environ}
    )
)


@tw.stream
async def ticks(
    n: int = 1_000_000, interval: float = 0.02, delay: float = 0.0, pad: int = 0, mark: str = ""
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
            if mark:  # which run it was
                (Path(marks) / f"closed-{mark}").touch()
