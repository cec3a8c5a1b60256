"""Taps (`Logs.tap`): readers at a log's head handed its new events as they come,
on both brokers (Redis: a real server)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from tidewire.broker import Batch, Broker, Retention
from tidewire.broker.memory import FEED_SLICE, MemoryBroker

KEEP = Retention(max_len=1_000)


class Recorder:
    """A tap that keeps what it is fed, and may refuse after `accept` feeds."""

    limit = 512

    def __init__(self, accept: int = 1_000) -> None:
        self.batches: list[list[int]] = []
        self.shared: list[dict[object, bytes]] = []
        self.accept = accept
        self.released = asyncio.Event()

    def feed(self, batch: Batch, shared: dict[object, bytes]) -> bool:
        if len(self.batches) >= self.accept:
            return False
        self.batches.append([e.seq for e in batch.events])
        self.shared.append(shared)
        return True

    def release(self) -> None:
        self.released.set()

    @property
    def seqs(self) -> list[int]:
        return [seq for batch in self.batches for seq in batch]


def items(*values: object) -> list[tuple[str, bytes]]:
    return [("message", orjson.dumps(v)) for v in values]


async def at_head(broker: Broker, log: str) -> str:
    """A log with one event, followed here (Redis: the read that waits makes the copy
    of it a tap follows); the id of its newest event."""
    [event] = await broker.append(log, items(0), KEEP)
    await broker.read(log, event.id, limit=10, timeout=0.05)
    return event.id


async def settle(until: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not until():
            await asyncio.sleep(0.005)


def run(broker: Broker, body: Callable[[Broker], Awaitable[Any]]) -> None:
    async def main() -> None:
        try:
            async with asyncio.timeout(15):
                await body(broker)
        finally:
            await broker.aclose()

    asyncio.run(main())


def test_taps_at_the_head_get_every_event_once_in_order_and_share_each_batch(
    broker: Broker,
) -> None:
    async def body(broker: Broker) -> None:
        head = await at_head(broker, "a")
        taps = [Recorder() for _ in range(3)]
        assert all(broker.tap("a", head, tap) for tap in taps)
        for i in range(1, 21):
            await broker.append("a", items(i), KEEP)
            if i % 5 == 0:
                await asyncio.sleep(0.01)  # some appends fed one by one, some together
        await settle(lambda: all(tap.seqs[-1:] == [21] for tap in taps))
        for tap in taps:
            assert tap.seqs == list(range(2, 22))
            assert not tap.released.is_set()
        # Fed together: the same batches, and one `shared` for each.
        assert taps[0].batches == taps[1].batches == taps[2].batches
        for i in range(len(taps[0].shared)):
            assert taps[0].shared[i] is taps[1].shared[i] is taps[2].shared[i]

    run(broker, body)


def test_a_tap_behind_the_head_is_refused(broker: Broker) -> None:
    async def body(broker: Broker) -> None:
        head = await at_head(broker, "a")
        [newer] = await broker.append("a", items(1), KEEP)
        await asyncio.sleep(0.05)  # Redis: the copy here has it
        assert not broker.tap("a", head, Recorder()), "it has an event to read first"
        assert broker.tap("a", newer.id, Recorder())
        assert not broker.tap("never-written", "0", Recorder())

    run(broker, body)


def test_a_tap_that_refuses_a_batch_is_released_and_fed_no_more(broker: Broker) -> None:
    async def body(broker: Broker) -> None:
        head = await at_head(broker, "a")
        refusing, other = Recorder(accept=1), Recorder()
        assert broker.tap("a", head, refusing) and broker.tap("a", head, other)
        await broker.append("a", items(1), KEEP)
        await settle(lambda: len(refusing.batches) == 1)
        await broker.append("a", items(2), KEEP)
        await refusing.released.wait()
        await broker.append("a", items(3), KEEP)
        await settle(lambda: other.seqs[-1:] == [4])
        assert refusing.seqs == [2]
        assert other.seqs == [2, 3, 4]

    run(broker, body)


def test_a_gap_the_end_and_a_delete_release_taps_unfed(broker: Broker) -> None:
    async def body(broker: Broker) -> None:
        # Trimmed past a tap's position: what a read from there gets, a gap
        # (memory) or the events (Redis: this process's copy has them all),
        # is what the tap gets: released unfed, or fed them.
        head = await at_head(broker, "trimmed")
        tap = Recorder()
        assert broker.tap("trimmed", head, tap)
        await broker.append("trimmed", items(*range(10)), Retention(max_len=3))
        read = await broker.read("trimmed", head, limit=512, timeout=0)
        if read.missed:
            await tap.released.wait()
            assert tap.batches == []
        else:
            await settle(lambda: tap.seqs == [e.seq for e in read.events])

        for log, finish in [("ended", broker.end), ("deleted", broker.delete)]:
            head = await at_head(broker, log)
            tap = Recorder()
            assert broker.tap(log, head, tap)
            await finish(log)
            await tap.released.wait()
            assert tap.batches == []

    run(broker, body)


def test_an_untapped_tap_is_fed_no_more(broker: Broker) -> None:
    async def body(broker: Broker) -> None:
        head = await at_head(broker, "a")
        kept, untapped = Recorder(), Recorder()
        assert broker.tap("a", head, kept) and broker.tap("a", head, untapped)
        broker.untap("a", untapped)
        await broker.append("a", items(1), KEEP)
        await settle(lambda: kept.seqs == [2])
        await asyncio.sleep(0.05)
        assert untapped.batches == [] and not untapped.released.is_set()

    run(broker, body)


def test_events_appended_during_a_feed_reach_the_taps_it_has_not_fed_yet() -> None:
    # The memory broker: its appends are seen at once, so where a feed is
    # when one comes is certain. (Redis shares the same feed, `Waiters`.)
    async def body(broker: Broker) -> None:
        head = await at_head(broker, "a")
        appended: list[asyncio.Task[Any]] = []

        class Appending(Recorder):
            """The first tap fed appends the next event, which lands mid-feed."""

            def feed(self, batch: Batch, shared: dict[object, bytes]) -> bool:
                if not appended:
                    appended.append(asyncio.create_task(broker.append("a", items(2), KEEP)))
                return super().feed(batch, shared)

        taps = [Appending() for _ in range(3 * FEED_SLICE)]
        assert all(broker.tap("a", head, tap) for tap in taps)
        await broker.append("a", items(1), KEEP)
        await settle(lambda: all(tap.seqs[-1:] == [3] for tap in taps))
        assert all(tap.seqs == [2, 3] for tap in taps)
        # The first slice was fed before the append; the later ones got both at once.
        assert taps[0].batches == [[2], [3]]
        assert taps[-1].batches == [[2, 3]]

    run(MemoryBroker(), body)
