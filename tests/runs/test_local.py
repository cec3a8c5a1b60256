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
    monkeypatch.setattr(local, "TRIM_DELAY", 0.5)
    tw = Tidewire(settings=Settings(run_ttl=0.1))
    # The runs end together, when the gate opens, so that they expire together
    # however slowly their requests came (on a loaded machine the fifth came
    # after the first had expired and its trim was done: two trims).
    gate = asyncio.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    @tw.stream
    async def few() -> AsyncIterator[int]:
        loops.append(asyncio.get_running_loop())
        await gate.wait()
        yield 1

    server = serve(tw)
    ids = [httpx.post(f"{server.url}/streams/few?detach=true").json()["run"] for _ in range(5)]
    wait_for(lambda: len(loops) == len(ids), message="the runs did not start")
    loops[0].call_soon_threadsafe(gate.set)
    wait_for(lambda: trims, timeout=10, message="no trim after the runs expired")
    assert all(httpx.get(f"{server.url}/runs/{run}").status_code == 404 for run in ids)
    # A trim for a later expiry would come TRIM_DELAY after it: none comes.
    time.sleep(2 * local.TRIM_DELAY)
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


class Counting(MemoryBroker):
    """A broker that notes the size of each append, and holds the next one when `hold` is set
    (until `release` is, or the run is cancelled)."""

    def __init__(self) -> None:
        super().__init__()
        self.appends: list[int] = []
        self.hold = False
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def append(
        self,
        log: str,
        items: Sequence[tuple[str, bytes]],
        retention: Retention,
        *,
        expect: int | None = None,
    ) -> list[Envelope]:
        self.appends.append(len(items))
        if self.hold:
            self.hold = False
            self.holding.set()
            await self.release.wait()
        return await super().append(log, items, retention, expect=expect)


def test_the_items_a_generator_has_ready_are_appended_together() -> None:
    # One append (one wake-up of the watchers, one write each) for what came
    # at once, not one per event: bench W1's server CPU per event halved.
    broker = Counting()
    tw = Tidewire(broker=broker)

    @tw.stream
    async def bursts() -> AsyncIterator[int]:
        for i in range(100):
            yield i
        await asyncio.sleep(0.01)
        for i in range(100, 110):
            yield i

    async def main() -> list[Envelope]:
        run = await tw.runs.start(tw.streams["bursts"], {}, attached=False)
        assert run.task is not None
        await run.task
        return (await tw.broker.read(run.log, "0", limit=1000, timeout=0)).events

    events = asyncio.run(main())
    assert [e.data for e in events[:-1]] == list(range(110))
    assert events[-1].event == "end"
    # At most `BATCH` at once; the burst after the sleep on its own; then the end.
    assert broker.appends == [local.BATCH, 100 - local.BATCH, 10, 1]


def test_an_item_goes_out_before_its_generator_waits_for_the_next() -> None:
    tw = Tidewire()
    gate = asyncio.Event()

    @tw.stream
    async def slow() -> AsyncIterator[int]:
        yield 1
        yield 2
        await gate.wait()
        yield 3

    async def main() -> None:
        run = await tw.runs.start(tw.streams["slow"], {}, attached=False)
        await wait_until(lambda: run.events == 2)
        await asyncio.sleep(0.05)
        assert run.events == 2  # not held for the item after the wait
        gate.set()
        assert run.task is not None
        await run.task
        assert [
            e.data for e in (await tw.broker.read(run.log, "0", limit=9, timeout=0)).events[:-1]
        ] == [1, 2, 3]

    asyncio.run(main())


@pytest.mark.parametrize("fault", ["raises", "unencodable"])
def test_the_items_before_a_generators_error_are_kept(fault: str) -> None:
    tw = Tidewire()

    @tw.stream
    async def faulty() -> AsyncIterator[object]:
        yield 1
        yield 2
        if fault == "raises":
            raise ValueError("broken")
        yield object()
        yield 3

    async def main() -> list[Envelope]:
        run = await tw.runs.start(tw.streams["faulty"], {}, attached=False)
        assert run.task is not None
        await run.task
        assert run.state == "failed"
        return (await tw.broker.read(run.log, "0", limit=9, timeout=0)).events

    events = asyncio.run(main())
    assert [e.data for e in events[:2]] == [1, 2]
    assert [e.event for e in events[2:]] == ["error"]


def test_a_batch_stays_within_the_slowest_watchers_window() -> None:
    tw = Tidewire(settings=Settings(run_window=5))

    @tw.stream
    async def many() -> AsyncIterator[int]:
        for i in range(100):
            yield i

    async def main() -> None:
        run = await tw.runs.start(tw.streams["many"], {}, attached=True)
        watcher = tw.runs.watch(run, 0)
        await wait_until(lambda: run.events == 5)
        await asyncio.sleep(0.05)
        assert run.events == 5
        watcher.advance(3)
        await wait_until(lambda: run.events == 8)
        await asyncio.sleep(0.05)
        assert run.events == 8
        await tw.runs.cancel(run)

    asyncio.run(main())


def test_a_batch_stays_within_the_slowest_watchers_byte_window() -> None:
    # 64 events of 1 KB at once would be 6x this window: the batch stops at it.
    tw = Tidewire(settings=Settings(run_history_bytes=10_000))

    @tw.stream
    async def large() -> AsyncIterator[str]:
        for _ in range(100):
            yield "x" * 998  # 1,000 bytes of JSON

    async def main() -> None:
        run = await tw.runs.start(tw.streams["large"], {}, attached=True)
        tw.runs.watch(run, 0)
        await wait_until(lambda: run.events >= 10)
        await asyncio.sleep(0.05)
        assert run.events == 10  # as when it appended one at a time
        await tw.runs.cancel(run)

    asyncio.run(main())


def test_a_run_cancelled_while_its_generator_awaits_cancels_it_at_that_await() -> None:
    # The generator was stepped on to its next await (to see whether it had
    # more ready) while the run appended: cancelled then, it is cancelled
    # there, as it is when the run awaits it, and its `finally` runs.
    broker = Counting()
    tw = Tidewire(broker=broker)
    seen: list[str] = []

    @tw.stream
    async def waits() -> AsyncIterator[int]:
        try:
            yield 1
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append("cancelled at its await")
                raise
            seen.append("went on")
            yield 2
        finally:
            seen.append("finally")

    async def main() -> None:
        broker.hold = True
        run = await tw.runs.start(tw.streams["waits"], {}, attached=False)
        await asyncio.wait_for(broker.holding.wait(), 10)  # the append of 1 is held
        started = time.monotonic()
        assert await tw.runs.cancel(run)
        assert time.monotonic() - started < 10  # not after the sleep
        assert run.state == "cancelled"

    asyncio.run(main())
    assert seen == ["cancelled at its await", "finally"]


async def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)
