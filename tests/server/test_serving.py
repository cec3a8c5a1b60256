"""SIGTERM to real `tidewire serve` processes: they drain, keep answering, and exit 0.

One process on memory: live streams on all three transports get the
`unavailable` notice, an upload in flight finishes, new work is refused with
503, `/readyz` says 503 while the process still accepts, a run that outlives
`drain_timeout` is cancelled with its `finally` run, and the exit status is 0.
Two processes on Redis behind a balancer that polls `/readyz`: Python clients
following runs on the draining one resume on the other at once, and get every
event exactly once. With `--workers 2`, the supervisor exits 0 too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.balancer import Balancer
from tests.conftest import wait_for, wait_until_serving
from tests.redis_server import RedisServer
from tests.server.test_transport import closed_with, first_ndjson, rest_ndjson, sse_blocks
from tests.test_cli import free_port
from tidewire.client import Client

ROOT = Path(__file__).resolve().parent.parent.parent


class Serve:
    """`tidewire serve tests.cluster_app:tw` in a process of its own."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.marks = tmp / "marks"
        self.marks.mkdir(exist_ok=True)
        environ = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TIDEWIRE_TEST_MARKS": str(self.marks),
            "TIDEWIRE_DATA_DIR": str(tmp / "data"),
            **(env or {}),
        }
        command = ["serve", "tests.cluster_app:tw", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidewire", *command, "--log-level", "warning"],
            cwd=ROOT,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_until_serving(self.proc, self.url, "tidewire serve")

    def exit_status(self, timeout: float = 60) -> tuple[int, str]:
        output, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, output

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Serve:
        started.append(Serve(tmp_path, *args, env=env))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def status_of(url: str) -> int:
    """A request on a connection of its own (a draining server closes idle ones)."""
    return httpx.get(url, timeout=10).status_code


def test_sigterm_tells_streams_finishes_an_upload_refuses_new_work_and_exits_0(
    serve_process: Callable[..., Serve],
) -> None:
    # Longer than uvicorn's timeout_graceful_shutdown (5 s), which must not cut it short.
    server = serve_process(env={"TIDEWIRE_DRAIN_TIMEOUT": "6"})
    http = httpx.Client(base_url=server.url, timeout=10)
    http.post("/channels/c/events", json="first").raise_for_status()
    # Detached, and endless: it outlives the drain, which then cancels it.
    endless = http.post(
        "/streams/ticks?detach=true", json={"interval": 0.05, "mark": "endless"}
    ).json()["run"]

    # An upload in flight: 40 pieces, 0.1 s apart, the SIGTERM comes after the first.
    piece = b"x" * 4096
    begun = threading.Event()

    def body() -> Iterator[bytes]:
        for _ in range(40):
            yield piece
            begun.set()
            time.sleep(0.1)

    with ThreadPoolExecutor(1) as pool, contextlib.ExitStack() as stack:
        upload = pool.submit(httpx.put, f"{server.url}/files/big.bin", content=body(), timeout=30)
        # Live streams: an attached run over NDJSON, a channel over SSE, the
        # endless run watched over a WebSocket.
        ndjson = stack.enter_context(
            http.stream("POST", "/streams/ticks", json={"interval": 0.05, "mark": "attached"})
        )
        lines = ndjson.iter_lines()
        first_ndjson(lines)
        sse = stack.enter_context(
            http.stream(
                "GET", "/channels/c/events?after=0", headers={"accept": "text/event-stream"}
            )
        )
        chunks = sse.iter_text()
        assert 'data: "first"' in sse_blocks(chunks, stop=len)[0].split("\n")
        ws = stack.enter_context(connect(f"{server.ws_url}/runs/{endless}/ws"))
        ws.recv(timeout=10)
        assert begun.wait(10)

        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)

        # Still accepting, and saying it is not ready; new work elsewhere, please.
        wait_for(lambda: status_of(f"{server.url}/readyz") == 503, timeout=5)
        assert status_of(f"{server.url}/healthz") == 200
        refused = httpx.post(f"{server.url}/streams/ticks", json={"n": 1}, timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        refused = httpx.put(f"{server.url}/files/late.txt", content=b"late", timeout=10)
        assert refused.status_code == 503

        notice = {"event": "unavailable", "data": DRAINING}
        assert rest_ndjson(lines)[-1] == notice
        event, data = sse_blocks(chunks, stop=lambda _: False)[-1].split("\n")
        assert (event, json.loads(data.removeprefix("data: "))) == ("event: unavailable", DRAINING)
        code, _, frames = closed_with(ws)
        assert code == 1012 and json.loads(frames[-1]) == notice

        # On memory nobody can resume the attached run elsewhere: it is cancelled
        # at once. The detached one goes on, for drain_timeout.
        wait_for(lambda: (server.marks / "closed-attached").exists(), timeout=3)
        assert not (server.marks / "closed-endless").exists()

        # The upload in flight finished, whole.
        uploaded = upload.result(timeout=30)
        assert uploaded.status_code == 201, uploaded.text
        assert uploaded.json()["size"] == 40 * len(piece)

    status, output = server.exit_status()
    took = time.monotonic() - signalled
    assert status == 0, output
    # The endless run held the drain for drain_timeout, then was cancelled,
    # its `finally` run (the mark) before the process ended.
    assert took >= 6
    assert (server.marks / "closed-endless").exists()
    assert "Traceback" not in output


DRAINING = {
    "message": "the server is shutting down; reconnect and resume from your last id",
    "draining": True,
}


def test_python_clients_resume_on_another_process_with_nothing_lost(
    serve_process: Callable[..., Serve],
    start_redis: Callable[..., RedisServer],
    balancer: type[Balancer],
) -> None:
    redis = start_redis(aof=False)
    # A client that resumes on the draining process before the balancer has
    # seen its /readyz turn (it polls every 0.1 s) gets a 503 and waits its
    # backoff (SSE: up to `retry:`, 2 s) before it tries again: its run keeps
    # its place that long (disconnect_grace; 10 s by default).
    # The runs (4 s) end within drain_timeout.
    env = {"TIDEWIRE_DISCONNECT_GRACE": "5", "TIDEWIRE_DRAIN_TIMEOUT": "30"}
    a = serve_process("--broker", redis.url, env=env)
    b = serve_process("--broker", redis.url, env=env)
    front = balancer([a.url, b.url])
    front.wait_ready()
    front.pin(a.url)  # the streams begin on a

    n = 80
    results: dict[str, list[Any]] = {}
    reconnects: dict[str, int] = {}
    started = threading.Barrier(4)

    def follow(transport: Any) -> None:
        with (
            Client(front.url, retries=20) as client,
            client.stream("ticks", n=n, interval=0.05, transport=transport) as events,
        ):
            got = []
            for event in events:
                got.append((event.event, event.data))
                if len(got) == 5:
                    started.wait(20)
            results[transport] = got
            reconnects[transport] = events.reconnects

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(follow, t) for t in ("ndjson", "sse", "ws")]
        started.wait(20)
        front.pin(None)
        a.proc.send_signal(signal.SIGTERM)
        for future in futures:
            future.result(timeout=60)

    for transport, got in results.items():
        # Every event once, in order, then the end: nothing lost, nothing twice.
        assert [d["i"] for _, d in got[:-1]] == list(range(n)), (transport, got[-3:], reconnects)
        assert {d["pid"] for _, d in got[:-1]} == {a.proc.pid}  # a ran it throughout
        assert got[-1] == ("end", None), transport
        assert reconnects[transport] >= 1, transport
    # The resumed connections went to b.
    assert front.sent[b.url] >= 3
    status, output = a.exit_status()
    assert status == 0, output


def test_with_workers_the_supervisor_drains_them_and_exits_0(
    serve_process: Callable[..., Serve], start_redis: Callable[..., RedisServer]
) -> None:
    redis = start_redis(aof=False)
    server = serve_process("--broker", redis.url, "--workers", "2")
    with httpx.stream(
        "POST", f"{server.url}/streams/ticks", json={"n": 20, "interval": 0.05}, timeout=10
    ) as response:
        lines = response.iter_lines()
        first_ndjson(lines)
        server.proc.send_signal(signal.SIGTERM)
        assert rest_ndjson(lines)[-1] == {"event": "unavailable", "data": DRAINING}
    status, output = server.exit_status()
    assert status == 0, output
