"""Streams (registration, parameters) and the thread that runs a sync generator."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import httpx
import pydantic
import pytest
from fastapi import FastAPI

from tests.conftest import LiveServer, wait_for
from tests.wire import read_ndjson
from tidewire import Message, Settings, Tidewire
from tidewire import runs as runs_module
from tidewire.broker.memory import MemoryBroker
from tidewire.runs import StreamFunction


def test_parameters_are_validated_from_the_signature() -> None:
    def gen(
        n: int, name: str = "x", scale: Annotated[float, pydantic.Field(gt=0)] = 1.0
    ) -> Iterator[int]:
        yield n

    stream = StreamFunction(gen, "gen", "")
    assert stream.validate({"n": "3", "scale": "2.5"}) == {"n": 3, "name": "x", "scale": 2.5}
    assert stream.validate({"n": 1, "unknown": 2}) == {"n": 1, "name": "x", "scale": 1.0}
    with pytest.raises(pydantic.ValidationError) as missing:
        stream.validate({})
    assert missing.value.errors()[0]["loc"] == ("n",)
    with pytest.raises(pydantic.ValidationError):
        stream.validate({"n": 1, "scale": 0})
    schema = stream.schema()["params"]
    assert schema["required"] == ["n"]
    assert schema["properties"]["scale"]["exclusiveMinimum"] == 0


def test_registration_refuses_what_cannot_be_a_stream() -> None:
    tw = Tidewire()

    def not_a_generator() -> int:
        return 1

    def star_args(*items: int) -> Iterator[int]:
        yield from items

    def reserved(detach: bool) -> Iterator[bool]:
        yield detach

    for func in (not_a_generator, star_args, reserved):
        with pytest.raises(TypeError):
            tw.stream(func)

    @tw.stream(name="twice", description="first")
    def first() -> Iterator[int]:
        yield 1

    with pytest.raises(ValueError, match="already registered"):
        tw.stream(name="twice")(first)
    assert tw.streams["twice"].description == "first"


def test_message_names_the_event_type() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Message(1, event="end")
    assert Message(1, event="progress").event == "progress"


def collect(tw: Tidewire, name: str, **params: object) -> list[tuple[str, bytes]]:
    async def main() -> list[tuple[str, bytes]]:
        run = await tw.runs.start(tw.streams[name], params, attached=False)
        assert run.task is not None
        await run.task
        batch = await tw.broker.read(run.log, "0", limit=1000, timeout=0)
        return [(e.event, e.data_json) for e in batch.events]

    return asyncio.run(main())


def test_a_sync_generator_runs_outside_the_event_loop_thread() -> None:
    tw = Tidewire()
    threads: list[str] = []

    @tw.stream
    def where() -> Iterator[str]:
        threads.append(threading.current_thread().name)
        yield "a"
        yield "b"

    assert collect(tw, "where") == [("message", b'"a"'), ("message", b'"b"'), ("end", b"null")]
    assert threads == ["tidewire-generator"]


def test_a_sync_generator_that_blocks_in_close_does_not_hold_cancel_forever() -> None:
    tw = Tidewire(settings=Settings(close_timeout=0.2))
    released = threading.Event()
    finished = threading.Event()

    @tw.stream
    def stubborn() -> Iterator[int]:
        try:
            yield 1
            released.wait(10)  # ignores cancellation for as long as it likes
            yield 2
        finally:
            finished.set()

    async def main() -> str:
        run = await tw.runs.start(tw.streams["stubborn"], {}, attached=False)
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await tw.runs.cancel(run)
        assert time.monotonic() - started < 2  # gave up waiting after close_timeout
        return run.state

    assert asyncio.run(main()) == "cancelled"
    released.set()
    assert finished.wait(5)  # and the generator still ran its finally, at its next yield


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


def test_an_item_that_cannot_be_encoded_fails_the_run_and_closes_the_generator() -> None:
    tw = Tidewire()
    closed = threading.Event()
    closed_in: list[str] = []

    @tw.stream
    def odd() -> Iterator[object]:
        try:
            yield 1
            yield object()  # not JSON
            yield 2
        finally:
            # In its own thread, not later by the garbage collector wherever it runs.
            closed_in.append(threading.current_thread().name)
            closed.set()

    events = collect(tw, "odd")
    assert events[0] == ("message", b"1")
    assert events[-1][0] == "error"
    assert b"TypeError" in events[-1][1] and b"not JSON serializable" in events[-1][1]
    assert closed.wait(5)
    assert closed_in == ["tidewire-generator"]


# -- several processes sharing a broker --------------------------------------
#
# Two Tidewire instances on one broker stand in for two processes: each has
# its own runs and instance name and knows the other's runs only through the
# broker. (tests/test_cluster.py does the same with real processes on Redis.)


class Pair:
    """Instances `a` and `b` sharing one MemoryBroker, served under /a and /b."""

    def __init__(self, serve: Callable[..., LiveServer], settings: Settings) -> None:
        broker = MemoryBroker()
        self.a = Tidewire(broker=broker, settings=settings)
        self.b = Tidewire(broker=broker, settings=settings)
        self.finished = threading.Event()
        self.started = threading.Event()
        self.go = threading.Event()
        self.go.set()

        @self.a.stream
        async def ticks(
            n: int = 1_000_000, interval: float = 0.01, pad: int = 0
        ) -> AsyncIterator[Any]:
            try:
                self.started.set()
                while not self.go.is_set():
                    await asyncio.sleep(0.01)
                for i in range(n):
                    yield {"i": i, "pad": "x" * pad} if pad else i
                    await asyncio.sleep(interval)
            finally:
                self.finished.set()

        self.b.streams = self.a.streams
        app = FastAPI()
        app.mount("/a", self.a.app)
        app.mount("/b", self.b.app)
        self.url = serve(app).url

    def start(self, **params: Any) -> str:
        response = httpx.post(f"{self.url}/a/streams/ticks?detach=true", json=params)
        assert response.status_code == 202
        run_id: str = response.json()["run"]
        return run_id


# A lease short enough for quick tests, long enough that a loaded machine's
# stalls (both "processes" here share one Python) do not look like a death.
SHARED = Settings(heartbeat=0.3, disconnect_grace=0.3, close_timeout=2.0, lease=1.5)


def test_a_run_started_in_one_process_is_watched_from_another(
    serve: Callable[..., LiveServer],
) -> None:
    pair = Pair(serve, SHARED)
    run_id = pair.start(n=30, interval=0.005)
    events = read_ndjson(f"{pair.url}/b/runs/{run_id}/events")
    assert [e["data"] for e in events[:-1]] == list(range(30))
    assert events[-1]["event"] == "end"
    info = httpx.get(f"{pair.url}/b/runs/{run_id}").json()
    assert info["state"] == "finished" and info["events"] == 31
    assert httpx.get(f"{pair.url}/b/runs/0123456789abcdef").status_code == 404


def test_a_run_is_cancelled_from_another_process(serve: Callable[..., LiveServer]) -> None:
    pair = Pair(serve, SHARED)
    run_id = pair.start()
    assert pair.started.wait(5)
    response = httpx.delete(f"{pair.url}/b/runs/{run_id}", timeout=10)
    assert response.status_code == 200
    # DELETE answers once the generator's `finally` has run in the other process.
    assert pair.finished.is_set()
    assert response.json()["state"] == "cancelled"
    assert read_ndjson(f"{pair.url}/b/runs/{run_id}/events")[-1]["event"] == "cancelled"


def test_backpressure_holds_for_a_watcher_in_another_process(
    serve: Callable[..., LiveServer],
) -> None:
    settings = Settings(heartbeat=0.3, run_window=16, run_history=32, lease=SHARED.lease)
    pair = Pair(serve, settings)
    pair.go.clear()  # the generator waits until b's watcher is there
    # 16 MB: more than the socket buffers hold, so the reader's pace matters.
    run_id = pair.start(n=2000, interval=0, pad=8000)
    seen: list[int] = []
    with httpx.stream("GET", f"{pair.url}/b/runs/{run_id}/events", timeout=30) as response:
        pair.go.set()
        for line in response.iter_lines():
            if not line.strip():
                continue
            event = json.loads(line)
            if event["event"] != "message":
                assert event["event"] == "end", event
                break
            seen.append(event["data"]["i"])
            if len(seen) % 100 == 0:
                time.sleep(0.02)  # a slow reader: the generator must wait for it
    # With a history of 32 and nobody holding the generator back, this
    # reader would have got a `gap` (see the test above that shows it).
    assert seen == list(range(2000))


def test_a_watcher_elsewhere_is_told_when_the_running_process_dies(
    serve: Callable[..., LiveServer],
) -> None:
    pair = Pair(serve, SHARED)
    run_id = pair.start(n=5, interval=3600)  # yields once, then waits
    assert pair.started.wait(5)

    # "Kill" process a: it stops renewing its lease, and its run goes silent
    # without ending its log (as after kill -9).
    run = pair.a.runs.here(run_id)
    assert run is not None
    run.lost = True  # so that its own end is not written when we stop it
    for task in pair.a.runs._background:
        task.get_loop().call_soon_threadsafe(task.cancel)

    started = time.monotonic()
    events = read_ndjson(f"{pair.url}/b/runs/{run_id}/events")
    waited = time.monotonic() - started
    assert events[0]["data"] == 0
    assert events[-1]["event"] == "error"
    assert events[-1]["data"]["type"] == "WorkerLost"
    assert waited < 2 * SHARED.lease + 1
    info = httpx.get(f"{pair.url}/b/runs/{run_id}").json()
    assert info["state"] == "failed"
    assert run.task is not None
    run.task.get_loop().call_soon_threadsafe(run.task.cancel)


def test_an_attached_run_watched_only_elsewhere_is_cancelled_when_they_all_leave(
    serve: Callable[..., LiveServer],
) -> None:
    pair = Pair(serve, SHARED)
    # Started attached on a, with a's watcher gone at once; b watches it.
    with httpx.stream("GET", f"{pair.url}/a/streams/ticks?interval=0.01") as response:
        run_id = response.headers["tidewire-run"]
        with httpx.stream("GET", f"{pair.url}/b/runs/{run_id}/events") as watching:
            lines = watching.iter_lines()
            next(lines)
            response.close()
            time.sleep(SHARED.disconnect_grace + SHARED.lease)
            # b's watcher still holds it: the run goes on.
            assert httpx.get(f"{pair.url}/a/runs/{run_id}").json()["state"] == "running"
    wait_for(
        lambda: httpx.get(f"{pair.url}/a/runs/{run_id}").json()["state"] == "cancelled",
        timeout=SHARED.disconnect_grace + 3 * SHARED.lease + 2,
    )
    assert pair.finished.is_set()


def test_forgotten_runs_are_followed_by_one_heap_trim(
    serve: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs expiring together share one trim (a trim walks the whole heap).
    trims: list[float] = []
    monkeypatch.setattr(runs_module, "trim", lambda: trims.append(time.monotonic()))
    monkeypatch.setattr(runs_module, "TRIM_DELAY", 0.2)
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
