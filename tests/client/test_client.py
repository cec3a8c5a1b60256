"""`Client` and `AsyncClient` against a real server: streams, runs, channels, errors."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QUICK, LiveServer
from tidewire import Blob, Message, Settings, Tidewire
from tidewire.client import (
    AsyncClient,
    Client,
    ConnectError,
    Event,
    HTTPStatusError,
    RemoteBlob,
    RunFailed,
)
from tidewire.storage.local import LocalStorage

TRANSPORTS = ["ndjson", "sse", "ws"]
PIXEL = Blob(b"\x89PNG\r\n\x1a\n-not-really", "image/png")


def make_app(tmp_path: Path, **settings: Any) -> tuple[Tidewire, dict[str, Any]]:
    tw = Tidewire(settings=_settings(**settings), storage=LocalStorage(tmp_path / "data"))
    seen: dict[str, Any] = {"closed": threading.Event()}

    @tw.stream
    async def count(n: int = 3, label: str = "x") -> AsyncIterator[Any]:
        """Counts to n, with a tiny image on every event."""
        for i in range(n):
            yield {"i": i, "label": label, "img": PIXEL}

    @tw.stream
    def numbers(n: int = 3) -> Iterator[int]:
        yield from range(n)

    @tw.stream
    async def boom() -> AsyncIterator[int]:
        yield 1
        raise KeyError("the key")

    @tw.stream
    async def forever() -> AsyncIterator[Any]:
        try:
            i = 0
            while True:
                yield Message(i, event="tick")
                i += 1
                await asyncio.sleep(0.02)
        finally:
            seen["closed"].set()

    @tw.stream
    async def big() -> AsyncIterator[Any]:
        yield {"blob": Blob(bytes(range(256)) * 40, "application/x-test")}

    return tw, seen


def _settings(**overrides: Any) -> Settings:
    base = {
        "heartbeat": QUICK.heartbeat,
        "disconnect_grace": QUICK.disconnect_grace,
        "close_timeout": QUICK.close_timeout,
        "inline_blob_limit": 1024,
    }
    return Settings(**{**base, **overrides})


@pytest.fixture
def app(tmp_path: Path, serve: Callable[..., LiveServer]) -> tuple[LiveServer, dict[str, Any]]:
    tw, seen = make_app(tmp_path)
    return serve(tw), seen


@pytest.fixture
def server(app: tuple[LiveServer, dict[str, Any]]) -> LiveServer:
    return app[0]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stream_gives_typed_events_with_blobs_as_bytes(
    server: LiveServer, transport: Any
) -> None:
    with Client(server.url) as tw, tw.stream("count", transport=transport, n=3, label="hi") as s:
        assert s.run_id  # known as soon as the stream is open
        events = list(s)
    assert [e.event for e in events] == ["message"] * 3 + ["end"]
    assert all(isinstance(e, Event) for e in events)
    first = events[0].data
    assert first["i"] == 0 and first["label"] == "hi"
    assert (
        isinstance(first["img"], Blob)
        and first["img"] == PIXEL
        and first["img"].type == "image/png"
    )
    assert s.last_id == events[-1].id
    with Client(server.url) as tw:
        assert tw.run(s.run_id)["state"] == "finished"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_async_twin_gives_the_same_events(server: LiveServer, transport: Any) -> None:
    async def main() -> tuple[list[Event], list[Event]]:
        async with AsyncClient(server.url) as tw:
            async with tw.stream("numbers", {"n": 4}, transport=transport) as s:
                got = [e async for e in s]
            async with tw.watch(str(s.run_id), transport=transport) as again:
                replay = [e async for e in again]
            return got, replay

    got, replay = asyncio.run(main())
    assert [e.data for e in got] == [0, 1, 2, 3, None]
    assert got == replay  # the same ids, types and data when watched again


def test_a_sync_generator_streams_too_and_watch_resumes_after_an_id(server: LiveServer) -> None:
    with Client(server.url) as tw:
        with tw.stream("numbers", n=5) as s:
            events = list(s)
        with tw.watch(str(s.run_id), after=events[1].id, transport="sse") as rest:
            assert [e.id for e in rest] == [e.id for e in events[2:]]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_failed_run_raises_run_failed_with_the_remote_error(
    server: LiveServer, transport: Any
) -> None:
    seen: list[Event] = []
    with (
        Client(server.url) as tw,
        pytest.raises(RunFailed) as info,
        tw.stream("boom", transport=transport) as s,
    ):
        seen.extend(s)
    assert info.value.type == "KeyError" and "the key" in info.value.message
    assert info.value.run_id == s.run_id
    assert [e.data for e in seen] == [1]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_errors_carry_the_servers_status_and_message(server: LiveServer, transport: Any) -> None:
    with Client(server.url) as tw:
        with pytest.raises(HTTPStatusError) as unknown:
            tw.stream("nope", transport=transport).__enter__()
        assert unknown.value.status_code == 404 and "GET /streams" in str(unknown.value.detail)
        with pytest.raises(HTTPStatusError) as bad:
            tw.stream("count", transport=transport, n="many").__enter__()
        assert bad.value.status_code == 422 and "n: " in str(bad.value)
        with pytest.raises(HTTPStatusError) as gone:
            list(tw.watch("0123456789abcdef", transport=transport))
        assert gone.value.status_code == 404


def test_get_and_post_return_json_and_raise_on_errors(server: LiveServer) -> None:
    with Client(server.url) as tw:
        names = [s["name"] for s in tw.streams()]
        assert {"count", "numbers", "boom"} <= set(names)
        assert tw.get("/healthz")["status"] == "ok"
        started = tw.post("/streams/numbers", params={"detach": "true"}, json={"n": 2})
        assert set(started) == {"run", "events", "ws"}
        with pytest.raises(HTTPStatusError) as info:
            tw.post("/channels/ok/events", data={"a": "1"}, params={"event": "end"})
        assert info.value.status_code == 422 and "reserved" in str(info.value.detail)


def test_a_server_that_is_not_there_is_a_connect_error_at_once() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        for transport in TRANSPORTS:
            with Client(f"http://127.0.0.1:{port}") as tw, pytest.raises(ConnectError):
                tw.stream("demo", transport=transport).__enter__()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_closes_the_generator_and_ends_the_stream(
    app: tuple[LiveServer, dict[str, Any]], transport: Any
) -> None:
    server, seen = app
    with Client(server.url) as tw, tw.stream("forever", transport=transport) as s:
        kinds = []
        for event in s:
            kinds.append(event.event)
            if len(kinds) == 3:
                info = s.cancel()
                assert info["state"] == "cancelled"
        assert seen["closed"].is_set()  # the generator's `finally` ran
    assert kinds[:3] == ["tick"] * 3 and kinds[-1] == "cancelled"


def test_async_cancel(app: tuple[LiveServer, dict[str, Any]]) -> None:
    server, seen = app

    async def main() -> list[str]:
        async with AsyncClient(server.url) as tw, tw.stream("forever") as s:
            kinds = []
            async for event in s:
                kinds.append(event.event)
                if len(kinds) == 2:
                    await s.cancel()
            return kinds

    kinds = asyncio.run(main())
    assert kinds[-1] == "cancelled" and seen["closed"].is_set()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_publish_and_subscribe_with_replay(server: LiveServer, transport: Any) -> None:
    with Client(server.url) as tw:
        first = tw.publish("news", {"headline": "one"})
        second = tw.publish("news", b"\x00\xff", event="raw")
        third = tw.publish(
            "news", {"caption": "pic"}, files={"photo": ("p.png", PIXEL, "image/png")}
        )
        with tw.subscribe("news", after="0", transport=transport) as s:
            it = iter(s)
            events = [next(it) for _ in range(3)]
    assert [e.id for e in events] == [first, second, third]
    assert events[0].data == {"headline": "one"}
    assert events[1].event == "raw" and events[1].data == b"\x00\xff"
    assert events[2].data["caption"] == "pic" and events[2].data["photo"] == PIXEL


def test_publish_files_given_as_a_path_or_bytes(server: LiveServer, tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    path.write_bytes(PIXEL)
    with Client(server.url) as tw:
        sent = tw.publish("pics", None, files={"photo": path, "raw": b"\x01\x02"})
        with tw.subscribe("pics", after="0") as s:
            event = next(iter(s))
    assert event.id == sent
    assert event.data["photo"] == PIXEL and event.data["raw"] == b"\x01\x02"


def test_a_live_subscription_sees_what_is_published_after_it(server: LiveServer) -> None:
    with Client(server.url) as tw:
        tw.publish("live", "before")
        with tw.subscribe("live", transport="ws") as s:
            tw.publish("live", "after")
            assert next(iter(s)).data == "after"


def test_large_blobs_arrive_as_remote_blobs_read_on_access(server: LiveServer) -> None:
    expected = bytes(range(256)) * 40
    with Client(server.url) as tw, tw.stream("big") as s:
        blob = next(iter(s)).data["blob"]
        assert isinstance(blob, RemoteBlob) and blob.size == len(expected)
        assert blob.url.startswith("/files/")
        content = blob.read()
        assert content == expected and content.type == "application/x-test"
        assert blob.read() is content  # fetched once

    async def main() -> bytes:
        async with AsyncClient(server.url) as tw, tw.stream("big", transport="sse") as s:
            async for event in s:
                remote = event.data["blob"]
                with pytest.raises(TypeError, match="aread"):
                    remote.read()
                return bytes(await remote.aread())
        raise AssertionError("no event")

    assert asyncio.run(main()) == expected
