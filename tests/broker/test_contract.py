"""The Broker contract, run against every broker: MemoryBroker and RedisBroker (on a real Redis).

Ids differ between brokers (memory: "<epoch>-7", Redis: "1700000000000-7"), so these
tests compare positions by `seq`, and take ids from what the broker returned.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import pytest

from tidewire.broker import AppendConflict, BadPosition, Batch, Broker, Retention
from tidewire.broker.memory import MemoryBroker
from tidewire.broker.redis import RedisBroker

T = TypeVar("T")

KEEP = Retention(max_len=1_000)

#: How long a blocked reader may take to be woken: generous, since a loaded
#: machine is slow, and a reader that is never woken fails all the same.
WAKE = 5

_prefixes = itertools.count(1)


#: Positions that int() or a loose pattern would take for a number, and no broker
#: may: ids are ASCII digits only, and every other string is a BadPosition (400).
LAX = [
    "abc", "-1", "", "1.5", "+7", " 7", "7 ", "7\n", "7_0", "\u0667", "\uff17", "0x7", "1e3",
]  # fmt: skip


#: And what only a Redis id cannot be.
REDIS_BAD = ["12", "1-", "-1-0", "1-0-0", "1-x", f"{1 << 64}-0"]


@dataclass
class Kind:
    """One broker implementation, and how its ids look."""

    name: str
    make: Callable[[], Any]
    beyond: Callable[[Any], str]  # an id past the head of any log of this broker in these tests
    bad: list[str]  # what is not an id of this broker
    good: list[str]

    def seq(self, id: str) -> int:
        return int(id.rpartition("-")[2])


@pytest.fixture(params=["memory", "redis"])
def kind(request: pytest.FixtureRequest) -> Kind:
    if request.param == "memory":
        return Kind(
            "memory",
            MemoryBroker,
            lambda broker: f"{broker.epoch}-500",
            [*LAX, "12a", "1-", "-1-0", "1-0-0", "1-x", f"{10**20}-0"],
            ["0", "12", "007", "0-0", "1-0", "1700000000000-42"],
        )
    server = request.getfixturevalue("redis_server")
    # Tests share one Redis: each keeps to keys of its own.
    prefix = f"contract{next(_prefixes)}-{time.time_ns()}:"
    return Kind(
        "redis",
        lambda: RedisBroker(server.url, prefix=prefix),
        lambda _: "99999999999999-500",
        [*LAX, *(f"{b}-0" for b in LAX if b), *(f"0-{b}" for b in LAX if b), *REDIS_BAD],
        ["0", "0-0", "1-0", "1700000000000-42", f"{(1 << 64) - 1}-{(1 << 64) - 1}"],
    )


def run(kind: Kind, test: Callable[[Any], Awaitable[T]]) -> T:
    """Run an async test body on a new broker, with a time limit: a read that never wakes fails."""

    async def limited() -> T:
        broker = kind.make()
        try:
            async with asyncio.timeout(10):
                return await test(broker)
        finally:
            await broker.aclose()

    return asyncio.run(limited())


def items(*values: object, kind: str = "message") -> list[tuple[str, bytes]]:
    return [(kind, orjson.dumps(v)) for v in values]


async def fill(broker: Broker, log: str, n: int, retention: Retention = KEEP) -> list[str]:
    """Append events 1..n one at a time; their ids."""
    ids = []
    for i in range(1, n + 1):
        [event] = await broker.append(log, items(i), retention)
        ids.append(event.id)
    return ids


async def blocked(task: asyncio.Task[Any], seconds: float = 0.1) -> bool:
    """Whether `task` is still waiting after a while (a read that must not return yet)."""
    await asyncio.sleep(seconds)
    return not task.done()


def test_ids_strictly_increase_and_seq_counts_from_one(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        first = await broker.append("a", items("x", "y", "z"), KEEP)
        second = await broker.append("a", items("w"), KEEP)
        events = first + second
        assert [e.seq for e in events] == [1, 2, 3, 4]
        assert [kind.seq(e.id) for e in events] == [1, 2, 3, 4]
        assert [e.data for e in events] == ["x", "y", "z", "w"]
        positions = [tuple(map(int, e.id.split("-"))) for e in events]
        assert positions == sorted(set(positions)), "ids strictly increase"
        # Logs are independent.
        [other] = await broker.append("b", items(1), KEEP)
        assert other.seq == 1

    run(kind, body)


def test_append_keeps_event_types_and_data(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        appended = await broker.append("a", [("progress", b'{"p":1}'), ("message", b"null")], KEEP)
        batch = await broker.read("a", "0", limit=10, timeout=0)
        assert batch.events == appended
        assert [(e.seq, e.event, e.data_json) for e in batch.events] == [
            (1, "progress", b'{"p":1}'),
            (2, "message", b"null"),
        ]

    run(kind, body)


def test_a_guarded_append_that_already_landed_is_not_made_twice(kind: Kind) -> None:
    """A Redis that hung may run a timed-out append when it wakes, before or after its
    retry: both carry `expect`, and whichever comes second returns the first's events."""

    async def body(broker: Broker) -> None:
        await broker.append("a", items(0), KEEP, expect=0)
        first = await broker.append("a", items(1, 2), KEEP, expect=1)
        again = await broker.append("a", items(1, 2), KEEP, expect=1)
        assert [e.id for e in again] == [e.id for e in first]
        batch = await broker.read("a", "0", limit=10, timeout=0)
        assert [e.data for e in batch.events] == [0, 1, 2]  # once each
        with pytest.raises(AppendConflict):  # another writer's events in its place
            await broker.append("a", items(9), KEEP, expect=1)
        [next_one] = await broker.append("a", items(3), KEEP, expect=3)
        assert next_one.seq == 4

    run(kind, body)


