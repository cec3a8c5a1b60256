"""Runs in one process: cancelling, and expiry followed by a heap trim."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from tests.conftest import LiveServer, wait_for
from tidewire import Settings, Tidewire
from tidewire.runs import local


def test_an_async_generator_is_closed_when_its_run_is_cancelled() -> None:
    tw = Tidewire()
    closed = asyncio.Event()

    @tw.stream
    async def endless() -> AsyncIterator[int]:
        try:
            while True:
                yield 1
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    async def main() -> None:
        run = await tw.runs.start(tw.streams["endless"], {}, attached=False)
        await asyncio.sleep(0.05)
        assert await tw.runs.cancel(run)  # returns once the generator is closed
        assert closed.is_set()
        assert run.state == "cancelled"
        assert not await tw.runs.cancel(run)  # already ended

    asyncio.run(main())


def test_forgotten_runs_are_followed_by_one_heap_trim(
    serve: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs expiring together share one trim (a trim walks the whole heap).
    trims: list[float] = []
    monkeypatch.setattr(local, "trim", lambda: trims.append(time.monotonic()))
    monkeypatch.setattr(local, "TRIM_DELAY", 0.2)
    tw = Tidewire(settings=Settings(run_ttl=0.1))

    @tw.stream
    async def few() -> AsyncIterator[int]:
        yield 1

    server = serve(tw)
    ids = [httpx.post(f"{server.url}/streams/few?detach=true").json()["run"] for _ in range(5)]
    wait_for(lambda: trims, timeout=10, message="no trim after the runs expired")
    assert all(httpx.get(f"{server.url}/runs/{run}").status_code == 404 for run in ids)
    time.sleep(0.5)
    assert len(trims) == 1
