"""Socket caps of `tidewire serve` (server/protocol.py), on a real server process.

A flood of sockets from one address is held to `max_sockets_per_address`
(the rest are closed at once) and /healthz from another address still
answers; the process as a whole holds at most `max_sockets`; addresses
trusted to forward for others (127.0.0.1 by default) are not capped by
address; a WebSocket's socket counts until it closes. The caps are low here
so that the floods are small.

And the uvicorn internals `chunked_cycle` and the taps (transport.py `_Tap`)
rely on, pinned on the installed uvicorn with a real request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from websockets.sync.client import connect

from tests.conftest import LiveServer, wait_for, wait_until_serving
from tidewire.server.protocol import CYCLE, chunked_cycle

Serve = Callable[..., int]

FLOODER = "127.0.0.3"  # 127.0.0.0/8 is all loopback on Linux: other addresses, one machine
FAIR = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start `tidewire serve` with these TIDEWIRE_* variables; gives its port."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> int:
        port = free_port()
        variables = {f"TIDEWIRE_{name.upper()}": value for name, value in env.items()}
        # Idle sockets are kept for the test's length, not cut by the header timeout.
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidewire", "serve", "--port", str(port)],
            cwd=tmp_path,
            env={**os.environ, "TIDEWIRE_HEADER_TIMEOUT": "120", **variables},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        wait_until_serving(proc, f"http://127.0.0.1:{port}")
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def flood(port: int, count: int, source: str) -> Iterator[list[socket.socket]]:
    """`count` idle sockets to the server from `source`, closed after."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def kept(socks: list[socket.socket]) -> int:
    """How many of `socks` the server has not closed (an idle one has nothing to read)."""
    poll = select.poll()
    for sock in socks:
        poll.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    closed = {fd for fd, _ in poll.poll(0)}
    return sum(1 for sock in socks if sock.fileno() not in closed)


def settles_at(socks: list[socket.socket], count: int) -> None:
    wait_for(lambda: kept(socks) == count, 20, f"kept {kept(socks)} sockets, not {count}")


def healthz(port: int, source: str) -> int:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=5) as client:
        return client.get(f"http://127.0.0.1:{port}/healthz").status_code


def test_a_flood_from_one_address_leaves_room_for_others(serve: Serve) -> None:
    port = serve(max_sockets_per_address="500")
    with flood(port, 2000, FLOODER) as socks:
        settles_at(socks, 500)
        assert healthz(port, FAIR) == 200
        # The flooder itself may not have one more.
        with pytest.raises(httpx.TransportError):
            healthz(port, FLOODER)
    # Its sockets closed, it is counted down and served again.
    wait_for(lambda: _answers(port, FLOODER), 10, "the flooder's count did not go down")


def _answers(port: int, source: str) -> bool:
    try:
        return healthz(port, source) == 200
    except httpx.TransportError:
        return False


def test_the_process_holds_at_most_max_sockets(serve: Serve) -> None:
    port = serve(max_sockets="300", max_sockets_per_address="50")
    # 127.0.0.1 may forward for others (uvicorn's default): no cap by address,
    # only the process's.
    with flood(port, 600, "127.0.0.1") as socks:
        settles_at(socks, 300)
    wait_for(lambda: _answers(port, FAIR), 10, "the process's count did not go down")


def test_a_websocket_counts_until_it_closes(serve: Serve) -> None:
    port = serve(max_sockets_per_address="3")
    for _ in range(10):  # more than the cap, one after another: each is counted down
        sock = socket.socket()
        sock.bind((FLOODER, 0))
        sock.connect(("127.0.0.1", port))
        with connect(f"ws://127.0.0.1:{port}/channels/c/ws", sock=sock) as ws:
            ws.send('"hi"')
            assert ws.recv(timeout=5)
    with flood(port, 3, FLOODER) as socks:
        settles_at(socks, 3)
        with pytest.raises(httpx.TransportError):
            healthz(port, FLOODER)


