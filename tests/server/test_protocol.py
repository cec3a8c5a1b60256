"""Socket caps of `tidewire serve` (server/protocol.py), on a real server process.

A flood of sockets from one address is held to `max_sockets_per_address`
(the rest are closed at once) and /healthz from another address still
answers; the process as a whole holds at most `max_sockets`; addresses
trusted to forward for others (127.0.0.1 by default) are not capped by
address; a WebSocket's socket counts until it closes. The caps are low here
so that the floods are small.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import wait_for, wait_until_serving

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
