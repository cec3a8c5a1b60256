"""Runs across processes: watched, held back and cancelled from another process,
failed when their process dies.

First two Tidewire instances sharing one memory broker; then several
`tidewire serve` processes sharing one real Redis, where runs and channels
cross processes and survive a process killed or Redis restarted."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi import FastAPI

from tests.conftest import LiveServer, wait_for, wait_until_serving
from tests.redis_server import RedisServer
from tests.s3_server import S3Server
from tests.test_cli import free_port
from tests.wire import read_ndjson, read_ws
from tidewire import Settings, Tidewire
from tidewire.broker.memory import MemoryBroker

ROOT = Path(__file__).resolve().parent.parent.parent
LEASE = 1.5  # tests/cluster_app.py


# -- several processes sharing a broker --------------------------------------
#
# Two Tidewire instances on one broker stand in for two processes: each has
# its own runs and instance name and knows the other's runs only through the
# broker. (Further down, real processes on Redis do the same.)


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
    for task in pair.a.runs.cluster._background:
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


def test_a_cancel_from_another_process_reaches_an_owner_that_missed_the_message(
    serve: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner is not subscribed to its control topic (its listener starts
    # late, or is reconnecting): the pub/sub message is lost, the run's
    # shared record still carries the request.
    pair = Pair(serve, SHARED)

    async def deaf(topic: str) -> AsyncIterator[str]:
        await asyncio.Event().wait()
        yield ""  # never reached

    monkeypatch.setattr(pair.a.broker, "listen", deaf)
    run_id = pair.start()
    assert pair.started.wait(5)
    response = httpx.delete(f"{pair.url}/b/runs/{run_id}", timeout=15)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"
    assert pair.finished.is_set()  # the generator's finally ran before the answer
    assert read_ndjson(f"{pair.url}/b/runs/{run_id}/events")[-1]["event"] == "cancelled"


# -- processes on Redis ---------------------------------------------------------


class Node:
    """One `tidewire serve tests.cluster_app:tw` process."""

    def __init__(self, broker: str, marks: Path, data: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TIDEWIRE_TEST_MARKS": str(marks),
        }
        if "--storage" not in extra:
            env["TIDEWIRE_DATA_DIR"] = str(data)
        args = ["serve", "tests.cluster_app:tw", "--port", str(self.port), "--broker", broker]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidewire", *args, "--log-level", "warning", *extra],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_until_serving(self.proc, self.url, "node")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def cluster(
    start_redis: Callable[..., RedisServer], tmp_path: Path
) -> Iterator[tuple[RedisServer, Callable[..., Node]]]:
    """A Redis of this test's own (with AOF), and a way to start nodes on it."""
    redis = start_redis(aof=True)
    nodes: list[Node] = []
    marks = tmp_path / "marks"
    marks.mkdir()

    def node(*extra: str) -> Node:
        nodes.append(Node(redis.url, marks, tmp_path / "data", *extra))
        return nodes[-1]

    yield redis, node
    for n in nodes:
        n.stop()


def start(node: Node, **params: Any) -> str:
    response = httpx.post(f"{node.url}/streams/ticks?detach=true", json=params, timeout=10)
    assert response.status_code == 202, response.text
    run_id: str = response.json()["run"]
    return run_id


def test_a_run_started_on_a_is_watched_on_b(cluster: Any) -> None:
    _, node = cluster
    a, b = node(), node()
    run_id = start(a, n=20, interval=0.01)
    for events in (
        read_ndjson(f"{b.url}/runs/{run_id}/events"),
        read_ws(f"ws://127.0.0.1:{b.port}/runs/{run_id}/ws"),
    ):
        assert [e["data"]["i"] for e in events[:-1]] == list(range(20))
        assert {e["data"]["pid"] for e in events[:-1]} == {a.proc.pid}
        assert events[-1]["event"] == "end"
    # Ids are Redis stream ids, the same whichever process serves them.
    assert read_ndjson(f"{a.url}/runs/{run_id}/events") == read_ndjson(
        f"{b.url}/runs/{run_id}/events"
    )
    info = httpx.get(f"{b.url}/runs/{run_id}").json()
    assert info["state"] == "finished" and info["events"] == 21


