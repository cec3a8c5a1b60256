"""Byte budgets and the cap on logs of a kind, for every broker (docs: DESIGN "Limits").

Each limit is tried at its value, one under and one over. Sizes come from `wire_size` of
what the broker returned (Redis ids are longer than memory's), measured on a log of its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.broker import test_contract
from tests.broker.test_contract import Kind, items, run
from tidewire.broker import Broker, Retention, TooManyLogs, wire_size
from tidewire.broker.memory import MemoryBroker
from tidewire.broker.redis import RedisBroker

PAYLOAD = "x" * 1000

#: Memory and a real Redis, as the contract suite has them.
kind = test_contract.kind


async def sizes(broker: Broker, n: int) -> list[int]:
    """The wire sizes of events 1..n of a log, measured on a log of their own."""
    events = await broker.append("measure", items(*[PAYLOAD] * n), Retention(max_len=100))
    return [wire_size(e) for e in events]


async def kept(broker: Broker, log: str) -> tuple[list[int], int]:
    """Seqs of the events a log holds, and how many a reader from the start missed."""
    batch = await broker.read(log, "0", limit=100, timeout=0)
    return [e.seq for e in batch.events], batch.missed


@pytest.mark.parametrize("delta, expect", [(0, [1, 2, 3]), (-1, [2, 3]), (1, [1, 2, 3])])
def test_a_log_keeps_at_most_max_bytes(kind: Kind, delta: int, expect: list[int]) -> None:
    async def body(broker: Broker) -> None:
        budget = sum(await sizes(broker, 3)) + delta
        retention = Retention(max_len=100, max_bytes=budget)
        for _ in range(3):
            await broker.append("a", items(PAYLOAD), retention)
        assert await kept(broker, "a") == (expect, 3 - len(expect))

    run(kind, body)


def test_bytes_after_keep_after_are_never_trimmed(kind: Kind) -> None:
    async def body(broker: Broker) -> None:
        tiny = Retention(max_len=100, max_bytes=1, keep_after=1)
        for _ in range(3):
            await broker.append("a", items(PAYLOAD), tiny)
        # Only event 1 was read by the slowest watcher: the others stay, over budget.
        assert await kept(broker, "a") == ([2, 3], 1)
        # With no watcher, the budget holds.
        await broker.append("a", items(PAYLOAD), Retention(max_len=100, max_bytes=1))
        assert await kept(broker, "a") == ([], 4)

    run(kind, body)


@pytest.mark.parametrize("existing, refused", [(2, False), (3, True)])
def test_a_kind_has_at_most_max_logs(kind: Kind, existing: int, refused: bool) -> None:
    channels = Retention(max_len=10, kind="channel", max_logs=3, idle_ttl=60)

    async def body(broker: Broker) -> None:
        for i in range(existing):
            await broker.append(f"c{i}", items(i), channels)
        if refused:
            with pytest.raises(TooManyLogs) as caught:
                await broker.append("new", items(1), channels)
            assert 1 <= caught.value.retry_after <= 60
            assert kind.seq(await broker.last_id("new")) == 0
        else:
            await broker.append("new", items(1), channels)
        # Those that exist take more; another kind is counted apart.
        await broker.append("c0", items(2), channels)
        await broker.append("other", items(1), Retention(max_len=10))

    run(kind, body)


def test_idle_logs_of_a_kind_go_and_free_their_place(kind: Kind) -> None:
    channels = Retention(max_len=10, kind="channel", max_logs=2, idle_ttl=1.0)

    async def body(broker: Broker) -> None:
        await broker.append("idle", items(1), channels)
        await asyncio.sleep(0.6)
        await broker.append("busy", items(1), channels)
        with pytest.raises(TooManyLogs):
            await broker.append("new", items(1), channels)
        await asyncio.sleep(0.6)  # "idle" has been idle 1.2 s; "busy" 0.6 s
        await broker.sweep()
        assert await kept(broker, "idle") == ([], 0)
        assert await kept(broker, "busy") == ([1], 0)
        await broker.append("new", items(1), channels)
        with pytest.raises(TooManyLogs):
            await broker.append("idle", items(2), channels)

    run(kind, body)


# -- the process's budget -------------------------------------------------------


def memory(budget: int) -> MemoryBroker:
    return MemoryBroker(max_retained_bytes=budget)


async def fill_ab(broker: Broker, a: Retention, b: Retention) -> None:
    for _ in range(3):
        await broker.append("a", items(PAYLOAD), a)
    await broker.append("b", items(PAYLOAD), b)


@pytest.mark.parametrize("delta, a_missed", [(0, 0), (1, 0), (-1, 1)])
def test_memory_budget_trims_the_oldest_of_the_biggest_log(delta: int, a_missed: int) -> None:
    async def body() -> None:
        size = sum(await sizes(MemoryBroker(), 4))
        broker = memory(size + delta)
        keep = Retention(max_len=100)
        await fill_ab(broker, keep, keep)
        assert await kept(broker, "a") == ([1, 2, 3][a_missed:], a_missed)
        assert await kept(broker, "b") == ([1], 0)
        assert broker.retained_bytes <= size + delta

    asyncio.run(body())


def test_memory_budget_spares_what_a_watcher_has_not_read() -> None:
    async def body() -> None:
        size = sum(await sizes(MemoryBroker(), 4))
        broker = memory(size - 1)
        # "a" is a run whose watcher has read nothing: the smaller "b" goes instead.
        await fill_ab(broker, Retention(max_len=100, keep_after=0), Retention(max_len=100))
        assert await kept(broker, "a") == ([1, 2, 3], 0)
        assert await kept(broker, "b") == ([], 1)

    asyncio.run(body())


def test_memory_budget_holds_over_many_logs_and_readers_get_gaps() -> None:
    async def body() -> None:
        budget = 64 << 10
        broker = memory(budget)
        keep = Retention(max_len=10_000)
        for i in range(2_000):
            await broker.append(f"log{i % 50}", items(PAYLOAD), keep)
            assert broker.retained_bytes <= budget
        assert broker.retained_bytes > budget // 2
        # A reader from the start of any log is told what it missed, and gets the rest.
        for i in range(50):
            batch = await broker.read(f"log{i}", "0", limit=1_000, timeout=0)
            assert batch.missed + len(batch.events) == 40
            assert batch.missed > 0

    asyncio.run(body())


def test_memory_sweep_drops_idle_logs_and_their_bytes() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        channels = Retention(max_len=10, kind="channel", max_logs=5, idle_ttl=0.1)
        await broker.append("c", items(PAYLOAD), channels)
        assert broker.retained_bytes > 1000
        await asyncio.sleep(0.2)
        await broker.sweep()
        assert broker.retained_bytes == 0

    asyncio.run(body())


def test_redis_copies_here_stay_within_the_budget_and_lose_nothing(redis_server: Any) -> None:
    async def body() -> None:
        budget = 32 << 10
        broker = RedisBroker(redis_server.url, prefix="budget:", max_retained_bytes=budget)
        keep = Retention(max_len=10_000)
        try:
            logs = [f"log{i}" for i in range(10)]
            for log in logs:
                [first] = await broker.append(log, items(0), keep)
                # A reader that waited at the head: the log is followed here now.
                await broker.read(log, first.id, limit=10, timeout=0.05)
            for _ in range(1, 100):
                for log in logs:
                    await broker.append(log, items(PAYLOAD), keep)
                    assert broker.retained_bytes <= budget
            assert broker.retained_bytes > budget // 2
            for log in logs:
                batch = await broker.read(log, "0", limit=1_000, timeout=0)
                assert (len(batch.events), batch.missed) == (100, 0)
        finally:
            await broker.aclose()

    asyncio.run(body())


def test_redis_counts_bytes_in_the_meta_hash_and_expires_idle_logs(redis_server: Any) -> None:
    async def body() -> None:
        broker = RedisBroker(redis_server.url, prefix="meta:")
        raw = broker._redis  # the keys themselves are what is checked here
        try:
            events = await broker.append("c", items(PAYLOAD, PAYLOAD), Retention(max_len=1))
            assert int(await raw.hget("meta:c#meta", "bytes")) == wire_size(events[1])
            channels = Retention(max_len=10, kind="channel", max_logs=5, idle_ttl=30)
            await broker.append("d", items(1), channels)
            assert 0 < await raw.pttl("meta:d") <= 30_000
            assert 0 < await raw.pttl("meta:d#meta") <= 30_000
            assert await raw.zscore("meta:kind:channel", "d") is not None
        finally:
            await broker.aclose()

    asyncio.run(body())
