"""What every transport says when the broker goes away under a live stream,
and how an idle stream learns that its client left.

docs/http.md: NDJSON ends with `{"event": "unavailable", ...}`, SSE with an
`event: unavailable` block, a WebSocket with close code 1013; none of them
carries an id, so a client keeps the last one it had and resumes from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.conftest import QUICK, LiveServer, wait_for
from tests.redis_server import RedisServer
from tidewire import Settings, Tidewire
from tidewire.broker.redis import RedisBroker

UNAVAILABLE = "the broker is unreachable; reconnect and resume from your last id"


def first_ndjson(lines: Any) -> dict[str, Any]:
    for line in lines:
        if line.strip():
            return dict(json.loads(line))
    raise AssertionError("the stream ended before its first event")


def rest_ndjson(lines: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.strip()]


def sse_blocks(chunks: Any, stop: Callable[[list[str]], bool]) -> list[str]:
    """SSE blocks (comments and `retry:` left out) until `stop(blocks)` or the body ends."""
    blocks: list[str] = []
    buffer = ""
    for text in chunks:
        buffer += text
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            lines = [line for line in block.split("\n") if not line.startswith((":", "retry:"))]
            if lines:
                blocks.append("\n".join(lines))
                if stop(blocks):
                    return blocks
    return blocks


def closed_with(ws: ClientConnection) -> tuple[int | None, str | None, list[str]]:
    """Frames until the server closes; its close code and reason."""
    frames: list[str] = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            frame = ws.recv(timeout=10)
            assert isinstance(frame, str)
            frames.append(frame)
    return ws.close_code, ws.close_reason, frames


def test_redis_going_away_is_told_on_every_transport(
    serve: Callable[..., LiveServer], start_redis: Callable[..., RedisServer]
) -> None:
    redis = start_redis(aof=False)
    # A short lease: the run below waits that long for Redis when the server stops.
    tw = Tidewire(broker=RedisBroker(redis.url), settings=dataclasses.replace(QUICK, lease=1.5))

    @tw.stream
    async def one() -> AsyncIterator[str]:
        yield "first"
        await asyncio.Event().wait()  # then nothing, until it is cancelled

    server = serve(tw)
    http = httpx.Client(base_url=server.url, timeout=10)
    assert http.post("/channels/c/events", json="first").status_code == 201
    run = http.post("/streams/one?detach=true").json()["run"]
    paths = ["/channels/c/events?after=0", f"/runs/{run}/events"]

    with contextlib.ExitStack() as stack:
        ndjson, sse, ws = [], [], []
        for path in paths:
            response = stack.enter_context(http.stream("GET", path))
            lines = response.iter_lines()
            assert first_ndjson(lines)["data"] == "first"
            ndjson.append(lines)

            response = stack.enter_context(
                http.stream("GET", path, headers={"accept": "text/event-stream"})
            )
            chunks = response.iter_text()
            assert 'data: "first"' in sse_blocks(chunks, stop=len)[0].split("\n")
            sse.append(chunks)

            socket = stack.enter_context(
                connect(server.ws_url + path.replace("/events", "/ws"), open_timeout=10)
            )
            assert json.loads(socket.recv(timeout=10))["data"] == "first"
            ws.append(socket)

        redis.stop()

        for lines in ndjson:
            [notice] = rest_ndjson(lines)
            assert notice == {"event": "unavailable", "data": {"message": UNAVAILABLE}}
        for chunks in sse:
            [notice] = sse_blocks(chunks, stop=lambda _: False)
            event, data = notice.split("\n")  # and no `id:`: the client keeps its last one
            assert event == "event: unavailable"
            assert json.loads(data.removeprefix("data: ")) == {"message": UNAVAILABLE}
        for socket in ws:
            code, reason, frames = closed_with(socket)
            assert (code, frames) == (1013, [])
            assert reason is not None and "unreachable" in reason

    # New subscriptions "live from now" are refused while it is away: where "now" is
    # in the log cannot be known without it.
    assert http.get("/channels/c/events").status_code == 503
    with pytest.raises(Exception, match="503"):
        connect(server.ws_url + "/channels/c/ws", open_timeout=10)


def test_frames_sent_just_before_a_close_are_all_published(
    serve: Callable[..., LiveServer],
) -> None:
    # A publisher that sends and closes at once: writing its echo fails, and
    # the frames still queued behind it must be published all the same
    # (33 to 190 of 200 were, before).
    # 600 frames from one client: over the default publish rate, not this test's subject.
    server = serve(Tidewire(settings=Settings(publish_rate=1e6, publish_burst=10**6)))
    for channel in ("drain-a", "drain-b", "drain-c"):
        with connect(f"{server.ws_url}/channels/{channel}/ws", close_timeout=1) as ws:
            for i in range(200):
                ws.send(json.dumps({"i": i}))
    for channel in ("drain-a", "drain-b", "drain-c"):
        seen: list[int] = []
        timeout = httpx.Timeout(10.0, read=2.0)
        url = f"{server.url}/channels/{channel}/events"
        with (
            contextlib.suppress(httpx.ReadTimeout),
            httpx.stream("GET", url, params={"after": "0"}, timeout=timeout) as response,
        ):
            for line in response.iter_lines():
                event = json.loads(line) if line.strip() else None
                if event is not None and event["event"] == "message":
                    seen.append(event["data"]["i"])
                if seen and seen[-1] == 199:
                    break
        assert seen == list(range(200)), f"{channel}: {len(seen)} of 200 published"


def open_idle_subscriptions(server: LiveServer, n: int) -> list[socket.socket]:
    """`n` SSE subscriptions to channel `idle` over raw sockets, each past its first block."""
    request = b"GET /channels/idle/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    sockets = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sockets.append(sock)
    return sockets


def server_loop(server: LiveServer) -> asyncio.AbstractEventLoop:
    """The event loop of a server that holds a connection."""
    loop: asyncio.AbstractEventLoop = next(iter(server.server.server_state.connections)).loop
    return loop


def test_an_idle_subscription_keeps_nothing_it_wrote(serve: Callable[..., LiveServer]) -> None:
    # A caught-up subscription waits in its stream's frame for as long as it is
    # idle: what that frame's locals hold, it holds (the first block, its batch,
    # the last message; ~0.3 KB an idle stream, bench W4).
    server = serve(Tidewire(settings=dataclasses.replace(QUICK, heartbeat=0.2)))
    sockets = open_idle_subscriptions(server, 1)
    state = server.server.server_state
    wait_for(lambda: len(state.tasks) == 1)
    task = next(iter(state.tasks))
    time.sleep(0.5)  # past a heartbeat or two: their messages are not held either

    async def frame_locals() -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        coro: Any = task.get_coro()
        while coro is not None and hasattr(coro, "cr_frame"):
            found[coro.__qualname__] = set(coro.cr_frame.f_locals)
            coro = coro.cr_await
        return found

    found = asyncio.run_coroutine_threadsafe(frame_locals(), server_loop(server)).result(10)
    assert "LogResponse._follow" in found, found
    written = {"parts", "batch", "body", "chunk", "retry", "beat"}
    assert not written & found["LogResponse._follow"], found["LogResponse._follow"]
    for sock in sockets:
        sock.close()


def test_an_idle_subscription_is_ended_by_its_client_leaving_without_a_task_of_its_own(
    serve: Callable[..., LiveServer],
) -> None:
    # Under tidewire's protocol the connection itself cancels a stream whose
    # client goes (server/protocol.py `watch_client`): no task waits in
    # `receive` beside each idle subscription (~0.8 KB each, bench W4; there
    # was one per subscription before). The leaving must still end it, at
    # once: not at the next heartbeat, whose write would find it gone.
    tw = Tidewire(settings=dataclasses.replace(QUICK, heartbeat=60.0))
    server = serve(tw)
    sockets = open_idle_subscriptions(server, 3)
    state = server.server.server_state

    async def tasks() -> list[str]:
        return [t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    def streams() -> int:
        return len(state.tasks)

    wait_for(lambda: streams() == 3)
    names = asyncio.run_coroutine_threadsafe(tasks(), server_loop(server)).result(10)
    assert not [name for name in names if "listener" in name], names

    for sock in sockets:
        sock.close()
    wait_for(lambda: streams() == 0, message="the streams did not end when their clients left")


def test_under_another_protocol_a_client_leaving_still_ends_its_subscription(
    serve: Callable[..., LiveServer],
) -> None:
    # uvicorn's h11 protocol is not tidewire's: no connection watches the
    # stream, which then waits in `receive` for the client's leaving.
    server = serve(Tidewire(settings=dataclasses.replace(QUICK, heartbeat=60.0)), http="h11")
    sockets = open_idle_subscriptions(server, 2)
    state = server.server.server_state
    wait_for(lambda: len(state.tasks) == 2)
    for sock in sockets:
        sock.close()
    wait_for(lambda: not state.tasks, message="the streams did not end when their clients left")
