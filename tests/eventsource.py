"""EventSources nobody here wrote, as the tests drive them, and the reconnect scenarios.

`NodeEventSource` runs the `eventsource` npm package (a WHATWG EventSource for
Node; tests/node/eventsource.mjs) in a subprocess; tests/web drives
Chromium's own. Both record what the application would see: `open`, each
event's type, `lastEventId` and data, and connection errors with the
`readyState` after them (0: it will reconnect, 2: it gave up).

The scenarios cut the connection through `tests.proxy` and count the
connections the EventSource makes, so each fails on a server that loses
events, keeps a finished stream's client reconnecting, or starts a second run.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from tests.conftest import LiveServer, wait_for
from tests.proxy import Proxy
from tidewire import Settings, Tidewire

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "eventsource.mjs"
#: Event types the scenarios listen for besides `message`.
TYPES = ["end", "error", "gap", "cancelled", "unavailable"]

#: EventSource comes back this soon after a drop: short, so the tests are, and
#: long enough that what a test publishes "while it is away" lands in between.
RETRY_MS = 700
SETTINGS = Settings(heartbeat=0.5, sse_retry_ms=RETRY_MS, disconnect_grace=5.0, close_timeout=2.0)


class EventSourceLike(Protocol):
    def seen(self) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


class NodeEventSource:
    """`new EventSource(url)` in Node, its observations collected by a thread."""

    def __init__(self, url: str) -> None:
        node = shutil.which("node")
        if node is None or not (NODE_DIR / "node_modules" / "eventsource").is_dir():
            pytest.fail(
                "Node's `eventsource` package is missing: install Node.js and run "
                "scripts/install (npm ci --prefix tests/node)"
            )
        self.process = subprocess.Popen(
            [node, str(SCRIPT), url, *TYPES],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._seen: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self._seen.append(json.loads(line))

    def seen(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._seen)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(5)


def events(source: EventSourceLike, kind: str | None = None) -> list[dict[str, Any]]:
    """What the application got as events (not open/connection errors)."""
    return [
        e
        for e in source.seen()
        if e["type"] != "open"
        and not (e["type"] == "error" and "readyState" in e)
        and (kind is None or e["type"] == kind)
    ]


def opened(source: EventSourceLike) -> int:
    return sum(1 for e in source.seen() if e["type"] == "open")


def gave_up(source: EventSourceLike) -> bool:
    return any(e["type"] == "error" and e.get("readyState") == 2 for e in source.seen())


Open = Callable[[str], EventSourceLike]


# -- the apps


class Counting:
    """An ASGI app in front of another that notes the path of every HTTP GET:
    how often an EventSource came (through any proxy, on any connection)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)

    def requests(self, prefix: str) -> int:
        return sum(1 for path in self.paths if path.startswith(prefix))


def make_app(started: list[str]) -> Counting:
    """Two streams, `short` (three events, then end) and `slow` (twelve, spaced);
    `started` gets a line each time either generator starts: a count of runs."""
    tw = Tidewire(settings=SETTINGS)

    @tw.stream(name="short")
    async def short() -> Any:
        started.append("short")
        for i in range(3):
            yield {"i": i}

    @tw.stream(name="slow")
    async def slow(delay: float = 0.0) -> Any:
        started.append("slow")
        await asyncio.sleep(delay)
        for i in range(12):
            yield {"i": i}
            await asyncio.sleep(0.1)

    return Counting(tw.app)


# -- the scenarios, one per defect


