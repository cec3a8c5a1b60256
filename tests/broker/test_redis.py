"""RedisBroker on a real Redis: its ids and keys, one connection for every blocked reader,
several processes on one Redis, Redis going away and coming back, and tidewire served on it.

The Broker contract itself (what MemoryBroker does too) is in test_contract.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
import orjson
import pytest

from tests.conftest import QUICK, LiveServer, wait_for
from tests.redis_server import RedisServer
from tests.wire import Envelope, parse_sse, read_ndjson
from tidewire import Tidewire
from tidewire.broker import Batch, BrokerUnavailable, Retention
from tidewire.broker.redis import RedisBroker

T = TypeVar("T")

KEEP = Retention(max_len=1_000)
REDIS_ID = re.compile(r"^([0-9]+)-([0-9]+)$")

_prefixes = iter(range(1, 1 << 30))


def prefix() -> str:
    """Keys of this test's own on the shared Redis."""
    return f"redis{next(_prefixes)}-{time.time_ns()}:"


def run(test: Callable[[], Awaitable[T]], limit: float = 15) -> T:
    async def limited() -> T:
        async with asyncio.timeout(limit):
            return await test()

    return asyncio.run(limited())


def items(*values: object) -> list[tuple[str, bytes]]:
    return [("message", orjson.dumps(v)) for v in values]


