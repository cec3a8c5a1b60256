"""Readers that fall behind or never read (docs/http.md "Limits").

`subscriber_buffer_bytes` bounds what one write carries and how far a channel
subscriber may fall behind before it gets `gap` and skips ahead; what a
reader that never reads pins in the server is then about one write, not the
history it asked for. A run never skips: a watcher that stalls it for
`stall_timeout` is disconnected instead, and may resume.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import h11
import httpx
import psutil
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.uri import parse_uri

from tests.conftest import QUICK, LiveServer
from tests.wire import log_id
from tidewire import Tidewire
from tidewire.broker import Retention
from tidewire.broker.memory import MemoryBroker
from tidewire.heap import trim
from tidewire.server.transport import BATCH, STALLED_CLOSE, LogCursor, LogResponse

MiB = 1 << 20


def ndjson(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if line:
            yield json.loads(line)


def never_reading(server: LiveServer, path: str) -> socket.socket:
    """A client that sends its request and then reads nothing, ever."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive window, as a slow mobile client has: the server's
    # writes stop at once rather than after the kernel's autotuned megabytes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return sock


# -- one write carries at most the budget -----------------------------------------


@pytest.mark.parametrize("fmt", ["ndjson", "sse"])
def test_no_write_is_larger_than_the_subscriber_buffer(fmt: str) -> None:
    broker = MemoryBroker()
    budget = 64 << 10
    event = json.dumps("x" * (5 << 10)).encode()  # ~5 KiB each: 200 of them ~1 MiB
    big = json.dumps("y" * (150 << 10)).encode()  # one event larger than the budget

    async def main() -> list[bytes]:
        await broker.append(
            "log", [("message", event)] * 200 + [("message", big)], Retention(10_000)
        )
        await broker.end("log")
        cursor = LogCursor(broker, "log", "0", 1.0, budget=budget)
        writes: list[bytes] = []

        async def send(message: Any) -> None:
            if message["type"] == "http.response.body":
                writes.append(message["body"])

        async def receive() -> Any:
            await asyncio.Event().wait()

        await LogResponse(cursor, fmt, {}, 1000)({"type": "http"}, receive, send)  # type: ignore[arg-type]
        return writes

    writes = asyncio.run(main())
    body = b"".join(writes)
    assert max(map(len, writes)) <= budget
    # Nothing lost or reordered by the splitting: every event is there, whole.
    if fmt == "ndjson":
        lines = [json.loads(line) for line in body.splitlines()]
        assert [e["id"] for e in lines] == [log_id(broker, i) for i in range(1, 202)]
        assert lines[-1]["data"] == "y" * (150 << 10)
    else:
        assert body.count(b"event: message\n") == 201
        assert body.endswith(b"y" * 100 + f'"\nid: {log_id(broker, 201)}\n\n'.encode())


# -- channels: a subscriber further behind than the budget skips ahead ------------


def channel_server(serve: Any, **settings: Any) -> tuple[Tidewire, LiveServer]:
    tw = Tidewire(settings=dataclasses.replace(QUICK, **settings))
    return tw, serve(tw)


def test_a_subscriber_further_behind_than_its_buffer_gets_gap_and_the_newest(
    serve: Any,
) -> None:
    budget = 256 << 10
    tw, server = channel_server(serve, subscriber_buffer_bytes=budget, channel_max_len=1000)
    payload = "z" * (10 << 10)  # ~10 KiB: 100 of them ~1 MiB, four times the budget
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for i in range(100):
            client.post("/channels/c/events", json={"i": i, "pad": payload})
        with client.stream("GET", "/channels/c/events?after=0") as response:
            events = ndjson(response)
            first = next(events)
            assert first["event"] == "gap"
            missed = first["data"]["missed"]
            rest = [next(events) for _ in range(100 - missed)]
    # What it skipped and what it got add up, in order, ending at the newest;
    # what it got is about the budget, not the history.
    assert [e["data"]["i"] for e in rest] == list(range(missed, 100))
    assert rest[0]["id"] == log_id(tw.broker, missed + 1)
    assert first["id"] == log_id(tw.broker, missed)
    got = sum(len(e["data"]["pad"]) for e in rest)
    assert budget / 2 <= got <= budget * 1.5


@pytest.mark.parametrize("transport", ["ndjson", "sse"])
def test_a_subscriber_that_keeps_up_never_gets_a_gap(serve: Any, transport: str) -> None:
    # Bursts of more than a batch (its reads come full, so it measures how
    # far behind it is), each under the budget, together several budgets:
    # a reader that keeps up is never told it missed anything.
    budget = 1 * MiB
    tw, server = channel_server(serve, subscriber_buffer_bytes=budget, channel_max_len=5000)
    headers = {"accept": "text/event-stream"} if transport == "sse" else {}
    burst, bursts, pad = BATCH + 200, 8, "p" * 700
    assert burst * len(pad) < budget < bursts * burst * len(pad)

    async def publish() -> None:
        for b in range(bursts):
            for i in range(burst):  # no await in between: all at once
                await tw.channels.publish("c", {"i": b * burst + i, "pad": pad})
            await asyncio.sleep(0.3)

    total = burst * bursts
    seen: list[int] = []
    with (
        httpx.Client(base_url=server.url, timeout=10) as client,
        client.stream("GET", "/channels/c/events", headers=headers) as response,
    ):
        loop = server.server.servers[0].get_loop()
        future = asyncio.run_coroutine_threadsafe(publish(), loop)
        if transport == "ndjson":
            for event in ndjson(response):
                assert event["event"] != "gap", event
                seen.append(event["data"]["i"])
                if len(seen) == total:
                    break
        else:
            for line in response.iter_lines():
                assert not line.startswith("event: gap"), line
                if line.startswith("data: {"):
                    seen.append(json.loads(line[6:])["i"])
                    if len(seen) == total:
                        break
        future.result(10)
    assert seen == list(range(total))


