"""MemoryBroker: ids, blocking reads, trimming by count and age, end, delete."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson
import pytest

from tidewire.broker import BadPosition, Batch, Retention
from tidewire.broker.memory import MemoryBroker

T = TypeVar("T")

KEEP = Retention(max_len=1_000)

#: How long a blocked reader may take to be woken: generous, since a loaded
#: machine is slow, and a reader that is never woken fails all the same.
WAKE = 5


def run(test: Callable[[], Awaitable[T]]) -> T:
    """Run an async test body with a time limit, so a read that never wakes fails fast."""

    async def limited() -> T:
        async with asyncio.timeout(10):
            return await test()

    return asyncio.run(limited())


def items(*values: object, kind: str = "message") -> list[tuple[str, bytes]]:
    return [(kind, orjson.dumps(v)) for v in values]


def at(broker: MemoryBroker, seq: int) -> str:
    """The id of the event numbered `seq` in any log of `broker` (its epoch, then the seq)."""
    return f"{broker.epoch}-{seq}"


def ids(broker: MemoryBroker, *seqs: int) -> list[str]:
    return [at(broker, seq) for seq in seqs]


async def fill(broker: MemoryBroker, log: str, n: int, retention: Retention = KEEP) -> None:
    for i in range(1, n + 1):
        await broker.append(log, items(i), retention)


def test_ids_count_from_one_and_strictly_increase() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        first = await broker.append("a", items("x", "y", "z"), KEEP)
        second = await broker.append("a", items("w"), KEEP)
        assert [e.id for e in first + second] == [f"{broker.epoch}-{n}" for n in (1, 2, 3, 4)]
        assert [e.seq for e in first + second] == [1, 2, 3, 4]
        assert [e.data for e in first + second] == ["x", "y", "z", "w"]
        # Logs are independent.
        [other] = await broker.append("b", items(1), KEEP)
        assert other.id == f"{broker.epoch}-1"

    run(body)


def test_append_keeps_event_types_and_data() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        await broker.append("a", [("progress", b'{"p":1}'), ("message", b"null")], KEEP)
        batch = await broker.read("a", "0", limit=10, timeout=0)
        assert [(e.id, e.event, e.data_json) for e in batch.events] == [
            (at(broker, 1), "progress", b'{"p":1}'),
            (at(broker, 2), "message", b"null"),
        ]

    run(body)


def test_read_from_a_position_and_with_a_limit() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        await fill(broker, "a", 10)
        batch = await broker.read("a", at(broker, 3), limit=4, timeout=0)
        assert [e.id for e in batch.events] == ids(broker, 4, 5, 6, 7)
        assert (batch.missed, batch.resume_id, batch.ended) == (0, None, False)
        rest = await broker.read("a", at(broker, 7), limit=100, timeout=0)
        assert [e.id for e in rest.events] == ids(broker, 8, 9, 10)

    run(body)


def test_last_id() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        assert await broker.last_id("empty") == at(broker, 0)
        await fill(broker, "a", 3)
        assert await broker.last_id("a") == at(broker, 3)
        # Trimming does not move the head.
        await fill(broker, "a", 5, Retention(max_len=2))
        assert await broker.last_id("a") == at(broker, 8)

    run(body)


def test_read_blocks_until_an_append() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        await fill(broker, "a", 2)
        reader = asyncio.create_task(broker.read("a", at(broker, 2), limit=10, timeout=None))
        await asyncio.sleep(0.1)
        assert not reader.done(), "a read with nothing to return must wait"
        await broker.append("a", items("late"), KEEP)
        batch = await asyncio.wait_for(reader, WAKE)
        assert [(e.id, e.data) for e in batch.events] == [(at(broker, 3), "late")]

    run(body)


def test_append_wakes_every_blocked_reader() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        readers = [
            asyncio.create_task(broker.read("a", "0", limit=10, timeout=5)) for _ in range(5)
        ]
        await asyncio.sleep(0.05)
        assert not any(r.done() for r in readers)
        await broker.append("a", items(1), KEEP)
        batches = await asyncio.wait_for(asyncio.gather(*readers), WAKE)
        assert all([e.id for e in b.events] == [at(broker, 1)] for b in batches)

    run(body)


def test_append_to_another_log_does_not_wake_a_reader() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        reader = asyncio.create_task(broker.read("a", "0", limit=10, timeout=None))
        await asyncio.sleep(0.02)
        await broker.append("b", items(1), KEEP)
        await asyncio.sleep(0.05)
        assert not reader.done()
        reader.cancel()

    run(body)


def test_timeout_returns_an_empty_batch() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        await fill(broker, "a", 1)
        start = time.monotonic()
        batch = await broker.read("a", at(broker, 1), limit=10, timeout=0.2)
        waited = time.monotonic() - start
        assert batch == Batch()
        assert batch.events == [] and not batch.missed and not batch.ended
        assert 0.15 <= waited < 2

        start = time.monotonic()
        assert await broker.read("a", at(broker, 1), limit=10, timeout=0) == Batch()
        assert time.monotonic() - start < 1, "timeout=0 must not wait"

    run(body)


def test_trim_by_count_reports_missed_and_where_to_resume() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        await fill(broker, "a", 10, Retention(max_len=3))
        batch = await broker.read("a", "0", limit=100, timeout=0)
        assert batch.missed == 7
        assert batch.resume_id == at(broker, 7)
        assert [e.id for e in batch.events] == ids(broker, 8, 9, 10)

        # Reading on from resume_id: exactly the retained events, no second gap.
        again = await broker.read("a", batch.resume_id, limit=100, timeout=0)
        assert (again.missed, [e.id for e in again.events]) == (0, ids(broker, 8, 9, 10))

        # A reader that had some and fell behind misses only what it did not get.
        behind = await broker.read("a", at(broker, 5), limit=100, timeout=0)
        assert (behind.missed, behind.resume_id) == (2, at(broker, 7))
        assert [e.id for e in behind.events] == ids(broker, 8, 9, 10)

    run(body)


def test_reader_following_resume_ids_gets_everything_once() -> None:
    """A reader that follows the batches (as a transport does) accounts for every event."""

    async def body() -> None:
        broker = MemoryBroker()
        retention = Retention(max_len=5)
        after = "0"
        seen: list[int] = []
        missed = 0
        for round_ in range(6):
            await fill_from(broker, "a", round_ * 7, 7, retention)
            while True:
                batch = await broker.read("a", after, limit=2, timeout=0)
                missed += batch.missed
                seen.extend(e.seq for e in batch.events)
                if batch.events:
                    after = batch.events[-1].id
                elif batch.resume_id is not None:
                    after = batch.resume_id
                else:
                    break
        assert seen == sorted(set(seen)), "no repeats, in order"
        assert len(seen) + missed == 42
        assert seen[-5:] == [38, 39, 40, 41, 42]

    run(body)


async def fill_from(
    broker: MemoryBroker, log: str, start: int, n: int, retention: Retention
) -> None:
    await broker.append(log, items(*range(start + 1, start + n + 1)), retention)


def test_trim_by_age() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        retention = Retention(max_len=1_000, max_age=0.1)
        await fill(broker, "a", 3, retention)
        await asyncio.sleep(0.2)
        await broker.append("a", items("fresh"), retention)
        batch = await broker.read("a", "0", limit=100, timeout=0)
        assert (batch.missed, batch.resume_id) == (3, at(broker, 3))
        assert [(e.id, e.data) for e in batch.events] == [(at(broker, 4), "fresh")]

    run(body)


def test_trim_by_age_on_a_quiet_log() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        retention = Retention(max_len=1_000, max_age=0.1)
        await fill(broker, "a", 4, retention)
        fresh = await broker.read("a", "0", limit=100, timeout=0)
        assert fresh.missed == 0 and len(fresh.events) == 4
        await asyncio.sleep(0.2)
        # Nothing was appended since, yet the old events are gone.
        batch = await broker.read("a", "0", limit=100, timeout=5)
        assert (batch.events, batch.missed, batch.resume_id) == ([], 4, at(broker, 4))
        assert await broker.read("a", at(broker, 4), limit=100, timeout=0.05) == Batch()
        assert await broker.last_id("a") == at(broker, 4)

    run(body)


def test_end_marks_the_reader_that_reaches_the_end() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        await fill(broker, "a", 3)
        await broker.end("a")
        partial = await broker.read("a", "0", limit=2, timeout=0)
        assert [e.id for e in partial.events] == ids(broker, 1, 2)
        assert not partial.ended, "events remain after this batch"
        last = await broker.read("a", at(broker, 2), limit=2, timeout=None)
        assert [e.id for e in last.events] == [at(broker, 3)] and last.ended
        at_end = await broker.read("a", at(broker, 3), limit=2, timeout=None)
        assert at_end.events == [] and at_end.ended

    run(body)


def test_end_wakes_blocked_readers() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        await fill(broker, "a", 1)
        readers = [
            asyncio.create_task(broker.read("a", at(broker, 1), limit=10, timeout=None))
            for _ in range(3)
        ]
        await asyncio.sleep(0.05)
        assert not any(r.done() for r in readers)
        await broker.end("a")
        batches = await asyncio.wait_for(asyncio.gather(*readers), WAKE)
        assert all(b.ended and b.events == [] for b in batches)

    run(body)


@pytest.mark.parametrize("bad", ["abc", "-1", "", "1.5", "1-", "-0", "1-2-3", "\u0667"])
def test_check_id_refuses_what_is_not_an_id(bad: str) -> None:
    broker = MemoryBroker()
    with pytest.raises(BadPosition):
        broker.check_id(bad)
    assert issubclass(BadPosition, ValueError)


@pytest.mark.parametrize("good", ["0", "1", "123456789012", "1764000000000-17", "0-0"])
def test_check_id_accepts_ids(good: str) -> None:
    MemoryBroker().check_id(good)


def test_read_from_a_bad_position_raises() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        with pytest.raises(BadPosition):
            await broker.read("a", "abc", limit=1, timeout=0)

    run(body)


def test_an_id_beyond_the_head_reads_on_from_the_head() -> None:
    """An id from before a restart (memory starts again at 1) must not stall a reader."""

    async def body() -> None:
        broker = MemoryBroker()
        await fill(broker, "a", 2)
        ahead = at(broker, 500)
        assert (await broker.read("a", ahead, limit=10, timeout=0)).events == []
        reader = asyncio.create_task(broker.read("a", ahead, limit=10, timeout=5))
        await asyncio.sleep(0.05)
        await broker.append("a", items("next"), KEEP)
        batch = await asyncio.wait_for(reader, WAKE)
        assert [(e.id, e.data) for e in batch.events] == [(at(broker, 3), "next")]
        assert batch.missed == 0

    run(body)


def test_delete_wakes_readers_and_forgets_the_log() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        await fill(broker, "a", 2)
        reader = asyncio.create_task(broker.read("a", at(broker, 2), limit=10, timeout=None))
        await asyncio.sleep(0.05)
        assert not reader.done()
        await broker.delete("a")
        batch = await asyncio.wait_for(reader, WAKE)
        assert batch.ended and batch.events == []
        assert await broker.last_id("a") == at(broker, 0)
        [event] = await broker.append("a", items("new"), KEEP)
        assert event.id == at(broker, 1)
        await broker.delete("never-existed")  # no error

    run(body)


def test_aclose_wakes_every_reader() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        readers = [
            asyncio.create_task(broker.read(name, "0", limit=10, timeout=None))
            for name in ("a", "b", "c")
        ]
        await asyncio.sleep(0.05)
        await broker.aclose()
        batches = await asyncio.wait_for(asyncio.gather(*readers), WAKE)
        assert all(b.ended for b in batches)

    run(body)


def test_cancelled_reader_leaves_no_waiter_behind() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        for _ in range(20):
            reader = asyncio.create_task(broker.read("a", "0", limit=10, timeout=None))
            await asyncio.sleep(0)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
        for _ in range(20):
            assert await broker.read("a", "0", limit=1, timeout=0.001) == Batch()
        log = broker._logs.get("a")
        assert log is None or not log.waiters

    run(body)


def test_an_id_from_before_a_restart_reads_the_log_from_its_start_told() -> None:
    """The ids of a broker made later never name the events of one made before
    (memory begins its logs again at 1): a reader coming back with one reads
    all that is retained now, and is told (`restarted`) that it may have
    missed events, whatever seq its id had."""

    async def body() -> None:
        before = MemoryBroker()
        await fill(before, "a", 60)
        kept = at(before, 57)
        broker = MemoryBroker()  # the process restarted
        assert int(broker.epoch) > int(before.epoch)
        await fill(broker, "a", 60, Retention(max_len=50))
        for old in (kept, "57", at(before, 0)):
            batch = await broker.read("a", old, limit=100, timeout=0)
            assert batch.restarted, old
            assert [e.seq for e in batch.events] == list(range(11, 61))
            # Only what was trimmed here is counted; resume_id is where it read on from.
            assert (batch.missed, batch.resume_id) == (10, at(broker, 10))
            again = await broker.read("a", batch.events[-1].id, limit=100, timeout=0)
            assert again == Batch()
        # `0` is the start of this log, not of another epoch's.
        start = await broker.read("a", "0", limit=100, timeout=0)
        assert (start.missed, start.restarted) == (10, False)

    run(body)


def test_an_id_from_before_a_restart_is_told_at_once_on_an_empty_log() -> None:
    async def body() -> None:
        old = at(MemoryBroker(), 3)
        broker = MemoryBroker()
        batch = await broker.read("nobody-wrote-here", old, limit=10, timeout=5)
        assert batch == Batch(resume_id=at(broker, 0), restarted=True)
        assert broker._logs == {}, "a reader of a made-up name leaves no log behind"
        # Reading on from resume_id waits for the next event, as at the head.
        reader = asyncio.create_task(broker.read("a", at(broker, 0), limit=10, timeout=5))
        await asyncio.sleep(0.05)
        assert not reader.done()
        await broker.append("a", items("first"), KEEP)
        first = await asyncio.wait_for(reader, WAKE)
        assert ([e.id for e in first.events], first.restarted) == ([at(broker, 1)], False)

    run(body)


def test_waking_many_readers_leaves_the_loop_turning_between_slices() -> None:
    """A publish must not wait for every subscriber's write (bench W3: with 1,000
    subscribers at 100 events/s, publishes were answered after 0.9 s).

    Each woken reader here spends 50 µs, as a subscriber's write does. A task
    that yields once while they are woken must get its turn long before all
    of them have run: as a publish, or a new connection, gets to run.
    """
    readers, cost = 1000, 50e-6

    async def body() -> tuple[float, float]:
        broker = MemoryBroker()
        served = 0

        async def reader() -> None:
            nonlocal served
            after = "0"
            while True:
                batch = await broker.read("fan", after, limit=100, timeout=None)
                if batch.events:
                    after = batch.events[-1].id
                until = time.perf_counter() + cost
                while time.perf_counter() < until:  # its write
                    pass
                served += 1

        tasks = [asyncio.create_task(reader()) for _ in range(readers)]
        while len(broker._log("fan").waiters.get(-1.0, [])) < readers:
            await asyncio.sleep(0.01)
        began = time.perf_counter()
        await broker.append("fan", items(1), KEEP)
        turns = []
        while served < readers:
            turn = time.perf_counter()
            await asyncio.sleep(0)
            turns.append(time.perf_counter() - turn)
        total = time.perf_counter() - began
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return max(turns), total

    # Without the cyclic GC meanwhile: a full collection of what earlier tests
    # left (83 ms once in a whole-suite run) is one long turn, but not a slice's.
    gc.disable()
    try:
        longest, total = run(body)
    finally:
        gc.enable()
    # All at once, one turn would take as long as all the readers (about 1.0x).
    assert longest < total / 4, f"a turn took {longest * 1000:.1f} of {total * 1000:.1f} ms"


class _CountingScans(dict[str, float]):
    """A key's slots that count how often all of them are looked through."""

    scans = 0

    def items(self):  # type: ignore[no-untyped-def, override]
        self.scans += 1
        return super().items()