def test_a_stalled_watcher_on_b_holds_back_the_generator_on_a(cluster: Any) -> None:
    _, node = cluster
    a, b = node(), node()
    # 400 events of 64 KB: the socket buffers between b and this reader hold
    # some tens of them (b's send buffer grows to 4 MB), so a reader that
    # stops makes b stop delivering soon.
    run_id = start(a, n=400, interval=0, delay=1.0, pad=64_000)
    seen = []
    # A small receive buffer, as the kernel would otherwise let it grow to
    # tens of MB (tcp_rmem) and swallow the whole run.
    small = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)])
    with (
        httpx.Client(transport=small, timeout=30) as client,
        client.stream("GET", f"{b.url}/runs/{run_id}/events") as response,
    ):
        lines = response.iter_lines()
        for line in lines:
            if line.strip():
                seen.append(json.loads(line)["data"]["i"])
                break
        time.sleep(3)  # the reader stalls
        produced = httpx.get(f"{a.url}/runs/{run_id}").json()["events"]
        for line in lines:
            if not line.strip():
                continue
            event = json.loads(line)
            if event["event"] != "message":
                assert event["event"] == "end", event
                break
            seen.append(event["data"]["i"])
    assert seen == list(range(400))
    # The generator on a waited for the watcher on b: without backpressure
    # it would have made all 400 in those 3 seconds.
    assert produced < 200, produced


def test_publish_on_b_subscribe_on_a(cluster: Any) -> None:
    _, node = cluster
    a, b = node(), node()
    with httpx.stream("GET", f"{a.url}/channels/news/events", timeout=10) as live:
        lines = live.iter_lines()
        for i in range(3):
            published = httpx.post(f"{b.url}/channels/news/events", json={"n": i})
            assert published.status_code == 201
        got = []
        for line in lines:
            if line.strip():
                got.append(json.loads(line))
            if len(got) == 3:
                break
    assert [e["data"]["n"] for e in got] == [0, 1, 2]
    replay = read_ndjson(f"{a.url}/channels/news/events?after=0", limit=3)
    assert replay == got


def test_cancel_on_b_runs_the_generators_finally_on_a(cluster: Any, tmp_path: Path) -> None:
    _, node = cluster
    a, b = node(), node()
    run_id = start(a)
    assert read_ndjson(f"{b.url}/runs/{run_id}/events", limit=2)  # it is running
    response = httpx.delete(f"{b.url}/runs/{run_id}", timeout=15)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"
    # DELETE on b answered once a had closed the generator.
    assert (tmp_path / "marks" / f"closed-{a.proc.pid}").exists()
    assert read_ndjson(f"{b.url}/runs/{run_id}/events")[-1]["event"] == "cancelled"


def test_a_killed_process_fails_its_runs_for_watchers_elsewhere(cluster: Any) -> None:
    _, node = cluster
    a, b = node(), node()
    run_id = start(a, interval=0.05)
    with httpx.stream("GET", f"{b.url}/runs/{run_id}/events", timeout=30) as response:
        lines = (json.loads(line) for line in response.iter_lines() if line.strip())
        assert next(lines)["event"] == "message"
        a.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        last = None
        for last in lines:
            if last["event"] != "message":
                break
        waited = time.monotonic() - killed
    assert last is not None and last["event"] == "error", last
    assert last["data"]["type"] == "WorkerLost"
    # Told within the lease (plus one check interval and some slack).
    assert waited < LEASE * 1.5 + 1.5, waited
    assert httpx.get(f"{b.url}/runs/{run_id}").json()["state"] == "failed"


def test_a_run_whose_process_died_unwatched_is_failed_when_looked_at(cluster: Any) -> None:
    _, node = cluster
    a, b = node(), node()
    run_id = start(a, interval=0.05)
    a.proc.send_signal(signal.SIGKILL)
    time.sleep(LEASE + 0.5)
    info = httpx.get(f"{b.url}/runs/{run_id}").json()
    assert info["state"] == "failed"
    events = read_ndjson(f"{b.url}/runs/{run_id}/events")
    assert events[-1]["event"] == "error" and events[-1]["data"]["type"] == "WorkerLost"