# -- memory: a reader that never reads pins about one write -----------------------


def test_readers_that_never_read_pin_their_buffer_not_the_history(serve: Any) -> None:
    readers, budget = 5, 4 * MiB
    _tw, server = channel_server(
        serve, subscriber_buffer_bytes=budget, channel_max_len=100, heartbeat=30.0
    )
    payload = "h" * (400 << 10)  # 100 events of 400 KiB: 40 MiB of history
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for i in range(100):
            client.post("/channels/c/events", json={"i": i, "pad": payload})
        # Every event's encoding is made (and kept, shared) by one full read
        # first: what is measured next is only what each reader adds.
        with client.stream("GET", "/channels/c/events?after=0") as response:
            for event in ndjson(response):
                if event.get("data", {}).get("i") == 99:
                    break
    process = psutil.Process()
    gc.collect()
    trim()
    before = process.memory_info().rss
    sockets = [never_reading(server, "/channels/c/events?after=0") for _ in range(readers)]
    try:
        # Wait until the server has done what it can for them: RSS stops growing.
        peak, steady = before, 0
        deadline = time.monotonic() + 10
        while steady < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
            now = process.memory_info().rss
            steady = steady + 1 if now <= peak + MiB else 0
            peak = max(peak, now)
        grown = peak - before
    finally:
        for sock in sockets:
            sock.close()
    bound = readers * (budget + 4 * MiB) + 16 * MiB  # a write + socket buffers each, + slack
    print(f"RSS grew {grown / MiB:.1f} MiB for {readers} readers (bound {bound / MiB:.0f} MiB)")
    assert grown < bound


# -- runs: a watcher that stalls the run is cut after stall_timeout ---------------


def read_until_closed(sock: socket.socket) -> list[dict[str, Any]]:
    """What a never-reading client got before the server closed on it: its whole NDJSON lines."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "test")]))
    body = bytearray()
    sock.settimeout(10)
    while True:
        data = sock.recv(1 << 16)
        conn.receive_data(data)
        try:
            while (event := conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
                if isinstance(event, h11.Data):
                    body += event.data
        except h11.RemoteProtocolError:
            break  # closed in the middle of the body: cut
        if not data:
            break
    lines = bytes(body).split(b"\n")[:-1]  # the last may be cut short
    return [json.loads(line) for line in lines if line]


def test_a_watcher_that_stalls_a_run_is_cut_and_may_resume(serve: Any) -> None:
    settings = dataclasses.replace(QUICK, stall_timeout=1.0, run_window=8, disconnect_grace=5.0)
    tw = Tidewire(settings=settings)
    n = 3000

    @tw.stream
    async def fast() -> Any:
        for i in range(n):  # 4 KiB each: 12 MiB, more than any socket buffers
            yield {"i": i, "pad": "f" * 4096}

    server = serve(tw)
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("GET", "/streams/fast") as fair,
    ):
        run = fair.headers["tidewire-run"]
        slow = never_reading(server, f"/runs/{run}/events?after=0")
        try:
            # The fair watcher gets every event, the run ends: the slow one,
            # which stopped reading, no longer holds the generator.
            got = [e for e in ndjson(fair)]
            assert [e["data"]["i"] for e in got[:-1]] == list(range(n))
            assert got[-1]["event"] == "end"
            # It was cut (the server closed its connection, mid-body)...
            before = read_until_closed(slow)
        finally:
            slow.close()
    assert len(before) < n
    # ... and it may resume from its last id, missing nothing.
    last = before[-1]["id"] if before else "0"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.get(f"/runs/{run}/events", headers={"last-event-id": last})
        rest = [json.loads(line) for line in response.text.splitlines() if line]
    ids = [e["data"]["i"] for e in before + rest[:-1]]
    assert ids == list(range(n)) and rest[-1]["event"] == "end"


def test_a_websocket_watcher_that_stalls_a_run_is_closed(serve: Any) -> None:
    settings = dataclasses.replace(QUICK, stall_timeout=1.0, run_window=8)
    tw = Tidewire(settings=settings)
    n = 3000

    @tw.stream
    async def fast() -> Any:
        for i in range(n):
            yield {"i": i, "pad": "w" * 4096}

    server = serve(tw)
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("GET", "/streams/fast") as fair,
    ):
        run = fair.headers["tidewire-run"]
        # A WebSocket client that says hello and then reads nothing, ever
        # (a sans-I/O protocol writes its handshake; nothing reads meanwhile).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        protocol = ClientProtocol(parse_uri(f"{server.ws_url}/runs/{run}/ws?after=0"))
        protocol.send_request(protocol.connect())
        sock.sendall(b"".join(protocol.data_to_send()))
        try:
            got = list(ndjson(fair))
            assert len(got) == n + 1 and got[-1]["event"] == "end"
            # Now it reads what it was sent: some events, then the close.
            sock.settimeout(10)
            frames: list[Frame] = []
            while not frames or frames[-1].opcode is not Opcode.CLOSE:
                data = sock.recv(1 << 16)
                assert data, "closed without a close frame"
                protocol.receive_data(data)
                frames += [e for e in protocol.events_received() if isinstance(e, Frame)]
        finally:
            sock.close()
    texts = [f for f in frames if f.opcode is Opcode.TEXT]
    assert 0 < len(texts) < n
    assert frames[-1].opcode is Opcode.CLOSE
    assert Close.parse(frames[-1].data).code == STALLED_CLOSE
