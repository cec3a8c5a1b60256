"""A tiny TCP load balancer for tests: round robin over the servers whose `/readyz` says 200.

As a real balancer does, it polls each server's `/readyz` (every 0.1 s) and
sends new connections only to ready ones, so a draining server gets no new
connections once it says 503; connections already open stay where they are.
`pin(url)` sends new connections to that server only (while it is ready),
for a test to choose where its streams begin.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.proxy import Proxy

__all__ = ["Balancer", "balancer"]


class Balancer(Proxy):
    def __init__(self, servers: list[str]) -> None:
        self.servers = servers
        self.ready: dict[str, bool] = dict.fromkeys(servers, False)
        self.sent: dict[str, int] = dict.fromkeys(servers, 0)  # connections, by server
        self.pinned: str | None = None
        self._turn = itertools.count()
        addresses = [urlsplit(url) for url in servers]
        self._addresses = {
            url: (a.hostname or "127.0.0.1", a.port or 80)
            for url, a in zip(servers, addresses, strict=True)
        }
        super().__init__(addresses[0].port or 80)
        threading.Thread(target=self._poll, daemon=True).start()

    def pin(self, url: str | None) -> None:
        self.pinned = url

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.ready.values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all ready: {self.ready}")
            time.sleep(0.05)

    def _poll(self) -> None:
        with httpx.Client(timeout=1.0) as http:
            while not self._closed:
                for url in self.servers:
                    try:
                        self.ready[url] = http.get(f"{url}/readyz").status_code == 200
                    except httpx.HTTPError:
                        self.ready[url] = False
                time.sleep(0.1)

    def _pick(self) -> str | None:
        ready = [url for url in self.servers if self.ready[url]]
        if self.pinned is not None:
            ready = [url for url in ready if url == self.pinned]
        if not ready:
            return None
        return ready[next(self._turn) % len(ready)]

    def _connect(self) -> socket.socket:
        url = self._pick()
        if url is None:
            raise OSError("no server is ready")
        upstream = socket.create_connection(self._addresses[url])
        with self._lock:
            self.sent[url] += 1
        return upstream


@pytest.fixture
def balancer() -> Iterator[type[Balancer]]:
    """`balancer([url, ...])` starts a balancer in front of servers; closed after the test."""
    made: list[Balancer] = []

    class Started(Balancer):
        def __init__(self, servers: list[str]) -> None:
            super().__init__(servers)
            made.append(self)

    yield Started
    for b in made:
        b.close()