def test_read_from_a_position_and_with_a_limit(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        ids = await fill(broker, "a", 10)
        batch = await broker.read("a", ids[2], limit=4, timeout=0)
        assert [e.id for e in batch.events] == ids[3:7]
        assert (batch.missed, batch.resume_id, batch.ended) == (0, None, False)
        rest = await broker.read("a", ids[6], limit=100, timeout=0)
        assert [e.id for e in rest.events] == ids[7:]

    run(kind, body)


def test_last_id(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        assert kind.seq(await broker.last_id("empty")) == 0
        ids = await fill(broker, "a", 3)
        assert await broker.last_id("a") == ids[-1]
        # Trimming does not move the head.
        more = await fill(broker, "a", 5, Retention(max_len=2))
        assert await broker.last_id("a") == more[-1]

    run(kind, body)


def test_read_blocks_until_an_append(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        ids = await fill(broker, "a", 2)
        reader = asyncio.create_task(broker.read("a", ids[-1], limit=10, timeout=None))
        assert await blocked(reader), "a read with nothing to return must wait"
        [late] = await broker.append("a", items("late"), KEEP)
        batch = await asyncio.wait_for(reader, WAKE)
        assert [(e.id, e.seq, e.data) for e in batch.events] == [(late.id, 3, "late")]

    run(kind, body)


def test_append_wakes_every_blocked_reader(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        readers = [
            asyncio.create_task(broker.read("a", "0", limit=10, timeout=5)) for _ in range(5)
        ]
        assert await blocked(readers[-1], 0.05)
        assert not any(r.done() for r in readers)
        [event] = await broker.append("a", items(1), KEEP)
        batches = await asyncio.wait_for(asyncio.gather(*readers), WAKE)
        assert all([e.id for e in b.events] == [event.id] for b in batches)

    run(kind, body)


def test_a_reader_blocked_on_one_log_is_woken_by_its_append_only(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        readers = {
            name: asyncio.create_task(broker.read(name, "0", limit=10, timeout=None))
            for name in ("a", "b", "c")
        }
        assert await blocked(readers["a"], 0.05)
        await broker.append("b", items("for b"), KEEP)
        batch = await asyncio.wait_for(readers["b"], WAKE)
        assert [e.data for e in batch.events] == ["for b"]
        assert await blocked(readers["a"]) and await blocked(readers["c"], 0)
        for reader in readers.values():
            reader.cancel()

    run(kind, body)


def test_timeout_returns_an_empty_batch(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        [last] = await fill(broker, "a", 1)
        start = time.monotonic()
        batch = await broker.read("a", last, limit=10, timeout=0.2)
        waited = time.monotonic() - start
        assert batch == Batch()
        assert 0.15 <= waited < 2

        start = time.monotonic()
        assert await broker.read("a", last, limit=10, timeout=0) == Batch()
        assert time.monotonic() - start < 1, "timeout=0 must not wait"

    run(kind, body)


def test_trim_by_count_reports_missed_and_where_to_resume(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        ids = await fill(broker, "a", 10, Retention(max_len=3))
        batch = await broker.read("a", "0", limit=100, timeout=0)
        assert batch.missed == 7
        assert batch.resume_id is not None and kind.seq(batch.resume_id) == 7
        assert [e.id for e in batch.events] == ids[7:]

        # Reading on from resume_id: exactly the retained events, no second gap.
        again = await broker.read("a", batch.resume_id, limit=100, timeout=0)
        assert (again.missed, [e.id for e in again.events]) == (0, ids[7:])

        # A reader that had some and fell behind misses only what it did not get.
        behind = await broker.read("a", ids[4], limit=100, timeout=0)
        assert behind.missed == 2 and behind.resume_id == batch.resume_id
        assert [e.id for e in behind.events] == ids[7:]

    run(kind, body)


def test_reader_following_resume_ids_gets_everything_once(kind: Kind) -> None:
    """A reader that follows the batches (as a transport does) accounts for every event."""

    async def body(broker: Broker) -> None:
        retention = Retention(max_len=5)
        after = "0"
        seen: list[int] = []
        missed = 0
        for round_ in range(6):
            values = range(round_ * 7 + 1, round_ * 7 + 8)
            await broker.append("a", items(*values), retention)
            while True:
                batch = await broker.read("a", after, limit=2, timeout=0)
                missed += batch.missed
                seen.extend(e.seq for e in batch.events)
                assert all(e.data == e.seq for e in batch.events)
                if batch.events:
                    after = batch.events[-1].id
                elif batch.resume_id is not None:
                    after = batch.resume_id
                else:
                    break
        assert seen == sorted(set(seen)), "no repeats, in order"
        assert len(seen) + missed == 42
        assert seen[-5:] == [38, 39, 40, 41, 42]

    run(kind, body)


def test_trim_by_age(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        retention = Retention(max_len=1_000, max_age=0.1)
        await fill(broker, "a", 3, retention)
        await asyncio.sleep(0.2)
        [fresh] = await broker.append("a", items("fresh"), retention)
        batch = await broker.read("a", "0", limit=100, timeout=0)
        assert batch.missed == 3
        assert batch.resume_id is not None and kind.seq(batch.resume_id) == 3
        assert [(e.id, e.data) for e in batch.events] == [(fresh.id, "fresh")]

    run(kind, body)


def test_trim_by_age_on_a_quiet_log(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        retention = Retention(max_len=1_000, max_age=0.1)
        ids = await fill(broker, "a", 4, retention)
        fresh = await broker.read("a", "0", limit=100, timeout=0)
        assert fresh.missed == 0 and len(fresh.events) == 4
        await asyncio.sleep(0.2)
        # Nothing was appended since, yet the old events are gone.
        batch = await broker.read("a", "0", limit=100, timeout=5)
        assert (batch.events, batch.missed, batch.resume_id) == ([], 4, ids[-1])
        assert await broker.read("a", ids[-1], limit=100, timeout=0.05) == Batch()
        assert await broker.last_id("a") == ids[-1]

    run(kind, body)


def test_a_followed_log_is_trimmed_by_age_too(kind: Kind) -> None:
    """Readers served from a copy of the log (RedisBroker) see the same trimming."""

    async def body(broker: Broker) -> None:
        retention = Retention(max_len=1_000, max_age=0.15)
        reader = asyncio.create_task(broker.read("a", "0", limit=100, timeout=None))
        assert await blocked(reader, 0.05)
        ids = await fill(broker, "a", 3, retention)
        assert len((await reader).events) >= 1
        await asyncio.sleep(0.25)
        batch = await broker.read("a", "0", limit=100, timeout=0)
        assert (batch.events, batch.missed, batch.resume_id) == ([], 3, ids[-1])

    run(kind, body)


def test_end_marks_the_reader_that_reaches_the_end(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        ids = await fill(broker, "a", 3)
        await broker.end("a")
        partial = await broker.read("a", "0", limit=2, timeout=0)
        assert [e.id for e in partial.events] == ids[:2]
        assert not partial.ended, "events remain after this batch"
        last = await broker.read("a", ids[1], limit=2, timeout=None)
        assert [e.id for e in last.events] == ids[2:] and last.ended
        at_end = await broker.read("a", ids[2], limit=2, timeout=None)
        assert at_end.events == [] and at_end.ended
        assert await broker.last_id("a") == ids[2], "the end is not an event"

    run(kind, body)


def test_end_wakes_blocked_readers(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        [last] = await fill(broker, "a", 1)
        readers = [
            asyncio.create_task(broker.read("a", last, limit=10, timeout=None)) for _ in range(3)
        ]
        assert await blocked(readers[-1], 0.05)
        await broker.end("a")
        batches = await asyncio.wait_for(asyncio.gather(*readers), WAKE)
        assert all(b.ended and b.events == [] for b in batches)

    run(kind, body)


def accepted(call: Callable[[str], object], ids: list[str]) -> list[str]:
    """The ids among `ids` that `call` takes without raising a BadPosition naming them."""
    taken = []
    for id in ids:
        try:
            call(id)
        except BadPosition as exc:
            assert "is not an event id" in str(exc) and repr(id) in str(exc), exc
        else:
            taken.append(id)
    return taken


def test_check_id(kind: Kind) -> None:
    broker = kind.make()
    assert accepted(broker.check_id, kind.bad) == []
    assert accepted(broker.check_id, kind.good) == kind.good
    assert issubclass(BadPosition, ValueError)


def test_read_from_a_bad_position_raises(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        await fill(broker, "a", 8)  # "+7", " 7" or an Arabic-Indic 7 must not read from 7
        taken = []
        for bad in kind.bad:
            try:
                await broker.read("a", bad, limit=1, timeout=0)
            except BadPosition:
                continue
            taken.append(bad)
        assert taken == []

    run(kind, body)


def test_an_id_beyond_the_head_reads_on_from_the_head(kind: Kind) -> None:
    """An id from elsewhere (memory: before a restart) must not stall a reader."""

    async def body(broker: Broker) -> None:
        await fill(broker, "a", 2)
        beyond = kind.beyond(broker)
        assert (await broker.read("a", beyond, limit=10, timeout=0)).events == []
        reader = asyncio.create_task(broker.read("a", beyond, limit=10, timeout=5))
        assert await blocked(reader, 0.05)
        [event] = await broker.append("a", items("next"), KEEP)
        batch = await asyncio.wait_for(reader, WAKE)
        assert [(e.id, e.seq, e.data) for e in batch.events] == [(event.id, 3, "next")]
        assert batch.missed == 0

    run(kind, body)


def test_delete_wakes_readers_and_forgets_the_log(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        ids = await fill(broker, "a", 2)
        reader = asyncio.create_task(broker.read("a", ids[-1], limit=10, timeout=None))
        assert await blocked(reader, 0.05)
        await broker.delete("a")
        batch = await asyncio.wait_for(reader, WAKE)
        assert batch.ended and batch.events == []
        assert kind.seq(await broker.last_id("a")) == 0
        assert await broker.read("a", "0", limit=10, timeout=0) == Batch()
        [event] = await broker.append("a", items("new"), KEEP)
        assert event.seq == 1
        await broker.delete("never-existed")  # no error

    run(kind, body)


def test_aclose_wakes_every_reader(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        readers = [
            asyncio.create_task(broker.read(name, "0", limit=10, timeout=None))
            for name in ("a", "b", "c")
        ]
        assert await blocked(readers[-1], 0.05)
        await broker.aclose()
        batches = await asyncio.wait_for(asyncio.gather(*readers), WAKE)
        assert all(b.ended for b in batches)

    run(kind, body)


def test_many_concurrent_readers_get_every_event_in_order(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        total = 300

        async def follow() -> list[int]:
            after, seqs = "0", []
            while len(seqs) < total:
                batch = await broker.read("a", after, limit=7, timeout=2)
                assert batch.events or not batch.missed, "nothing may be trimmed here"
                seqs.extend(e.seq for e in batch.events)
                if batch.events:
                    after = batch.events[-1].id
            return seqs

        readers = [asyncio.create_task(follow()) for _ in range(30)]
        assert await blocked(readers[-1], 0.05)
        rng = random.Random(7)
        sent = 0
        while sent < total:
            n = min(total - sent, rng.randint(1, 9))
            await broker.append("a", items(*range(sent + 1, sent + n + 1)), KEEP)
            sent += n
            if rng.random() < 0.3:
                await asyncio.sleep(0.001)
        results = await asyncio.wait_for(asyncio.gather(*readers), 5)
        assert all(seqs == list(range(1, total + 1)) for seqs in results)

    run(kind, body)


def test_cancelled_readers_do_not_get_in_the_way(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        for _ in range(20):
            reader = asyncio.create_task(broker.read("a", "0", limit=10, timeout=None))
            await asyncio.sleep(0)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
        for _ in range(5):
            assert await broker.read("a", "0", limit=1, timeout=0.001) == Batch()
        reader = asyncio.create_task(broker.read("a", "0", limit=10, timeout=None))
        assert await blocked(reader, 0.05)
        await broker.append("a", items(1), KEEP)
        assert len((await asyncio.wait_for(reader, WAKE)).events) == 1

    run(kind, body)


# -- shared state ---------------------------------------------------------------


def test_state_records(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        assert await broker.get_state("r") == {}
        await broker.put_state("r", {"a": "1", "b": "2"})
        await broker.put_state("r", {"b": "3"})
        assert await broker.get_state("r") == {"a": "1", "b": "3"}
        await broker.delete_state("r", "a")
        assert await broker.get_state("r") == {"b": "3"}
        await broker.delete_state("r")
        assert await broker.get_state("r") == {}
        await broker.delete_state("r")  # no error

        await broker.put_state("short", {"x": "1"}, ttl=0.1)
        assert await broker.get_state("short") == {"x": "1"}
        deadline = time.monotonic() + 2
        while await broker.get_state("short"):
            assert time.monotonic() < deadline, "a record must expire after its ttl"
            await asyncio.sleep(0.02)

    run(kind, body)


def test_claim_a_lease(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        assert await broker.claim("lease", "one", 0.2)
        assert not await broker.claim("lease", "two", 0.2), "held by another"
        assert await broker.claim("lease", "one", 0.2), "renewed by its holder"
        deadline = time.monotonic() + 2
        while not await broker.claim("lease", "two", 5):
            assert time.monotonic() < deadline, "an expired lease is free"
            await asyncio.sleep(0.02)
        assert not await broker.claim("lease", "one", 5)

    run(kind, body)


def test_send_and_listen(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        async def first(topic: str) -> str:
            async for message in broker.listen(topic):
                return message
            raise AssertionError("listen ended")

        listener = asyncio.create_task(first("t"))
        other = asyncio.create_task(first("u"))
        # A message reaches only those listening at the time: send until one does.
        while not listener.done():
            await broker.send("t", "hello")
            await asyncio.sleep(0.01)
        assert listener.result() == "hello"
        assert not other.done()
        other.cancel()

    run(kind, body)
