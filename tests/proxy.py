"""A small TCP proxy in front of a test server, whose connections a test can cut.

`cut()` drops every open connection at once (both sides see a reset), as a
network failure would; new connections are still accepted afterwards.
`cut_after(n)` drops each connection once `n` bytes have gone from the server
to the client through it, to interrupt a transfer in the middle.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest


class Proxy:
    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.connections = 0
        self.cuts = 0
        self._limit: int | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        """Drop every open connection, as a failing network would."""
        with self._lock:
            sockets, self._open = list(self._open), set()
            self.cuts += 1
        for sock in sockets:
            _reset(sock)

    def cut_after(self, n: int | None) -> None:
        """Drop each new connection after `n` bytes from the server (None: never)."""
        self._limit = n

    def close(self) -> None:
        self._closed = True
        # shutdown() wakes the thread blocked in accept(); close() alone would
        # leave the port accepting into its backlog.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.cut()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = self._connect()
            except OSError:
                client.close()  # as a proxy with nowhere to send it: refused
                continue
            with self._lock:
                self._open.update((client, upstream))
                self.connections += 1
            limit = self._limit
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit), daemon=True).start()

    def _connect(self) -> socket.socket:
        """The upstream connection of a new client (a balancer picks a server)."""
        return socket.create_connection(self.target)

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: limit - sent])
                    with self._lock:
                        self.cuts += 1
                    _reset(src)
                    _reset(dst)
                    return
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR if sock is dst else socket.SHUT_RD)


def _reset(sock: socket.socket) -> None:
    # shutdown() first: close() alone would not wake the thread blocked in
    # recv() on this socket, and the kernel would keep the connection open.
    # SO_LINGER 0 then makes close() send a RST: the peer sees a broken
    # connection, not a clean end.
    for step in (
        lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0"),
        lambda: sock.shutdown(socket.SHUT_RDWR),
        sock.close,
    ):
        with contextlib.suppress(OSError):
            step()


@pytest.fixture
def proxy() -> Iterator[type[Proxy]]:
    """`proxy(port)` starts a proxy in front of a server; closed after the test."""
    made: list[Proxy] = []

    class Started(Proxy):
        def __init__(self, port: int) -> None:
            super().__init__(port)
            made.append(self)

    yield Started
    for p in made:
        p.close()
