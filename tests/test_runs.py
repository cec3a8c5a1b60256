"""Streams (registration, parameters) and the thread that runs a sync generator."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

import pydantic
import pytest

from tidewire import Message, Settings, Tidewire
from tidewire.runs import Stream


def test_parameters_are_validated_from_the_signature() -> None:
    def gen(
        n: int, name: str = "x", scale: Annotated[float, pydantic.Field(gt=0)] = 1.0
    ) -> Iterator[int]:
        yield n

    stream = Stream(gen, "gen", "")
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
        run = tw.runs.start(tw.streams[name], params, attached=False)
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
        run = tw.runs.start(tw.streams["stubborn"], {}, attached=False)
        await asyncio.sleep(0.1)
        started = time.monotonic()
        tw.runs.cancel(run)
        assert run.task is not None
        await run.task
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
        run = tw.runs.start(tw.streams["endless"], {}, attached=False)
        await asyncio.sleep(0.05)
        assert tw.runs.cancel(run)
        assert run.task is not None
        await run.task
        assert closed.is_set()
        assert run.state == "cancelled"
        assert not tw.runs.cancel(run)  # already ended

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
