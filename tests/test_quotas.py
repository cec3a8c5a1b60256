"""Per-client quotas on real servers: runs, connections, publish rate, open
uploads and stored bytes, each at, under and over its value; counted across
two Tidewire instances ("processes") on one memory broker and on one real Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import LiveServer, wait_for
from tidewire import Settings, Tidewire
from tidewire.broker import Broker
from tidewire.broker.memory import MemoryBroker
from tidewire.storage.local import LocalStorage

TUS = {"Tus-Resumable": "1.0.0"}


class Pair:
    """Instances `a` and `b` on one broker, served under /a and /b."""

    def __init__(
        self, serve: Callable[..., LiveServer], broker: Broker, data: Path, **limits: Any
    ) -> None:
        settings = Settings(heartbeat=0.3, disconnect_grace=0.3, close_timeout=2.0, **limits)
        storage = LocalStorage(data)
        self.a = Tidewire(broker=broker, storage=storage, settings=settings)
        self.b = Tidewire(broker=broker, storage=storage, settings=settings)

        @self.a.stream
        async def forever() -> AsyncIterator[int]:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.05)

        @self.a.stream
        async def quick() -> AsyncIterator[int]:
            yield 1

        self.b.streams = self.a.streams
        app = FastAPI()
        app.mount("/a", self.a.app)
        app.mount("/b", self.b.app)
        self.url = serve(app).url
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def detach(self, node: str = "a", stream: str = "forever") -> httpx.Response:
        return self.http.post(f"/{node}/streams/{stream}?detach=true")


@pytest.fixture(params=["memory", "redis"])
def shared(request: pytest.FixtureRequest) -> Callable[..., Broker]:
    """Makes the one broker two instances share: memory, or a real Redis."""

    def make() -> Broker:
        if request.param == "memory":
            return MemoryBroker()
        from tidewire.broker.redis import RedisBroker

        server = request.getfixturevalue("redis_server")
        return RedisBroker(server.url, prefix=f"{request.node.name}-{time.time_ns()}:")

    return make


@pytest.fixture
def pair(
    serve: Callable[..., LiveServer], shared: Callable[..., Broker], tmp_path: Path
) -> Callable[..., Pair]:
    return lambda **limits: Pair(serve, shared(), tmp_path / "data", **limits)


def assert_too_many(response: httpx.Response, limit: str) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    detail = response.json()["detail"]
    assert "the most it may" in detail or limit in detail, detail


# -- runs ----------------------------------------------------------------------


def test_runs_per_client_across_processes_and_a_slot_frees_when_a_run_ends(
    pair: Callable[..., Pair],
) -> None:
    p = pair(max_runs_per_client=2)
    first = p.detach("a")
    assert first.status_code == 202  # under
    assert p.detach("b").status_code == 202  # at: one on each process
    over = p.detach("a")
    assert_too_many(over, "runs")
    assert_too_many(p.detach("b"), "runs")
    # Ending one frees its slot, on either process.
    run = first.json()["run"]
    assert p.http.delete(f"/a/runs/{run}").status_code == 200
    assert p.detach("b").status_code == 202
    assert_too_many(p.detach("a"), "runs")


def test_a_finished_run_frees_its_slot(pair: Callable[..., Pair]) -> None:
    p = pair(max_runs_per_client=1)
    run = p.detach("a", "quick").json()["run"]
    wait_for(lambda: p.http.get(f"/a/runs/{run}").json()["state"] == "finished")
    assert p.detach("b", "quick").status_code == 202


# -- connections ---------------------------------------------------------------


def test_connections_per_client_across_processes_and_healthz_stays_open(
    pair: Callable[..., Pair],
) -> None:
    p = pair(max_connections_per_client=2)
    with ExitStack() as stack:
        clients = [stack.enter_context(httpx.Client(base_url=p.url, timeout=10)) for _ in range(3)]
        a = stack.enter_context(clients[0].stream("GET", "/a/channels/news/events"))
        assert a.status_code == 200  # under
        b = stack.enter_context(clients[1].stream("GET", "/b/channels/news/events"))
        assert b.status_code == 200  # at
        assert_too_many(clients[2].get("/a/channels/news/events"), "connections")
        assert_too_many(clients[2].get("/b/files"), "connections")
        assert clients[2].get("/a/streams").status_code == 429
        # Probes are never counted: the operator still sees the process.
        assert clients[2].get("/a/healthz").status_code == 200
        assert clients[2].get("/b/healthz").status_code == 200
        b.close()
        # The closed one gave its slot back.
        wait_for(lambda: clients[2].get("/a/files").status_code == 200)


def test_a_websocket_over_the_connection_quota_is_refused(serve: Callable[..., LiveServer]) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    tw = Tidewire(settings=Settings(heartbeat=0.3, max_connections_per_client=1))
    server = serve(tw)
    with connect(f"{server.ws_url}/channels/news/ws"):
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{server.ws_url}/channels/news/ws")
        assert refused.value.response.status_code == 429
        assert int(refused.value.response.headers["retry-after"]) >= 1
    wait_for(lambda: httpx.get(f"{server.url}/files").status_code == 200)


# -- publish rate --------------------------------------------------------------


def test_publish_rate_with_its_burst_across_processes(pair: Callable[..., Pair]) -> None:
    p = pair(publish_rate=0.5, publish_burst=3)
    assert p.http.post("/a/channels/room/events", json=1).status_code == 201
    assert p.http.post("/b/channels/room/events", json=2).status_code == 201
    assert p.http.post("/a/channels/room/events", json=3).status_code == 201  # at the burst
    over = p.http.post("/b/channels/room/events", json=4)
    assert_too_many(over, "publish")
    # One token comes every 2 s: Retry-After says so, whole seconds.
    assert 1 <= int(over.headers["retry-after"]) <= 2
    assert_too_many(p.http.post("/a/channels/room/events", json=5), "publish")
    # Refused publishes left nothing in the channel.
    with p.http.stream("GET", "/a/channels/room/events?after=0") as history:
        lines = []
        for line in history.iter_lines():
            lines.append(line)
            if len(lines) == 3:
                break
    assert [json.loads(line)["data"] for line in lines] == [1, 2, 3]


def test_websocket_frames_over_the_publish_rate_close_with_1013(
    serve: Callable[..., LiveServer],
) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    tw = Tidewire(settings=Settings(heartbeat=0.3, publish_rate=0.1, publish_burst=2))
    server = serve(tw)
    with connect(f"{server.ws_url}/channels/chat/ws") as ws:
        ws.send("one")
        ws.send("two")
        ws.send("three")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013


# -- open uploads --------------------------------------------------------------


def create_upload(p: Pair, node: str, length: int = 10) -> httpx.Response:
    name = base64.b64encode(b"x.bin").decode()
    return p.http.post(
        f"/{node}/uploads/",
        headers={**TUS, "Upload-Length": str(length), "Upload-Metadata": f"filename {name}"},
    )


def uploads_on_disk(data: Path) -> int:
    return sum(1 for f in data.rglob("*") if f.is_file() and "upload" in str(f.relative_to(data)))


def test_open_uploads_per_client_and_finishing_one_frees_it(
    pair: Callable[..., Pair], tmp_path: Path
) -> None:
    p = pair(max_open_uploads=2)
    first = create_upload(p, "a")
    assert first.status_code == 201  # under
    second = create_upload(p, "b")
    assert second.status_code == 201  # at
    on_disk = uploads_on_disk(tmp_path / "data")
    over = create_upload(p, "a")
    assert_too_many(over, "uploads")
    assert uploads_on_disk(tmp_path / "data") == on_disk  # the refused one left nothing
    # Finishing one frees its place …
    done = p.http.patch(
        first.headers["location"],
        content=b"0123456789",
        headers={**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
    )
    assert done.status_code == 204
    third = create_upload(p, "b")
    assert third.status_code == 201
    assert_too_many(create_upload(p, "a"), "uploads")
    # … and so does deleting one.
    assert p.http.delete(second.headers["location"], headers=TUS).status_code == 204
    assert create_upload(p, "a").status_code == 201


# -- stored bytes --------------------------------------------------------------


def file_count(p: Pair) -> int:
    return len(p.http.get("/a/files").json())


def test_storage_quota_at_under_and_over(pair: Callable[..., Pair]) -> None:
    p = pair(storage_quota=100)
    first = p.http.put("/a/files/one.bin", content=b"x" * 60)
    assert first.status_code == 201  # under
    full = p.http.put("/b/files/two.bin", content=b"x" * 41)
    assert full.status_code == 507, full.text
    assert "quota" in full.json()["detail"]
    assert file_count(p) == 1  # nothing of it stays
    # Multipart, one over: 507, and neither file stays.
    files = [("file", ("a.bin", b"y" * 10)), ("file", ("b.bin", b"z" * 31))]
    assert p.http.post("/b/files", files=files).status_code == 507
    assert file_count(p) == 1
    assert p.http.put("/b/files/two.bin", content=b"x" * 40).status_code == 201  # at
    assert p.http.put("/a/files/three.bin", content=b"x").status_code == 507
    # A resumable upload that would not fit is refused before it exists.
    refused = create_upload(p, "a", length=1)
    assert refused.status_code == 507
    # Deleting makes room again.
    assert p.http.delete(f"/a/files/{first.json()['id']}").status_code == 204
    upload = create_upload(p, "b", length=60)
    assert upload.status_code == 201
    done = p.http.patch(
        upload.headers["location"],
        content=b"u" * 60,
        headers={**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
    )
    assert done.status_code == 204
    assert p.http.put("/a/files/four.bin", content=b"x").status_code == 507
    assert file_count(p) == 2
