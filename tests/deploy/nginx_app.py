"""The app tests/deploy/test_nginx.py runs in two `tidewire serve` processes behind nginx.

Settings come from the environment (`TIDEWIRE_ACCEL_REDIRECT` among them),
as a deployment's would; the ones set here make the tests quick: heartbeats
every half second, and a publish quota small enough to reach.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from tidewire import Settings, Tidewire

#: Publishes one address may make at once: the quota test makes one more.
PUBLISH_BURST = 5

tw = Tidewire(
    settings=Settings.from_env(
        heartbeat=0.5,
        close_timeout=2.0,
        # A burst of PUBLISH_BURST, then one every 1000 s: past it is 429.
        publish_rate=0.001,
        publish_burst=PUBLISH_BURST,
    )
)


@tw.stream
async def gated(gate: str, first: int = 1) -> AsyncIterator[dict[str, object]]:
    """`first` events, then wait until the file `gate` exists, then one more.

    A test that reads the first events while the gate is shut knows they
    were sent before the generator finished: nothing held them back.
    """
    for i in range(first):
        yield {"i": i, "pid": os.getpid()}
    while not Path(gate).exists():
        await asyncio.sleep(0.02)
    yield {"i": first, "pid": os.getpid(), "after": "gate"}


@tw.stream
async def ticks(n: int = 3, interval: float = 0.05) -> AsyncIterator[int]:
    for i in range(n):
        yield i
        await asyncio.sleep(interval)