def live_channel_drop_before_first_event(
    server: LiveServer, app: Counting, proxy: Proxy, open: Open
) -> None:
    """(a) A live subscription cut before its first event misses nothing published
    while it was away."""
    source = open(f"{proxy.url}/channels/news/events")
    try:
        wait_for(lambda: opened(source) == 1, 10, "the EventSource did not open")
        # The stream's first block has gone out (open fires on the headers; the
        # block follows at once): give it a moment to be read.
        time.sleep(0.2)
        proxy.cut()
        # While it is away (it waits RETRY_MS before it comes back).
        for i in range(3):
            httpx.post(f"{server.url}/channels/news/events", json={"i": i}).raise_for_status()
        watching = app.requests("/channels/news/events")
        assert watching == 1, "it came back before the test published: retry is too short"
        wait_for(lambda: opened(source) == 2, 10, "the EventSource did not reconnect")
        httpx.post(f"{server.url}/channels/news/events", json={"i": 3}).raise_for_status()
        wait_for(lambda: {"i": 3} in [json.loads(e["data"]) for e in events(source)], 10)
        got = [json.loads(e["data"]) for e in events(source, "message")]
        assert got == [{"i": i} for i in range(4)], got
    finally:
        source.close()


def finished_run_stops(server: LiveServer, app: Counting, proxy: Proxy, open: Open) -> None:
    """(b) Watching a run that ends: after `end` the EventSource stops, rather than
    reconnect every `retry` until the run expires."""
    response = httpx.post(f"{server.url}/streams/short?detach=true")
    run = response.json()["run"]
    source = open(f"{proxy.url}/runs/{run}/events")
    try:
        wait_for(lambda: events(source, "end"), 10, "no `end` event")
        # Three retry periods: a client that is not told to stop comes back ~3 times.
        time.sleep(3 * RETRY_MS / 1000 + 0.5)
        assert [json.loads(e["data"]) for e in events(source, "message")] == [
            {"i": i} for i in range(3)
        ]
        assert gave_up(source), f"the EventSource is still reconnecting: {source.seen()}"
        # The stream, then the one reconnect that is told 204.
        assert app.requests(f"/runs/{run}/events") == 2, app.paths
    finally:
        source.close()


def stream_resumes_same_run(
    server: LiveServer, app: Counting, proxy: Proxy, open: Open, started: list[str]
) -> None:
    """(c) EventSource on /streams/{name}, cut mid-run: it resumes that run (no
    event twice, none missed, no second run), and stops after `end`."""
    source = open(f"{proxy.url}/streams/slow")
    try:
        wait_for(lambda: len(events(source, "message")) >= 3, 10, "no events")
        proxy.cut()
        wait_for(lambda: events(source, "end"), 15, "no `end` after the reconnect")
        time.sleep(2 * RETRY_MS / 1000 + 0.3)
        got = events(source, "message")
        ids = [e["id"] for e in got]
        assert len(ids) == len(set(ids)), f"events delivered twice: {ids}"
        assert [json.loads(e["data"]) for e in got] == [{"i": i} for i in range(12)]
        assert started == ["slow"], f"runs started: {started}"
        assert gave_up(source), f"the EventSource is still reconnecting: {source.seen()}"
        # The first request, the resumed one, and the one told 204 after `end`.
        assert app.requests("/streams/slow") == 3, app.paths
    finally:
        source.close()


def run_dropped_before_first_event(
    server: LiveServer, app: Counting, proxy: Proxy, open: Open, started: list[str]
) -> None:
    """(c, early) Cut before the run's first event: the reconnect still names the run."""
    source = open(f"{proxy.url}/streams/slow?delay=1.5")
    try:
        wait_for(lambda: opened(source) == 1, 10)
        time.sleep(0.2)
        proxy.cut()
        wait_for(lambda: events(source, "end"), 15, "no `end` after the reconnect")
        assert [json.loads(e["data"]) for e in events(source, "message")] == [
            {"i": i} for i in range(12)
        ]
        assert started == ["slow"], f"runs started: {started}"
    finally:
        source.close()


# The fixtures both test modules use (Node's eventsource, Chromium's): a
# counting app, the runs it started, and a server for it.


@pytest.fixture
def started() -> list[str]:
    return []


@pytest.fixture
def app(started: list[str]) -> Counting:
    return make_app(started)


@pytest.fixture
def server(serve: Callable[..., LiveServer], app: Counting) -> LiveServer:
    return serve(app)