def test_subscribers_resume_with_nothing_lost_across_a_redis_restart(cluster: Any) -> None:
    redis, node = cluster
    a, b = node(), node()
    received: list[int] = []
    last_id = "0"

    def read_until_cut() -> None:
        nonlocal last_id
        headers = {"last-event-id": last_id}
        with httpx.stream(
            "GET", f"{a.url}/channels/restart/events?after={last_id}", headers=headers, timeout=10
        ) as response:
            for line in response.iter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if event["event"] == "unavailable":
                    assert "id" not in event
                    return
                received.append(event["data"])
                last_id = event["id"]

    def publish(i: int) -> None:
        # A publisher that retries on 503 until Redis is back.
        deadline = time.monotonic() + 30
        while True:
            response = httpx.post(f"{b.url}/channels/restart/events", json=i, timeout=5)
            if response.status_code == 201:
                return
            assert response.status_code == 503, response.text
            assert "broker" in response.json()["detail"]
            assert time.monotonic() < deadline
            time.sleep(0.1)

    for i in range(5):
        publish(i)
    redis.stop()
    # A subscriber connected now is told at once; later ones get 503.
    read_until_cut()
    assert httpx.get(f"{a.url}/channels/restart/events", timeout=5).status_code == 503
    redis.start()
    for i in range(5, 10):
        publish(i)
    read_until_cut_or_done(a, received, last_id, total=10)
    assert received == list(range(10))


def read_until_cut_or_done(node: Node, received: list[int], after: str, total: int) -> None:
    """Resume from `after` until `total` events are in."""
    with httpx.stream(
        "GET", f"{node.url}/channels/restart/events?after={after}", timeout=10
    ) as response:
        for line in response.iter_lines():
            if line.strip():
                received.append(json.loads(line)["data"])
                if len(received) >= total:
                    return


def test_redis_down_gives_503_then_everything_recovers(cluster: Any) -> None:
    redis, node = cluster
    a = node()
    assert start(a, n=1)
    redis.kill()
    began = time.monotonic()
    for method, path, body in (
        ("POST", "/streams/ticks?detach=true", {"n": 1}),
        ("POST", "/channels/x/events", {"a": 1}),
        ("GET", "/channels/x/events", None),
        ("GET", "/runs/0123456789abcdef", None),
    ):
        response = httpx.request(method, f"{a.url}{path}", json=body, timeout=10)
        assert response.status_code == 503, (path, response.text)
        assert "broker" in response.json()["detail"]
        assert response.headers["retry-after"]
    assert time.monotonic() - began < 5  # fast, not after long timeouts
    redis.start()
    run_id = start(a, n=3, interval=0)
    events = read_ndjson(f"{a.url}/runs/{run_id}/events")
    assert [e["event"] for e in events] == ["message"] * 3 + ["end"]


def test_serve_with_two_workers_on_redis(cluster: Any) -> None:
    _, node = cluster
    n = node("--workers", "2")
    children = psutil.Process(n.proc.pid).children()
    workers = [w for w in children if "spawn_main" in " ".join(w.cmdline())]
    assert len(workers) == 2
    # Each request may land on either worker: a run started through one
    # connection is found and watched through another, whichever it is.
    for _ in range(10):
        run_id = start(n, n=3, interval=0)
        events = read_ndjson(f"{n.url}/runs/{run_id}/events")
        assert [e["event"] for e in events] == ["message"] * 3 + ["end"]
        assert {e["data"]["pid"] for e in events[:-1]} <= {w.pid for w in workers}


