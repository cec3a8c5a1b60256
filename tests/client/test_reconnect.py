"""Connections cut mid-stream by a TCP proxy: the client resumes, nothing lost or repeated."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LiveServer, wait_for
from tests.proxy import Proxy
from tidewire import Settings, Tidewire
from tidewire.client import AsyncClient, Client, Disconnected, Event
from tidewire.storage.local import LocalStorage

TRANSPORTS = ["ndjson", "sse", "ws"]
N = 60


@pytest.fixture
def server(tmp_path: Path, serve: Callable[..., LiveServer]) -> LiveServer:
    # A long grace: an attached run waits for its watcher to come back.
    # A short SSE retry, so that SSE's reconnect (which honours it) is quick.
    settings = Settings(heartbeat=0.3, disconnect_grace=10, sse_retry_ms=100)
    tw = Tidewire(settings=settings, storage=LocalStorage(tmp_path))

    @tw.stream
    async def paced(n: int = N) -> AsyncIterator[dict[str, int]]:
        for i in range(n):
            yield {"i": i}
            await asyncio.sleep(0.01)

    return serve(tw, ws_ping=1.0)


def check_complete(events: list[Event], n: int = N) -> None:
    """Every event exactly once, in order, then `end`."""
    assert [e.data["i"] for e in events[:-1]] == list(range(n))
    assert events[-1].event == "end"
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_cut_stream_resumes_with_nothing_lost_or_repeated(
    server: LiveServer, proxy: type[Proxy], transport: Any
) -> None:
    p = proxy(server.port)
    events: list[Event] = []
    with Client(p.url) as tw, tw.stream("paced", transport=transport) as s:
        for event in s:
            events.append(event)
            if len(events) in (10, 35):
                p.cut()
    check_complete(events)
    assert s.reconnects == 2 and p.connections >= 3
    with Client(server.url) as tw:
        assert tw.run(str(s.run_id))["state"] == "finished"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_async_client_resumes_too(
    server: LiveServer, proxy: type[Proxy], transport: Any
) -> None:
    p = proxy(server.port)

    async def main() -> tuple[list[Event], int]:
        events: list[Event] = []
        async with AsyncClient(p.url) as tw, tw.stream("paced", transport=transport) as s:
            async for event in s:
                events.append(event)
                if len(events) == 20:
                    p.cut()
        return events, s.reconnects

    events, reconnects = asyncio.run(main())
    check_complete(events)
    assert reconnects == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_subscription_cut_before_any_event_misses_nothing(
    server: LiveServer, proxy: type[Proxy], transport: Any
) -> None:
    """Live from now, cut at once: what is published meanwhile still arrives."""
    p = proxy(server.port)
    with Client(server.url) as direct, Client(p.url) as tw:
        direct.publish("room", "old")  # before the subscription: not wanted
        with tw.subscribe("room", transport=transport) as s:
            p.cut()
            published = [direct.publish("room", n) for n in range(5)]
            it = iter(s)
            got = [next(it) for _ in range(5)]
    assert [e.id for e in got] == published
    assert [e.data for e in got] == list(range(5))
    assert s.reconnects >= 1


def test_a_subscription_cut_again_and_again_stays_exact(
    server: LiveServer, proxy: type[Proxy]
) -> None:
    p = proxy(server.port)
    stop = threading.Event()

    def publisher() -> None:
        with Client(server.url) as direct:
            for n in range(150):
                direct.publish("busy", n)
                if stop.wait(0.005):
                    return

    with Client(p.url) as tw, tw.subscribe("busy", transport="sse") as s:
        thread = threading.Thread(target=publisher)
        thread.start()
        got = []
        for event in s:
            got.append(event.data)
            if len(got) % 30 == 0:
                p.cut()
            if len(got) == 150:
                break
        stop.set()
        thread.join()
    assert got == list(range(150))
    assert s.reconnects == 4


def test_it_gives_up_with_disconnected_after_the_retry_limit(
    server: LiveServer, proxy: type[Proxy]
) -> None:
    p = proxy(server.port)
    with Client(p.url, retries=2) as tw, tw.subscribe("quiet") as s:
        wait_for(lambda: p.connections == 1)
        p.close()  # no server to come back to: every reconnect is refused
        with pytest.raises(Disconnected) as info:
            list(s)
    assert info.value.attempts == 2
    assert "2 reconnects failed" in str(info.value)
