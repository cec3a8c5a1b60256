"""Readiness and graceful drain: what a process does between SIGTERM and its exit.

Owns the drain state of one `Tidewire` (`Drain`): whether it is draining,
which live streams to tell when it starts (`Drain.live`), how many requests
are in flight (`InFlight`, the app's middleware), and the refusal new work
gets meanwhile (`Drain.refuse`: 503 with `Retry-After`). Also the readiness
check behind `/readyz` (`readiness`): broker and storage asked at once, with
a short timeout, answered without host names or exception text.

Who starts a drain: `Tidewire.drain()` (an app embedded in another server
calls it from its own shutdown), or `tidewire serve` at SIGTERM
(server/serving.py). Every `Tidewire` whose lifespan runs is listed in
`SERVING`, so that the server can drain whatever apps it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .handoff import handed_off

if TYPE_CHECKING:
    from ..app import Tidewire

__all__ = [
    "READY_TIMEOUT",
    "RETRY_AFTER",
    "SERVING",
    "Drain",
    "InFlight",
    "readiness",
]

logger = logging.getLogger("tidewire")

#: Seconds `/readyz` waits for the broker and for storage to answer.
READY_TIMEOUT = 2.0

#: `Retry-After` of the 503s while draining: a client (or its balancer) should
#: by then have found another process, and this one may be gone.
RETRY_AFTER = 2

#: The `Tidewire`s serving in this process (their lifespan is running).
SERVING: weakref.WeakSet[Tidewire] = weakref.WeakSet()


class Drain:
    """One app's drain: a flag, the live streams to tell, the requests in flight."""

    def __init__(self) -> None:
        #: True from the start of a drain: `/readyz` answers 503, new work is refused.
        self.draining = False
        #: Requests (and WebSockets) in the app, counted by `InFlight`.
        self.in_flight = 0
        # The tasks serving live streams: each is cancelled when the drain
        # starts, and sends the `unavailable` notice (transport.py).
        self._live: set[asyncio.Task[Any]] = set()

    def refuse(self) -> None:
        """Raise 503 with `Retry-After` while draining: for a request that would
        start a run, an upload, a subscription or a watch."""
        if self.draining:
            raise HTTPException(
                503,
                "this server is shutting down; try again, another server may take it",
                {"retry-after": str(RETRY_AFTER)},
            )

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        """While in this block, the current task is a live stream: the drain's
        start cancels it (the stream then tells its client and ends)."""
        task = asyncio.current_task()
        assert task is not None
        self._live.add(task)
        try:
            yield
        finally:
            self._live.discard(task)

    def enter(self) -> asyncio.Task[Any]:
        """`live` without a context manager (whose generator would stay alive
        as long as the stream): the current task is live until `leave`."""
        task = asyncio.current_task()
        assert task is not None
        self._live.add(task)
        return task

    def leave(self, task: asyncio.Task[Any]) -> None:
        self._live.discard(task)

    def begin(self) -> None:
        """Start draining: refuse new work from now on and cut the live streams."""
        if self.draining:
            return
        self.draining = True
        live, self._live = list(self._live), set()
        logger.info("draining: %d live streams told to resume elsewhere", len(live))
        for task in live:
            task.cancel()

    async def wait(self, timeout: float, busy: Callable[[], bool]) -> bool:
        """Wait until no request is in flight and `busy()` is false, at most
        `timeout` seconds; whether that happened in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight > 0 or busy():
            if loop.time() >= deadline:
                return False
            # Polled: requests and runs end in many places, and a drain
            # happens once in a process's life.
            await asyncio.sleep(0.05)
        return True


class InFlight:
    """ASGI middleware counting the app's requests and WebSockets in flight,
    for a drain to wait for; while draining, HTTP responses say
    `Connection: close`, so that a client's next request (its resume, after a
    503) opens a new connection, which a balancer sends to another process,
    instead of reusing this one to this process forever."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        drain = self.drain
        drain.in_flight += 1
        if scope["type"] == "http":
            send = _Closing(drain, send)

        try:
            await self.app(scope, receive, send)
        except BaseException:
            drain.in_flight -= 1
            raise
        handoff = handed_off()
        if handoff is None:
            drain.in_flight -= 1
        else:
            handoff.after(self._ended)  # a stream: in flight until it ends (handoff.py)

    async def _ended(self, _: BaseException | None) -> None:
        self.drain.in_flight -= 1


class _Closing:
    """`InFlight`'s `send`: a response that starts while draining says
    `Connection: close`. An object with slots, not a closure: an open stream
    keeps it (bench W4)."""

    __slots__ = ("drain", "send")

    def __init__(self, drain: Drain, send: Send) -> None:
        self.drain, self.send = drain, send

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and self.drain.draining:
            headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await self.send(message)


async def _check(name: str, ping: Callable[[], Awaitable[None]]) -> str:
    """`ok`, `timeout` or `unreachable`: what readiness says of one part.

    The reason goes to the log only: it may name hosts, ports, buckets.
    """
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await ping()
    except TimeoutError:
        logger.warning("readiness: the %s did not answer within %gs", name, READY_TIMEOUT)
        return "timeout"
    except Exception as exc:
        logger.warning("readiness: the %s is unreachable: %s", name, exc)
        return "unreachable"
    return "ok"


async def readiness(tw: Tidewire) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of `/readyz`."""
    if tw.drain_state.draining:
        return 503, {
            "status": "draining",
            "detail": "this server is shutting down; send new work to another",
        }

    async def storage() -> None:
        # The storage is made when first used: making it is part of the check.
        await tw.storage.ping()

    broker, store = await asyncio.gather(
        _check("broker", tw.broker.ping), _check("storage", storage)
    )
    checks = {"broker": broker, "storage": store}
    failing = [f"the {name} {_SAYS[state]}" for name, state in checks.items() if state != "ok"]
    if failing:
        return 503, {"status": "unavailable", "detail": " and ".join(failing), **checks}
    return 200, {"status": "ready", **checks}


_SAYS = {"timeout": f"did not answer within {READY_TIMEOUT:g}s", "unreachable": "is unreachable"}
