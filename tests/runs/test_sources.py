"""Sources: the thread that runs a sync generator, and closing generators where they run."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

from tidewire import Settings, Tidewire


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
