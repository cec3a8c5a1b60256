"""Runs in one process: cancelling, and expiry followed by a heap trim."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

import httpx
import pytest

from tests.conftest import LiveServer, wait_for
from tidewire import Settings, Tidewire
from tidewire.broker import BrokerUnavailable, Retention
from tidewire.broker.memory import MemoryBroker
from tidewire.events import Envelope
from tidewire.runs import local
from tidewire.runs.cluster import lease_key


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


class Hanging(MemoryBroker):
    """A broker whose appends fail (`BrokerUnavailable`) while `down` is set; the
    first failing append still lands, as one that timed out on a Redis that hung."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.landed_anyway = False

    async def append(
        self,
        log: str,
        items: Sequence[tuple[str, bytes]],
        retention: Retention,
        *,
        expect: int | None = None,
    ) -> list[Envelope]:
        if self.down:
            if not self.landed_anyway:
                self.landed_anyway = True
                await super().append(log, items, retention, expect=expect)
            raise BrokerUnavailable("redis is unreachable: Timeout reading")
        return await super().append(log, items, retention, expect=expect)

    async def claim(self, key: str, holder: str, ttl: float) -> bool:
        if self.down:
            raise BrokerUnavailable("redis is unreachable: Timeout reading")
        return await super().claim(key, holder, ttl)


def _counting_run(broker: Hanging, settings: Settings) -> tuple[Tidewire, asyncio.Event]:
    tw = Tidewire(broker=broker, settings=settings)
    closed = asyncio.Event()

    @tw.stream
    async def count() -> AsyncIterator[int]:
        try:
            for i in range(20):
                yield i
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    return tw, closed


def test_a_run_waits_out_a_broker_stall_longer_than_its_lease() -> None:
    broker = Hanging()
    tw, _ = _counting_run(broker, Settings(lease=0.3))

    async def main() -> list[Envelope]:
        run = await tw.runs.start(tw.streams["count"], {}, attached=False)
        await asyncio.sleep(0.05)
        broker.down = True
        try:
            await asyncio.sleep(3 * tw.settings.lease)
            assert run.state == "running"  # waiting, not failed
        finally:
            broker.down = False
        assert run.task is not None
        await asyncio.wait_for(run.task, 10)
        batch = await broker.read(run.log, "0", limit=100, timeout=0)
        await tw.aclose()
        return batch.events

    events = asyncio.run(main())
    # Every event once, in order: the append that landed during the stall is not made twice.
    assert [e.event for e in events] == ["message"] * 20 + ["end"]
    assert [e.data for e in events[:-1]] == list(range(20))


def test_a_run_whose_lease_was_taken_during_a_stall_stops_quietly() -> None:
    broker = Hanging()
    tw, closed = _counting_run(broker, Settings(lease=0.3))

    async def main() -> None:
        run = await tw.runs.start(tw.streams["count"], {}, attached=False)
        await asyncio.sleep(0.05)
        broker.down = True
        try:
            await asyncio.sleep(2 * tw.settings.lease)
            # Another process saw the lease expire and took it over (and failed
            # the run), reaching the broker where this one could not.
            assert await MemoryBroker.claim(broker, lease_key(run.id), "another", 60)
            await MemoryBroker.append(broker, run.log, [("error", b"{}")], tw.runs.retention)
        finally:
            broker.down = False
        assert run.task is not None
        await asyncio.wait_for(run.task, 10)
        assert closed.is_set()  # the generator was closed
        events = (await broker.read(run.log, "0", limit=100, timeout=0)).events
        # Nothing of this process's after the other's error: no event, no end of its own.
        assert events[-1].event == "error"
        await tw.aclose()

    asyncio.run(main())
