"""A real `redis-server` for tests: started on a free port in a directory of its own.

tests/conftest.py loads this module as a pytest plugin, for its fixtures;
the `RedisServer` class can be used directly too:

- `redis_server`: one server for the whole session, without persistence.
  Tests share it; each keeps to keys of its own (`RedisBroker(prefix=...)`).
- `start_redis(aof=True)`: a server of the test's own, stopped after it, for
  tests that kill and restart Redis (`kill()`, `stop()`, `start()`,
  `restart()`: same port, same data directory).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

__all__ = ["RedisServer", "redis_server", "start_redis"]

MISSING = (
    "redis-server is not installed, and these tests need a real one: "
    "run scripts/install (as root it installs it), or apt-get install redis-server"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One `redis-server` process. With `aof`, every write is on disk before
    Redis answers it (`appendfsync always`), so `kill()` loses nothing."""

    def __init__(self, directory: Path, *, aof: bool = False, port: int | None = None) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail(MISSING, pytrace=False)
        self.executable = executable
        self.directory = directory
        self.aof = aof
        self.port = port or _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers (with AOF: until it has loaded)."""
        assert self.process is None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--logfile", str(self.log),
            "--save", "",
            "--appendonly", "yes" if self.aof else "no",
            "--appendfsync", "always",
            "--protected-mode", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log.read_text() if self.log.exists() else ""
                self.kill()
                pytest.fail(f"redis-server did not start on port {self.port}:\n{log[-2000:]}")
            time.sleep(0.01)
        return self

    def ping(self) -> bool:
        try:
            with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except redis.exceptions.ConnectionError:  # refused, or still loading the AOF
            return False

    def client(self, **options: float) -> redis.Redis:
        """A plain client, to look at what is stored."""
        return redis.Redis(port=self.port, decode_responses=True, **options)  # type: ignore[arg-type]

    def kill(self) -> None:
        """SIGKILL: as a crash would. Nothing is flushed on the way out."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown."""
        self._signal(signal.SIGTERM)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def _signal(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def __enter__(self) -> RedisServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.kill()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the session, without persistence."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start Redis servers of this test's own; all are killed after it."""
    servers: list[RedisServer] = []

    def start(*, aof: bool = True) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", aof=aof).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        with contextlib.suppress(Exception):
            server.kill()