def test_files_uploaded_on_one_host_are_served_by_another_on_s3(
    cluster: Any, s3_server: S3Server, s3_bucket: str
) -> None:
    _, node = cluster
    storage = s3_server.url(s3_bucket, "shared")
    a, b = node("--storage", storage), node("--storage", storage)
    body = os.urandom(3 << 20)
    stored = httpx.put(f"{a.url}/files/shared.bin", content=body, timeout=30)
    assert stored.status_code == 201, stored.text
    file_id = stored.json()["id"]
    assert httpx.get(f"{b.url}/files/{file_id}", timeout=30).content == body
    part = httpx.get(f"{b.url}/files/{file_id}", headers={"range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == body[100:200]
    assert [f["id"] for f in httpx.get(f"{b.url}/files").json()] == [file_id]
    # A resumable upload begun on one host is finished on the other.
    created = httpx.post(
        f"{a.url}/uploads/",
        headers={"tus-resumable": "1.0.0", "upload-length": str(len(body))},
    )
    assert created.status_code == 201, created.text
    location = created.headers["location"]
    patch = {"tus-resumable": "1.0.0", "content-type": "application/offset+octet-stream"}
    half = len(body) // 2
    first = httpx.patch(
        f"{a.url}{location}", content=body[:half], headers={**patch, "upload-offset": "0"}
    )
    assert first.status_code == 204, first.text
    second = httpx.patch(
        f"{b.url}{location}",
        content=body[half:],
        headers={**patch, "upload-offset": str(half)},
        timeout=30,
    )
    assert second.status_code == 204, second.text
    meta = httpx.get(f"{a.url}/files/{second.headers['tidewire-file']}/meta").json()
    assert meta["size"] == len(body)
    assert meta["sha256"] == hashlib.sha256(body).hexdigest()


def test_many_runs_started_on_a_and_cancelled_on_b_at_once_are_all_cancelled(
    cluster: Any, tmp_path: Path
) -> None:
    # The cancels race a's control listener, which a fresh process subscribes
    # only when its first run starts: a message sent before is lost, and the
    # run's record must carry the request instead. None may answer 200 while
    # its run goes on.
    _, node = cluster
    a, b = node(), node()

    def start_and_cancel(_: int) -> tuple[int, str]:
        run_id = start(a)
        response = httpx.delete(f"{b.url}/runs/{run_id}", timeout=30)
        return response.status_code, response.json().get("state", response.text)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(start_and_cancel, range(20)))
    assert answers == [(200, "cancelled")] * 20


# -- Redis that hangs (SIGSTOP), not dies -----------------------------------------
#
# Noticed within the lease, answered 503; a run whose owner could not renew its
# lease during the stall goes on, and a watcher gets every event once, in order.

STALL = 2 * LEASE


def read_run(node: Node, run_id: str, received: list[Any], cuts: list[str]) -> None:
    """Watch a run to its end as a client would: resume from the last id after an
    `unavailable` event or a 503, until the last event."""
    after = "0"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with httpx.stream(
                "GET", f"{node.url}/runs/{run_id}/events?after={after}", timeout=30
            ) as response:
                if response.status_code == 503:
                    cuts.append("503")
                    time.sleep(0.2)
                    continue
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event["event"] == "unavailable":
                        cuts.append("unavailable")
                        break
                    received.append(event)
                    after = event["id"]
                    if event["event"] != "message":
                        return
        except httpx.TransportError:
            cuts.append("transport")
            time.sleep(0.2)
    raise AssertionError("the run did not end")


def test_a_request_during_a_redis_stall_is_answered_503_within_the_lease(cluster: Any) -> None:
    redis, node = cluster
    a = node()
    assert httpx.post(f"{a.url}/channels/stall/events", json=0).status_code == 201
    redis.process.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        response = httpx.post(f"{a.url}/channels/stall/events", json=1, timeout=30)
        answered = time.monotonic() - began
    finally:
        redis.process.send_signal(signal.SIGCONT)
    assert response.status_code == 503, response.text
    assert "broker" in response.json()["detail"]
    assert response.headers["retry-after"]
    # Noticed within about the lease, not after fixed timeouts of several seconds.
    assert answered < LEASE + 0.5, answered
    assert httpx.post(f"{a.url}/channels/stall/events", json=2).status_code == 201


def test_a_run_survives_a_redis_stall_longer_than_its_lease(cluster: Any) -> None:
    redis, node = cluster
    a = node()
    n = 150
    run_id = start(a, n=n, interval=0.02)
    received: list[Any] = []
    cuts: list[str] = []
    watcher = threading.Thread(target=read_run, args=(a, run_id, received, cuts))
    watcher.start()
    time.sleep(0.5)  # the run is under way
    redis.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(STALL)
    finally:
        redis.process.send_signal(signal.SIGCONT)
    watcher.join(25)
    state = httpx.get(f"{a.url}/runs/{run_id}").text
    assert not watcher.is_alive(), (cuts, received[-2:], state)
    # Every event, in order, and the run finished: not failed, not cancelled.
    assert [e["event"] for e in received] == ["message"] * n + ["end"], received[-3:]
    assert [e["data"]["i"] for e in received[:-1]] == list(range(n))
    assert httpx.get(f"{a.url}/runs/{run_id}").json()["state"] == "finished"
