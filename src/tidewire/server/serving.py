"""SIGTERM and SIGINT under `tidewire serve`: drain, then exit 0.

uvicorn alone, at SIGTERM, stops accepting at once, gives connections
`timeout_graceful_shutdown` seconds, and re-raises the signal when it is done
(the process ends by the signal: exit status -15). A balancer that polls
`/readyz` then sees refused connections rather than a 503, and live streams
are cut without a word.

Here the signal begins every serving app's drain (`Tidewire.drain`, see
server/drain.py) while the server goes on accepting: `/readyz` answers 503,
new work is refused with 503, live streams are told to resume elsewhere.
HTTP connections are closed as their responses end (idle keep-alive ones at
once), so that a client's next request opens a connection that the balancer
sends elsewhere. Once the drains are done (requests and runs finished, or
`drain_timeout`), uvicorn's own shutdown follows, and the process exits 0:
the signal was handled, not re-raised. The same signal again ends the wait
at once (Ctrl+C twice).

The hook is installed from inside the server's event loop by the app
factory (`tidewire.cli:worker_app`), in every worker: with `--workers N`,
uvicorn's supervisor sends each worker SIGTERM and waits for all of them,
then exits 0 itself.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from .drain import SERVING

__all__ = ["ServerDrain", "drain_on_signals"]

logger = logging.getLogger("tidewire")

#: Seconds between two looks at the server's connections during a drain.
TICK = 0.1


def drain_on_signals() -> ServerDrain | None:
    """Make SIGTERM/SIGINT drain the uvicorn server running this event loop.

    Call it while the server loads its app (from an app factory): uvicorn has
    then installed its own handlers, bound to its `Server`, which is how the
    server is found. Elsewhere (a server run in a thread, or not uvicorn)
    nothing changes, and None is returned.
    """
    handler = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    if not isinstance(server, uvicorn.Server):
        logger.warning("not under uvicorn's signal handlers: SIGTERM will not drain")
        return None
    drain = ServerDrain(server, asyncio.get_running_loop())
    drain.install()
    return drain


class ServerDrain:
    """The drain of one uvicorn server, begun by its first SIGTERM or SIGINT."""

    def __init__(self, server: uvicorn.Server, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.signal: int | None = None  # the signal that began the drain
        self.task: asyncio.Task[None] | None = None

    def install(self) -> None:
        # uvicorn's `capture_signals` puts back the handlers it found when the
        # server ends; it re-raises only the signals *its* handler recorded.
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self.handle_exit)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal = sig
            # A signal handler runs between two bytecodes of whatever the loop
            # was doing: the drain starts from the loop itself.
            self.loop.call_soon_threadsafe(self._start)
        elif sig == self.signal:
            logger.warning("asked again: stopping without waiting for the drain")
            self.server.should_exit = True

    def _start(self) -> None:
        self.task = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            apps = list(SERVING)
            for tw in apps:
                tw.drain_state.begin()  # at once, before anything is awaited
            drains = [asyncio.ensure_future(tw.drain()) for tw in apps]
            pending = set(drains)
            while True:
                self._close_connections()
                if not pending:
                    break
                _, pending = await asyncio.wait(pending, timeout=TICK)
            for task in drains:
                if not task.cancelled() and task.exception() is not None:
                    logger.error("drain failed", exc_info=task.exception())
        finally:
            self.server.should_exit = True

    def _close_connections(self) -> None:
        """HTTP connections close once their response is sent (idle ones now).

        Only those that have had a request: a new connection's first request
        is answered (`/readyz`: 503) before it closes. WebSockets are the
        app's to close (with the `unavailable` notice first).
        """
        for connection in list(self.server.server_state.connections):
            if getattr(connection, "cycle", None) is not None:
                connection.shutdown()
