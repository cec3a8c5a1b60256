"""Shared fixtures: a real uvicorn server on a free port, serving a Tidewire made per test."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from tidewire import Settings, Tidewire
from tidewire.broker import Broker
from tidewire.broker.memory import MemoryBroker
from tidewire.server.protocol import HeaderLimitedProtocol

# Real Redis and S3-compatible servers, started by the tests that need them.
pytest_plugins = ["tests.redis_server", "tests.s3_server", "tests.proxy", "tests.balancer"]


class LiveServer:
    """uvicorn serving an app in a thread; `url` is its base URL."""

    def __init__(self, app: Any, ws_ping: float | None = None, **config: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        # The HTTP protocol `tidewire serve` runs (streams write through it: see
        # server/protocol.py `chunked_cycle`), unless a test names another.
        config.setdefault("http", HeaderLimitedProtocol)
        config = uvicorn.Config(
            app,
            log_level="warning",
            ws_ping_interval=ws_ping,
            ws_ping_timeout=ws_ping,
            **config,  # other uvicorn settings (ws, ws_max_size)
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., LiveServer]]:
    """Start a server for an app (a Tidewire or any ASGI app); stopped after the test."""
    servers: list[LiveServer] = []

    def start(app: Any, ws_ping: float | None = None, **config: Any) -> LiveServer:
        asgi = app.app if isinstance(app, Tidewire) else app
        server = LiveServer(asgi, ws_ping, **config).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(params=["memory", "redis"])
def broker(request: pytest.FixtureRequest) -> Broker:
    """A new broker of each kind, for behaviour that is the broker's (Redis: the shared
    test server, with keys of this test's own)."""
    if request.param == "memory":
        return MemoryBroker()
    from tidewire.broker.redis import RedisBroker

    server = request.getfixturevalue("redis_server")
    return RedisBroker(server.url, prefix=f"{request.node.name}-{time.time_ns()}:")


def wait_until_serving(proc: subprocess.Popen[Any], url: str, what: str = "server") -> None:
    """Wait until a server process started by a test answers `/healthz`; fail with its output."""
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            return
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                output = proc.communicate()[0] if proc.stdout is not None else ""
                pytest.fail(f"{what} did not start: {output}")
            time.sleep(0.1)


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, message: str = "") -> None:
    """Poll until `predicate()` is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(message or "condition not met in time")
        time.sleep(0.01)


QUICK = Settings(heartbeat=0.3, disconnect_grace=0.3, close_timeout=2.0)