# --- uvicorn internals the taps use (chunked_cycle, transport.py `_Tap`) --------------------
#
# A tapped stream writes its chunks to uvicorn's httptools request cycle itself, reading
# attributes that are uvicorn's, not ASGI's. Pinned here on a real cycle of a real request
# through `HeaderLimitedProtocol`, so that a uvicorn that renames one fails here rather than
# streams silently falling back to `send` (or breaking).

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Recorder:
    """An ASGI app that records what it sees of its uvicorn cycle, by path."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = self.seen.setdefault(f"{scope['method']} {scope['path']}", {})
        seen["context"] = CYCLE.get()
        seen["before start"] = chunked_cycle()
        sized = scope["path"] == "/sized"
        headers = [(b"content-length", b"4")] if sized else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        cycle = seen["cycle"] = chunked_cycle()
        if cycle is None:
            seen["chunked_encoding"] = seen["context"].chunked_encoding
            await send({"type": "http.response.body", "body": b"tail"})
            return
        seen.update(
            scope_method=cycle.scope["method"],
            response_started=cycle.response_started,
            response_complete=cycle.response_complete,
            chunked_encoding=cycle.chunked_encoding,
            disconnected=cycle.disconnected,
            write_paused=cycle.flow.write_paused,
        )
        if scope["path"] == "/paused":
            # A client that reads nothing: the transport asks to pause writing.
            block = b"%x\r\n%b\r\n" % (1 << 20, b"x" * (1 << 20))
            for _ in range(256):
                cycle.transport.write(block)
                if cycle.flow.write_paused:
                    break
                await asyncio.sleep(0)
            seen["paused"] = cycle.flow.write_paused
        else:
            cycle.transport.write(b"5\r\nhello\r\n")  # as `_Tap.feed` writes a chunk
        if scope["path"] in ("/gone", "/paused"):
            while (await receive())["type"] != "http.disconnect":
                pass
            seen["gone"] = cycle.disconnected
            return
        await send({"type": "http.response.body", "body": b"tail"})
        seen["after end"] = cycle.response_complete


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    app = Recorder()
    server = LiveServer(app, lifespan="off").start()  # HeaderLimitedProtocol
    try:
        yield app, server.url
    finally:
        server.stop()


def test_the_protocol_hands_each_request_its_uvicorn_cycle() -> None:
    # The hook `HeaderLimitedProtocol` sets `CYCLE` in: renamed, no stream is ever tapped.
    assert "_start_asgi_task" in vars(HttpToolsProtocol)


def test_a_chunked_response_has_the_cycle_attributes_the_taps_use(
    recorder: tuple[Recorder, str],
) -> None:
    app, url = recorder
    response = httpx.get(f"{url}/chunked", timeout=10)
    # What the app wrote on the transport is one chunk of the body, before `send`'s.
    assert response.content == b"hellotail"
    seen = app.seen["GET /chunked"]
    assert isinstance(seen["context"], RequestResponseCycle)
    assert seen["before start"] is None  # no response yet: not chunked (yet)
    assert seen["cycle"] is seen["context"]
    # The socket's transport (uvloop's is no `asyncio.Transport` subclass): what it wrote
    # reached the client, above.
    assert callable(seen["cycle"].transport.write)
    assert isinstance(seen["cycle"].flow, FlowControl)
    assert seen["scope_method"] == "GET"
    assert seen["response_started"] is True
    assert seen["response_complete"] is False
    assert seen["chunked_encoding"] is True
    assert seen["disconnected"] is False
    assert seen["write_paused"] is False
    assert seen["after end"] is True


def test_a_head_or_sized_response_has_no_chunked_cycle(recorder: tuple[Recorder, str]) -> None:
    app, url = recorder
    assert httpx.head(f"{url}/chunked", timeout=10).status_code == 200
    assert isinstance(app.seen["HEAD /chunked"]["context"], RequestResponseCycle)
    assert app.seen["HEAD /chunked"]["cycle"] is None
    assert httpx.get(f"{url}/sized", timeout=10).content == b"tail"
    assert app.seen["GET /sized"]["cycle"] is None
    assert app.seen["GET /sized"]["chunked_encoding"] is False


def raw_get(url: str, path: str) -> socket.socket:
    """A GET sent on a plain socket, its answer left unread."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(f"GET {path} HTTP/1.1\r\nhost: test\r\n\r\n".encode())
    return sock


@pytest.mark.parametrize("path", ["/gone", "/paused"])
def test_the_cycle_says_when_its_client_is_gone_or_not_reading(
    recorder: tuple[Recorder, str], path: str
) -> None:
    app, url = recorder
    sock = raw_get(url, path)
    seen = app.seen.setdefault(f"GET {path}", {})
    if path == "/paused":
        wait_for(lambda: "paused" in seen, 20, "the app never saw the socket pause")
        assert seen["paused"] is True
    else:
        wait_for(lambda: sock.recv(1 << 16).endswith(b"5\r\nhello\r\n"), 10)
    sock.close()
    wait_for(lambda: "gone" in seen, 10, "the app never saw the client go")
    assert seen["gone"] is True