async def until(predicate: Callable[[], bool], timeout: float = 5, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, message or "condition not met in time"
        await asyncio.sleep(0.01)


async def waiting(broker: RedisBroker, log: str, readers: int = 1) -> None:
    """Until `readers` reads of `log` wait in this broker (and so are past their first look)."""

    def count() -> int:
        mirror = broker._mirrors.get(log)
        if mirror is None:
            return 0
        return sum(not w.done() for ws in mirror.waiters.values() for w in ws)

    await until(lambda: count() >= readers, message=f"{readers} readers never waited on {log}")


def test_ids_are_stream_ids_and_every_seq_is_in_its_id(redis_server: RedisServer) -> None:
    keys = prefix()

    async def body() -> None:
        broker = RedisBroker(redis_server.url, prefix=keys)
        try:
            events = await broker.append("run:ab12", items("a", "b", "c"), KEEP)
        finally:
            await broker.aclose()
        now_ms = time.time() * 1000
        for seq, event in enumerate(events, 1):
            match = REDIS_ID.match(event.id)
            assert match is not None, event.id
            assert abs(int(match[1]) - now_ms) < 5_000, "ms is the time of the append"
            assert int(match[2]) == event.seq == seq

    run(body)
    # In Redis: a stream at <prefix><log>, short fields, and the log's own count beside it.
    client = redis_server.client()
    stream = client.xrange(f"{keys}run:ab12")
    assert [fields for _, fields in stream] == [
        {"t": "message", "d": '"a"'},
        {"t": "message", "d": '"b"'},
        {"t": "message", "d": '"c"'},
    ]
    meta = client.hgetall(f"{keys}run:ab12#meta")
    assert meta["seq"] == "3" and meta["last"] == stream[-1][0]


def test_trimmed_events_are_counted_from_the_ids_around_them(redis_server: RedisServer) -> None:
    async def body() -> None:
        broker = RedisBroker(redis_server.url, prefix=prefix())
        try:
            first = await broker.append("a", items(*range(1, 6)), KEEP)
            # Five more in one batch, with only four kept: events 1-6 are gone.
            await broker.append("a", items(*range(6, 11)), Retention(max_len=4))
            batch = await broker.read("a", first[1].id, limit=100, timeout=0)
            assert batch.missed == 4, "3, 4, 5 and 6"
            assert batch.resume_id is not None and batch.resume_id.endswith("-6")
            assert [e.seq for e in batch.events] == [7, 8, 9, 10]
            # The seq counter survives even an empty-looking log: it is in Redis, not here.
            other = RedisBroker(broker.url, prefix=broker.prefix)
            try:
                [next_event] = await other.append("a", items(11), KEEP)
                assert next_event.seq == 11
            finally:
                await other.aclose()
        finally:
            await broker.aclose()

    run(body)


def test_readers_far_behind_read_the_stream_itself(redis_server: RedisServer) -> None:
    """This process keeps only `window` events of a log; a reader further back reads Redis."""

    async def body() -> None:
        broker = RedisBroker(redis_server.url, prefix=prefix(), window=4)
        try:
            live = asyncio.create_task(broker.read("a", "0", limit=100, timeout=None))
            await waiting(broker, "a")
            await broker.append("a", items(*range(1, 31)), KEEP)
            assert len((await live).events) == 30
            assert len(broker._mirrors["a"].events) == 4
            after, seqs = "0", []
            while len(seqs) < 30:
                batch = await broker.read("a", after, limit=7, timeout=1)
                assert batch.events and not batch.missed
                seqs += [e.seq for e in batch.events]
                after = batch.events[-1].id
            assert seqs == list(range(1, 31))
        finally:
            await broker.aclose()

    run(body)


def test_one_connection_follows_every_blocked_reader(start_redis: Callable[..., Any]) -> None:
    server: RedisServer = start_redis(aof=False)
    inspect = server.client()

    def connections() -> int:
        return len(inspect.client_list()) - 1  # not this one

    async def body() -> None:
        broker = RedisBroker(server.url, max_connections=8)
        try:
            logs = [f"channel:c{i}" for i in range(50)]
            readers = [
                asyncio.create_task(broker.read(logs[i % 50], "0", limit=10, timeout=None))
                for i in range(200)
            ]
            for log in logs:
                await waiting(broker, log, 4)
            # 200 readers wait: on the following task's one connection, plus
            # the pool's few, which they do not hold.
            assert connections() <= 8 + 1
            # Sampled until the following task is inside an XREAD (it leaves it
            # for a moment each time a new log joins): then it is the only one.
            xreads: list[int] = []
            await until(
                lambda: (
                    xreads.append(sum(c["cmd"] == "xread" for c in inspect.client_list()))
                    or xreads[-1] > 0
                ),
                message="no connection ever blocked in XREAD",
            )
            assert xreads[-1] == 1
            for log in logs:
                await broker.append(log, items(log), KEEP)
            batches = await asyncio.wait_for(asyncio.gather(*readers), 5)
            assert [b.events[0].data for b in batches] == [logs[i % 50] for i in range(200)]
            assert connections() <= 8 + 1
        finally:
            await broker.aclose()
        await until(lambda: connections() == 0, message="aclose must close every connection")

    run(body)


def test_readers_arriving_together_share_their_commands(
    start_redis: Callable[..., Any],
) -> None:
    server: RedisServer = start_redis(aof=False)
    inspect = server.client()

    def calls(command: str) -> int:
        stats = inspect.info("commandstats").get(f"cmdstat_{command}")
        return int(stats["calls"]) if stats else 0

    async def body() -> None:
        broker = RedisBroker(server.url)
        try:
            await broker.append("channel:c", items(1, 2, 3), KEEP)
            hget, evalsha = calls("hget"), calls("evalsha")
            heads = await asyncio.gather(*(broker.last_id("channel:c") for _ in range(1_000)))
            batches = await asyncio.gather(
                *(broker.read("channel:c", "0", limit=10, timeout=0) for _ in range(1_000))
            )
            assert len(set(heads)) == 1 and all(len(b.events) == 3 for b in batches)
            assert calls("hget") - hget < 20 and calls("evalsha") - evalsha < 20
        finally:
            await broker.aclose()

    run(body)


def test_a_process_reads_its_own_appends_while_others_read_too(
    redis_server: RedisServer,
) -> None:
    """Sharing a read under way must never hand back a reply older than one's own append."""

    async def body() -> None:
        broker = RedisBroker(redis_server.url, prefix=prefix())
        gate = asyncio.Event()
        fetch = broker._fetch

        async def held(*args: Any) -> Any:
            reply = await fetch(*args)
            await gate.wait()  # the reply is in, but not handed out yet
            return reply

        broker._fetch = held  # type: ignore[method-assign]
        try:
            [last] = await broker.append("channel:c", items(0), KEEP)
            before = asyncio.create_task(broker.read("channel:c", last.id, limit=9, timeout=0))
            await until(lambda: bool(broker._inflight))
            [event] = await broker.append("channel:c", items(1), KEEP)
            after = asyncio.create_task(broker.read("channel:c", last.id, limit=9, timeout=0))
            await asyncio.sleep(0.05)
            gate.set()
            assert (await before).events == []
            assert [e.id for e in (await after).events] == [event.id]
        finally:
            await broker.aclose()

    run(body)


def test_a_log_read_while_the_following_task_blocks_is_followed_at_once(
    redis_server: RedisServer,
) -> None:
    """The XREAD under way blocks for seconds: a new log must not wait for it to return."""
    keys = prefix()

    async def body() -> None:
        here = RedisBroker(redis_server.url, prefix=keys)
        there = RedisBroker(redis_server.url, prefix=keys)  # another process
        try:
            first = asyncio.create_task(here.read("x", "0", limit=10, timeout=None))
            await waiting(here, "x")
            await until(lambda: here._blocked is not None, message="never blocked in XREAD")
            second = asyncio.create_task(here.read("y", "0", limit=10, timeout=None))
            await waiting(here, "y")
            await asyncio.sleep(0.05)  # let the XREAD that covers y begin
            started = time.monotonic()
            await there.append("y", items("for y"), KEEP)
            batch = await asyncio.wait_for(second, 3)
            assert [e.data for e in batch.events] == ["for y"]
            assert time.monotonic() - started < 1, "well within the 5 s block"
            assert not first.done()
            first.cancel()
        finally:
            await here.aclose()
            await there.aclose()

    run(body)


def test_two_brokers_on_one_redis_see_each_others_appends_live(
    redis_server: RedisServer,
) -> None:
    keys = prefix()

    async def body() -> None:
        a = RedisBroker(redis_server.url, prefix=keys)
        b = RedisBroker(redis_server.url, prefix=keys)

        async def follow(broker: RedisBroker) -> tuple[list[int], bool]:
            after, seqs = "0", []
            while True:
                batch = await broker.read("run:1", after, limit=16, timeout=5)
                assert batch != Batch(), "timed out"
                seqs += [e.seq for e in batch.events]
                if batch.ended:
                    return seqs, True
                after = batch.events[-1].id

        try:
            readers = [asyncio.create_task(follow(x)) for x in (a, a, b, b)]
            await waiting(a, "run:1", 2)
            await waiting(b, "run:1", 2)
            writers = {0: a, 1: b}
            for i in range(40):
                await writers[i % 2].append("run:1", items(*range(i * 3, i * 3 + 3)), KEEP)
            await a.end("run:1")
            for seqs, ended in await asyncio.wait_for(asyncio.gather(*readers), 5):
                assert seqs == list(range(1, 121)) and ended
            # A reader of an ended log does not wait, in either process.
            for broker in (a, b):
                batch = await broker.read("run:1", await b.last_id("run:1"), limit=1, timeout=5)
                assert batch.ended and not batch.events
        finally:
            await a.aclose()
            await b.aclose()

    run(body)


def test_a_log_deleted_and_begun_again_elsewhere_is_followed_on(
    redis_server: RedisServer,
) -> None:
    """Its seqs start again at 1, but its ids still come after the old ones."""
    keys = prefix()

    async def body() -> None:
        here = RedisBroker(redis_server.url, prefix=keys)
        there = RedisBroker(redis_server.url, prefix=keys)
        try:
            old = await there.append("channel:x", items(1, 2, 3), KEEP)
            reader = asyncio.create_task(here.read("channel:x", old[-1].id, limit=10, timeout=5))
            await waiting(here, "channel:x")
            await there.delete("channel:x")
            [new] = await there.append("channel:x", items("again"), KEEP)
            assert new.seq == 1
            batch = await asyncio.wait_for(reader, 3)
            assert [(e.id, e.data) for e in batch.events] == [(new.id, "again")]
            assert batch.missed == 0
        finally:
            await here.aclose()
            await there.aclose()

    run(body)


def test_ended_logs_expire_and_deleted_logs_leave_nothing(redis_server: RedisServer) -> None:
    keys = prefix()
    client = redis_server.client()

    async def body() -> None:
        broker = RedisBroker(redis_server.url, prefix=keys, ended_ttl=60)
        try:
            await broker.append("run:e", items(1), KEEP)
            await broker.append("channel:d", items(1), KEEP)
            assert client.pttl(f"{keys}run:e") == -1, "a log being written does not expire"
            await broker.end("run:e")
            for key in (f"{keys}run:e", f"{keys}run:e#meta"):
                assert 50_000 < client.pttl(key) <= 60_000
            await broker.delete("channel:d")
            assert client.keys(f"{keys}channel:d*") == []
        finally:
            await broker.aclose()

    run(body)


def test_idle_logs_are_no_longer_followed(redis_server: RedisServer) -> None:
    async def body() -> None:
        broker = RedisBroker(redis_server.url, prefix=prefix())
        broker.idle, broker.block_ms = 0.2, 50
        try:
            assert await broker.read("a", "0", limit=1, timeout=0.05) == Batch()
            assert "a" in broker._mirrors
            await until(lambda: "a" not in broker._mirrors, message="the log is still followed")
            await until(lambda: broker._blocked is None)
            # Read again, it is followed again.
            reader = asyncio.create_task(broker.read("a", "0", limit=1, timeout=None))
            await waiting(broker, "a")
            await broker.append("a", items(1), KEEP)
            assert len((await asyncio.wait_for(reader, 5)).events) == 1
        finally:
            await broker.aclose()

    run(body)


def test_redis_down_fails_fast_and_recovers_with_nothing_lost(
    start_redis: Callable[..., Any],
) -> None:
    server: RedisServer = start_redis(aof=True)

    async def quickly(call: Awaitable[Any]) -> None:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await call
        assert time.monotonic() - started < 1.5, "BrokerUnavailable must come fast"

    async def body() -> None:
        broker = RedisBroker(server.url)
        other = RedisBroker(server.url)  # another process, appending
        try:
            before = await broker.append("run:r", items(1, 2, 3), KEEP)
            await broker.put_state("run:r", {"state": "running"})
            blocked = asyncio.create_task(
                broker.read("run:r", before[-1].id, limit=10, timeout=None)
            )
            await waiting(broker, "run:r")

            server.kill()
            await quickly(blocked)
            await quickly(broker.read("run:r", before[-1].id, limit=10, timeout=5))
            await quickly(broker.read("run:r", "0", limit=10, timeout=0))
            await quickly(broker.append("run:r", items(4), KEEP))
            await quickly(broker.last_id("run:r"))
            await quickly(broker.end("run:r"))
            await quickly(broker.get_state("run:r"))
            await quickly(broker.claim("lease", "me", 5))
            listener = broker.listen("control:x")
            await quickly(listener.__anext__())

            server.start()  # same port, same directory: the AOF is read back
            # The same broker, without a restart of its own, goes on.
            everything = await broker.read("run:r", "0", limit=10, timeout=0)
            assert [e.id for e in everything.events] == [e.id for e in before]
            assert await broker.get_state("run:r") == {"state": "running"}
            reader = asyncio.create_task(
                broker.read("run:r", before[-1].id, limit=10, timeout=None)
            )
            await waiting(broker, "run:r")
            [after] = await other.append("run:r", items(4), KEEP)
            assert after.seq == 4, "the count went on where it was"
            batch = await asyncio.wait_for(reader, 5)
            assert [(e.id, e.data) for e in batch.events] == [(after.id, 4)]
        finally:
            await broker.aclose()
            await other.aclose()

    run(body, limit=30)


def test_listeners_hear_messages_from_another_broker(redis_server: RedisServer) -> None:
    keys = prefix()

    async def body() -> None:
        a = RedisBroker(redis_server.url, prefix=keys)
        b = RedisBroker(redis_server.url, prefix=keys)
        heard: list[str] = []

        async def listen() -> None:
            async for message in a.listen("control:one"):
                heard.append(message)

        try:
            listener = asyncio.create_task(listen())
            while not heard:
                await b.send("control:one", "cancel r1")
                await asyncio.sleep(0.01)
            assert set(heard) == {"cancel r1"}
            listener.cancel()
        finally:
            await a.aclose()
            await b.aclose()

    run(body)


# -- tidewire served on Redis ------------------------------------------------------


class SSEReader(threading.Thread):
    """Read SSE events of a channel until `limit` came."""

    def __init__(self, url: str, limit: int) -> None:
        super().__init__(daemon=True)
        self.url, self.limit = url, limit
        self.events: list[Envelope] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            headers = {"accept": "text/event-stream"}
            with httpx.stream("GET", self.url, headers=headers, timeout=10) as response:
                assert response.status_code == 200
                buffer = ""
                for text in response.iter_text():
                    buffer += text
                    while "\n\n" in buffer:
                        block, buffer = buffer.split("\n\n", 1)
                        self.events += parse_sse(block + "\n\n")[0]
                        if len(self.events) >= self.limit:
                            return
        except BaseException as exc:
            self.error = exc


def test_tidewire_serves_channels_and_runs_from_redis(
    serve: Callable[..., LiveServer], redis_server: RedisServer
) -> None:
    settings = dataclasses.replace(QUICK, run_window=4, run_history=16)
    tw = Tidewire(broker=RedisBroker(redis_server.url, prefix=prefix()), settings=settings)

    @tw.stream
    async def count(n: int = 3) -> AsyncIterator[dict[str, int]]:
        for i in range(n):
            yield {"i": i}

    server = serve(tw)
    http = httpx.Client(base_url=server.url, timeout=10)

    def publish(value: int) -> str:
        response = http.post("/channels/news/events", json={"n": value})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    published = [publish(i) for i in range(3)]
    assert all(REDIS_ID.match(id) for id in published)

    # History then live, on both transports.
    url = f"{server.url}/channels/news/events?after=0"
    ndjson: list[Envelope] = []
    ndjson_reader = threading.Thread(target=lambda: ndjson.extend(read_ndjson(url, limit=5)))
    sse_reader = SSEReader(url, limit=5)
    ndjson_reader.start()
    sse_reader.start()
    wait_for(lambda: len(sse_reader.events) >= 3, message="SSE history")
    published += [publish(i) for i in (3, 4)]
    ndjson_reader.join(10)
    sse_reader.join(10)
    assert sse_reader.error is None
    for events in (ndjson, sse_reader.events):
        assert [(e["id"], e["event"], e["data"]) for e in events] == [
            (id, "message", {"n": i}) for i, id in enumerate(published)
        ]

    # A run, with backpressure: its watcher's positions are the seqs in Redis ids.
    run_events = read_ndjson(f"{server.url}/streams/count?n=40")
    assert [e["data"] for e in run_events[:-1]] == [{"i": i} for i in range(40)]
    assert run_events[-1]["event"] == "end"
    assert [int(e["id"].rpartition("-")[2]) for e in run_events] == list(range(1, 42))
    assert json.loads(http.get("/healthz").text)["status"] == "ok"
