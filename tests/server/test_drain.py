"""`Tidewire.drain()` in a live server: what is refused, what is told, what is waited for.

The drain is started through a route of the test's own, on the server's loop,
as `tidewire serve` starts it at SIGTERM (tests/server/test_serving.py runs
that with real processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import QUICK, LiveServer, wait_for
from tests.redis_server import RedisServer
from tests.server.test_transport import closed_with, first_ndjson, rest_ndjson, sse_blocks
from tidewire import Tidewire
from tidewire.broker.redis import RedisBroker
from tidewire.server.compat import add_compat_routes
from tidewire.storage.local import LocalStorage
from tidewire.storage.s3 import S3Storage

DRAINING = {
    "message": "the server is shutting down; reconnect and resume from your last id",
    "draining": True,
}
TUS = {"Tus-Resumable": "1.0.0"}


class Drained:
    """A Tidewire whose drain a test can start and watch, and what its runs did."""

    def __init__(self, tw: Tidewire) -> None:
        self.tw = tw
        self.task: asyncio.Task[None] | None = None
        self.closed: list[str] = []  # runs whose `finally` ran
        app = tw.app

        @app.post("/test/drain")
        async def start(timeout: float = 30.0) -> None:
            self.task = asyncio.get_running_loop().create_task(tw.drain(timeout))

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()


@pytest.fixture
def drained(tmp_path: Any) -> Iterator[Drained]:
    tw = Tidewire(
        settings=dataclasses.replace(QUICK, drain_timeout=30.0), storage=LocalStorage(tmp_path)
    )
    d = Drained(tw)

    @tw.stream
    async def ticks(n: int = 1_000_000, interval: float = 0.05) -> AsyncIterator[int]:
        try:
            for i in range(n):
                yield i
                await asyncio.sleep(interval)
        finally:
            d.closed.append(f"ticks-{n}")

    @tw.stream
    async def stubborn() -> AsyncIterator[int]:
        try:
            yield 0
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.2)  # its `finally` takes a while, and is waited for
            d.closed.append("stubborn")

    yield d


def test_readyz_is_200_while_broker_and_storage_answer_and_503_once_draining(
    serve: Callable[..., LiveServer], drained: Drained
) -> None:
    server = serve(drained.tw)
    http = httpx.Client(base_url=server.url, timeout=10)
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "broker": "ok", "storage": "ok"}
    # A run keeps the drain going while the test looks.
    http.post("/streams/stubborn?detach=true").raise_for_status()
    http.post("/test/drain").raise_for_status()
    draining = http.get("/readyz")
    assert draining.status_code == 503
    assert draining.json()["status"] == "draining"
    assert http.get("/healthz").status_code == 200  # alive all the same


def test_new_runs_watches_subscriptions_and_uploads_get_503_with_retry_after(
    serve: Callable[..., LiveServer], drained: Drained
) -> None:
    server = serve(drained.tw)
    http = httpx.Client(base_url=server.url, timeout=10)
    run = http.post("/streams/stubborn?detach=true").json()["run"]
    http.post("/test/drain").raise_for_status()

    refused = [
        http.post("/streams/ticks", json={"n": 2}),
        http.get("/streams/ticks?n=2"),
        http.post("/streams/ticks?detach=true"),
        http.get(f"/runs/{run}/events"),
        http.get("/channels/c/events", headers={"accept": "text/event-stream"}),
        http.put("/files/a.txt", content=b"hello"),
        http.post("/files", files={"file": ("a.txt", b"hello")}),
        http.post("/uploads/", headers={**TUS, "Upload-Length": "5"}),
    ]
    for response in refused:
        assert response.status_code == 503, (response.request.url, response.text)
        assert response.headers["retry-after"] == "2"
        assert "shutting down" in response.json()["detail"]
        # A new connection for the retry, which a balancer sends elsewhere.
        assert response.headers["connection"] == "close"
    assert refused[-1].headers["tus-resumable"] == "1.0.0"
    for path in ("/streams/ticks/ws", f"/runs/{run}/ws", "/channels/c/ws"):
        with pytest.raises(InvalidStatus) as info:
            connect(server.ws_url + path, open_timeout=10)
        assert info.value.response.status_code == 503
        assert info.value.response.headers["retry-after"] == "2"
    # Not new work: what exists may still be looked at, published to, cancelled.
    assert http.get(f"/runs/{run}").json()["state"] == "running"
    published = http.post("/channels/c/events", json="still")
    assert published.status_code == 201 and published.headers["connection"] == "close"
    assert http.delete(f"/runs/{run}").json()["state"] == "cancelled"


def test_live_streams_on_every_transport_get_the_notice_and_end(
    serve: Callable[..., LiveServer], drained: Drained
) -> None:
    server = serve(drained.tw)
    http = httpx.Client(base_url=server.url, timeout=10)
    http.post("/channels/c/events", json="first").raise_for_status()
    with contextlib.ExitStack() as stack:
        # An attached run over NDJSON, a channel over SSE, a run over WebSocket.
        ndjson = stack.enter_context(http.stream("POST", "/streams/ticks", json={"n": 10_000}))
        lines = ndjson.iter_lines()
        first = first_ndjson(lines)
        assert first["data"] == 0
        sse = stack.enter_context(
            http.stream(
                "GET", "/channels/c/events?after=0", headers={"accept": "text/event-stream"}
            )
        )
        chunks = sse.iter_text()
        assert 'data: "first"' in sse_blocks(chunks, stop=len)[0].split("\n")
        ws = stack.enter_context(connect(server.ws_url + "/streams/ticks/ws?n=10000"))
        assert json.loads(ws.recv(timeout=10))["data"] == 0

        http.post("/test/drain").raise_for_status()

        *events, notice = rest_ndjson(lines)
        assert notice == {"event": "unavailable", "data": DRAINING}  # no id: not of the log
        assert all(e["event"] == "message" for e in events)
        [block] = sse_blocks(chunks, stop=lambda _: False)
        event, data = block.split("\n")  # and no `id:`: EventSource keeps its last one
        assert event == "event: unavailable"
        assert json.loads(data.removeprefix("data: ")) == DRAINING
        code, reason, frames = closed_with(ws)
        assert code == 1012 and reason is not None and "shutting down" in reason
        assert json.loads(frames[-1]) == {"event": "unavailable", "data": DRAINING}
        assert all(json.loads(f)["event"] == "message" for f in frames[:-1])


def test_a_tus_upload_begun_before_the_drain_goes_on(
    serve: Callable[..., LiveServer], drained: Drained
) -> None:
    server = serve(drained.tw)
    http = httpx.Client(base_url=server.url, timeout=10)
    created = http.post("/uploads/", headers={**TUS, "Upload-Length": "10"})
    assert created.status_code == 201
    location = created.headers["location"]
    patch = {**TUS, "Content-Type": "application/offset+octet-stream"}
    first = http.patch(location, content=b"hello", headers={**patch, "Upload-Offset": "0"})
    assert first.status_code == 204
    http.post("/streams/stubborn?detach=true").raise_for_status()  # the drain lasts
    http.post("/test/drain").raise_for_status()
    rest = http.patch(location, content=b"world", headers={**patch, "Upload-Offset": "5"})
    assert rest.status_code == 204
    file = rest.headers["tidewire-file"]
    assert http.get(f"/files/{file}").content == b"helloworld"


def test_the_drain_waits_for_runs_and_cancels_those_that_outlive_it(
    serve: Callable[..., LiveServer], drained: Drained
) -> None:
    server = serve(drained.tw)
    http = httpx.Client(base_url=server.url, timeout=10)
    quick = http.post("/streams/ticks?detach=true", json={"n": 8, "interval": 0.05}).json()
    slow = http.post("/streams/stubborn?detach=true").json()
    started = time.monotonic()
    http.post("/test/drain?timeout=1.5").raise_for_status()
    wait_for(lambda: drained.done, timeout=10, message="the drain did not end")
    took = time.monotonic() - started
    # The short run finished by itself; the other was cancelled at the timeout,
    # and the drain returned only after its `finally` had run.
    assert http.get(f"/runs/{quick['run']}").json()["state"] == "finished"
    assert http.get(f"/runs/{slow['run']}").json()["state"] == "cancelled"
    assert sorted(drained.closed) == ["stubborn", "ticks-8"]
    assert took >= 1.5


def test_a_drain_with_nothing_to_wait_for_ends_at_once(
    serve: Callable[..., LiveServer], drained: Drained
) -> None:
    server = serve(drained.tw)
    http = httpx.Client(base_url=server.url, timeout=10)
    started = time.monotonic()
    http.post("/test/drain?timeout=30").raise_for_status()
    wait_for(lambda: drained.done, timeout=10, message="the drain did not end")
    # Far from its 30 s: nothing was running.
    assert time.monotonic() - started < 10


# -- readiness when a part does not answer ---------------------------------------------


def readyz(server: LiveServer) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    response = httpx.get(f"{server.url}/readyz", timeout=30)
    return response.status_code, response.json(), time.monotonic() - started


def test_readyz_says_which_part_is_down_without_its_address(
    serve: Callable[..., LiveServer], start_redis: Callable[..., RedisServer], tmp_path: Any
) -> None:
    redis = start_redis(aof=False)
    tw = Tidewire(broker=RedisBroker(redis.url), storage=LocalStorage(tmp_path), settings=QUICK)
    server = serve(tw)
    assert readyz(server)[:2] == (200, {"status": "ready", "broker": "ok", "storage": "ok"})

    # Stopped (SIGSTOP): connections are accepted, nothing is answered.
    assert redis.process is not None
    redis.process.send_signal(signal.SIGSTOP)
    try:
        status, body, took = readyz(server)
        assert status == 503
        assert body["broker"] == "timeout" and body["storage"] == "ok"
        assert "broker" in body["detail"] and str(redis.port) not in json.dumps(body)
        assert took < 10  # the check's own timeout, not the client's
    finally:
        redis.process.send_signal(signal.SIGCONT)
    wait_for(lambda: readyz(server)[0] == 200, timeout=10, message="not ready after SIGCONT")

    # Killed: nothing listens.
    redis.kill()
    status, body, took = readyz(server)
    assert status == 503
    assert body["broker"] == "unreachable" and body["storage"] == "ok"
    text = json.dumps(body)
    assert str(redis.port) not in text and "127.0.0.1" not in text and "Error" not in text
    assert took < 10


def test_readyz_says_storage_is_down_when_s3_does_not_answer(
    serve: Callable[..., LiveServer],
) -> None:
    # Nothing listens on that port: the endpoint is not reachable.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    storage = S3Storage.from_url(f"s3://bucket?endpoint=http://127.0.0.1:{port}")
    server = serve(Tidewire(storage=storage, settings=QUICK))
    status, body, took = readyz(server)
    assert status == 503
    assert body["broker"] == "ok" and body["storage"] in ("unreachable", "timeout")
    assert str(port) not in json.dumps(body)
    assert took < 10


def test_the_original_stream_ends_at_the_drain_and_a_new_one_gets_503(
    serve: Callable[..., LiveServer], drained: Drained
) -> None:
    add_compat_routes(drained.tw.router, drained.tw, [b"\x89PNG"])
    server = serve(drained.tw)
    http = httpx.Client(base_url=server.url, timeout=10)
    # A line a minute: without the drain, the first is a minute away (and so
    # are the response's headers, which uvicorn sends with the first line).
    answer: list[httpx.Response] = []
    url = f"{server.url}/stream?n=100&interval=60"
    reader = threading.Thread(target=lambda: answer.append(httpx.get(url, timeout=30)))
    reader.start()
    wait_for(lambda: drained.tw.drain_state.in_flight == 1, timeout=10, message="no stream")
    started = time.monotonic()
    http.post("/test/drain").raise_for_status()
    reader.join(timeout=20)
    assert time.monotonic() - started < 10
    [ended] = answer
    assert ended.status_code == 200 and ended.text == ""  # the original's format has no notice
    refused = http.get("/stream?n=2&interval=0")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
    assert "shutting down" in refused.json()["detail"]
    wait_for(lambda: drained.done, timeout=10, message="the drain did not end")
