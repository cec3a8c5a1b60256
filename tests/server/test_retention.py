"""Retained history over a real server: max_channels (429 / close 1013), byte budgets that
never cost a connected run watcher an event, and memory that stays bounded when clients
publish a lot and read nothing (the "bounded" issue; bench W8 measures the same)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil
import pytest
from websockets.sync.client import connect

from tests.conftest import LiveServer, wait_for
from tidewire import Settings, Tidewire
from tidewire.broker import Broker
from tidewire.broker.memory import MemoryBroker

Serve = Callable[..., LiveServer]
NDJSON = {"Accept": "application/x-ndjson"}


@pytest.mark.parametrize("existing, status", [(1, 201), (2, 429)])
def test_publishing_to_a_channel_past_max_channels_is_429(
    serve: Serve, broker: Broker, existing: int, status: int
) -> None:
    tw = Tidewire(settings=Settings(max_channels=2, channel_idle_ttl=30), broker=broker)
    server = serve(tw)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for i in range(existing):
            assert http.post(f"/channels/c{i}/events", json=i).status_code == 201
        answer = http.post("/channels/new/events", json=1)
        assert answer.status_code == status
        if status == 429:
            assert "channel" in answer.json()["detail"]
            assert 1 <= int(answer.headers["Retry-After"]) <= 30
        # Channels that exist take more events either way.
        assert http.post("/channels/c0/events", json=2).status_code == 201


def test_a_websocket_publish_past_max_channels_closes_1013(serve: Serve) -> None:
    tw = Tidewire(settings=Settings(max_channels=1))
    server = serve(tw)
    assert httpx.post(f"{server.url}/channels/one/events", json=1).status_code == 201
    with connect(f"{server.ws_url}/channels/two/ws") as ws:
        ws.send("hello")
        with pytest.raises(Exception):  # noqa: B017 (the close, however websockets says it)
            ws.recv(timeout=5)
    assert ws.close_code == 1013


def test_a_slow_run_watcher_loses_nothing_to_byte_budgets(serve: Serve) -> None:
    """Runs and channels far over their byte budgets: the watcher still gets every event."""
    settings = Settings(
        run_history_bytes=32 << 10, max_retained_bytes=64 << 10, channel_max_bytes=16 << 10
    )
    tw = Tidewire(settings=settings)
    big = "r" * 4000

    @tw.stream
    async def burst(n: int = 100) -> Any:
        for i in range(n):
            yield {"i": i, "pad": big}

    server = serve(tw)
    seen: list[dict[str, Any]] = []
    with (
        httpx.Client(base_url=server.url, timeout=30) as http,
        http.stream("GET", "/streams/burst", headers=NDJSON) as response,
    ):
        for n, line in enumerate(response.iter_lines()):
            if not line:
                continue
            seen.append(json.loads(line))
            if n % 10 == 0:
                # Meanwhile others fill the process's budget many times over.
                for c in range(10):
                    http.post(f"/channels/flood{c}/events", json="c" * 4000)
                time.sleep(0.01)
    events = [e for e in seen if e["event"] == "message"]
    assert [e["data"]["i"] for e in events] == list(range(100))
    assert [e["event"] for e in seen if e["event"] != "message"] == ["end"]
    assert isinstance(tw.broker, MemoryBroker)
    # Over budget only by what the watcher had not read when it ended.
    assert tw.broker.retained_bytes <= settings.max_retained_bytes + settings.run_history_bytes


# -- the adversary -------------------------------------------------------------------

#: The issue's load, scaled by 1/8: 1,000 publishes of 112 KiB over 200 channels.
PUBLISHES, SIZE, CHANNELS, STALLED = 1_000, 112 << 10, 200, 5
BUDGET = 32 << 20


def stalled_subscribers(port: int, channel: str, n: int) -> Iterator[socket.socket]:
    """`n` SSE subscribers of `channel` that never read: small receive buffers, never drained."""
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(
            f"GET /channels/{channel}/events?after=0 HTTP/1.1\r\nHost: x\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        yield sock


def test_an_adversary_cannot_grow_memory_past_the_budget(serve: Serve) -> None:
    settings = Settings(
        max_retained_bytes=BUDGET,
        channel_max_bytes=4 << 20,
        subscriber_buffer_bytes=1 << 20,
        # The adversary is measured for memory, not its publish rate (test_quotas.py).
        publish_rate=1e6,
        publish_burst=10**6,
    )
    tw = Tidewire(settings=settings)
    assert isinstance(tw.broker, MemoryBroker)
    server = serve(tw)
    process = psutil.Process()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        http.post("/channels/warm/events", json="w" * SIZE)  # first-use costs out of the way
    before = process.memory_info().rss
    stalled = [s for c in range(STALLED) for s in stalled_subscribers(server.port, f"c{c}", 1)]

    # A fair subscriber reads one channel throughout: every event, or a gap saying how many not.
    fair: list[dict[str, Any]] = []
    done = threading.Event()

    def follow() -> None:
        with (
            httpx.Client(timeout=30) as client,
            client.stream(
                "GET", f"{server.url}/channels/c7/events?after=0", headers=NDJSON
            ) as response,
        ):
            for line in response.iter_lines():
                if line:
                    event = json.loads(line)
                    fair.append(event)
                    if event["event"] == "message" and event["data"] == "last":
                        return
                if done.is_set() and not line:
                    return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    peak = 0
    body = json.dumps("p" * (SIZE - 2)).encode()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for i in range(PUBLISHES):
            answer = http.post(
                f"/channels/c{i % CHANNELS}/events",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            assert answer.status_code == 201
            assert tw.broker.retained_bytes <= BUDGET
            if i % 50 == 0:
                peak = max(peak, process.memory_info().rss)
        http.post("/channels/c7/events", json="last")
    peak = max(peak, process.memory_info().rss)
    reader.join(30)
    done.set()
    for sock in stalled:
        sock.close()

    # What was published: 1,000 x 112 KiB = 109 MiB, 3.4 times the budget.
    assert PUBLISHES * SIZE > 3 * BUDGET
    # The budget, plus what one write to each stalled subscriber may hold (two copies of
    # an event in flight) and allocator slack.
    slack = 24 << 20
    growth = peak - before
    print(f"RSS growth {growth / 2**20:.1f} MiB, budget {BUDGET >> 20} MiB")
    assert growth <= BUDGET + STALLED * 2 * SIZE + slack, f"RSS grew {growth >> 20} MiB"

    # Every event of c7, in order, with gaps accounted: seqs published there were 1..5 + last.
    published = PUBLISHES // CHANNELS + 1
    got = sum(1 for e in fair if e["event"] == "message")
    missed = sum(e["data"]["missed"] for e in fair if e["event"] == "gap")
    assert got + missed == published
    assert fair[-1]["data"] == "last"


def test_idle_channels_are_swept_while_serving(serve: Serve) -> None:
    tw = Tidewire(settings=Settings(max_channels=1, channel_idle_ttl=1.0))
    server = serve(tw)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.post("/channels/old/events", json="x" * 1000).status_code == 201
        assert http.post("/channels/new/events", json=1).status_code == 429
        assert isinstance(tw.broker, MemoryBroker)
        broker = tw.broker
        # The lifespan's sweep (every ttl / 4) drops it without anyone publishing.
        wait_for(lambda: broker.retained_bytes == 0, timeout=5)
        assert http.post("/channels/new/events", json=1).status_code == 201