def test_holding_slots_does_not_scan_every_holder_each_time() -> None:
    broker = MemoryBroker()
    slots = broker._slots["conns:one-client"] = _CountingScans()

    async def body() -> None:
        for i in range(1_000):
            assert await broker.hold("conns:one-client", f"m{i}", 10_000, ttl=60) is None

    run(body)
    assert len(slots) == 1_000
    # Nothing expired: no holder needed looking at (it was once a scan per hold).
    assert slots.scans <= 1


def test_expired_slots_are_freed_even_after_renewals(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000.0]
    monkeypatch.setattr("tidewire.broker.memory.time.monotonic", lambda: now[0])
    broker = MemoryBroker()

    def call(coro: Awaitable[T]) -> T:  # nothing here awaits: run it by hand
        try:
            coro.send(None)  # type: ignore[attr-defined]
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        raise AssertionError("it awaited")

    assert call(broker.hold("k", "a", 2, ttl=10)) is None
    now[0] += 5
    assert call(broker.hold("k", "b", 2, ttl=10)) is None
    assert call(broker.hold("k", "c", 2, ttl=10)) == pytest.approx(5)  # full: a frees in 5 s
    call(broker.renew("k", ["a"], ttl=10))  # a now lasts until 1,015; b until 1,015
    now[0] += 6  # past a's first expiry, the bound kept for the key
    assert call(broker.hold("k", "c", 2, ttl=10)) == pytest.approx(4)
    now[0] += 4.5  # past both
    assert call(broker.hold("k", "c", 2, ttl=10)) is None
    assert call(broker.hold("k", "d", 2, ttl=10)) is None
    assert call(broker.hold("k", "e", 2, ttl=10)) is not None


def test_a_channel_dropped_as_idle_numbers_on_when_written_again() -> None:
    # One channel at most, dropped at once when idle: writing "b" drops "a".
    channels = Retention(max_len=100, kind="channel", max_logs=1, idle_ttl=0.0)

    async def body() -> None:
        broker = MemoryBroker()
        first = await broker.append("a", items(1, 2, 3), channels)
        await broker.append("b", items("other"), channels)
        assert "a" not in broker._logs  # dropped, its events gone
        # A reader of "a" that comes and goes meanwhile changes nothing.
        assert (await broker.read("a", first[-1].id, limit=10, timeout=0)).events == []
        again = await broker.append("a", items(4, 5), channels)
        assert [e.seq for e in again] == [4, 5]  # not 1, 2: those ids named events 1, 2
        # Clients resume with every event since, none skipped, whatever they had
        # read of it before: as on Redis, the events it had went with it.
        for before in ("0", first[1].id, first[-1].id):
            batch = await broker.read("a", before, limit=10, timeout=0)
            assert ([e.seq for e in batch.events], batch.missed) == ([4, 5], 0)

    run(body)
