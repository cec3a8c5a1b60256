"""A stream's logic without its I/O: what to request, what the bytes mean, when to retry.

`Client` and `AsyncClient` each drive a `Session` with their own sockets;
everything they must agree on (resume positions, terminal events, backoff,
which errors are worth a reconnect) is here, once, and testable without a
server.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import orjson

from ..events import SSEDecoder
from ..wire import AFTER_HEADER, ERROR, GAP, RUN_HEADER, SSE, TERMINAL_EVENTS, UNAVAILABLE
from ._models import Event
from .exceptions import (
    Disconnected,
    HTTPStatusError,
    ProtocolError,
    RunFailed,
    StreamGap,
    TidewireError,
    TransportError,
)

__all__ = ["Backoff", "Session", "Target", "Transport"]

Transport = Literal["ndjson", "sse", "ws"]
TRANSPORTS = ("ndjson", "sse", "ws")

#: Events after which a run's stream is over.
TERMINAL = TERMINAL_EVENTS

#: Statuses that mean "try again shortly" rather than "this request is wrong".
RETRYABLE = frozenset({502, 503, 504})
#: The longest `Retry-After` a reconnect honours, in seconds.
MAX_RETRY_AFTER = 60.0


@dataclass(frozen=True, slots=True)
class Target:
    """One connection to make: an HTTP request (`method`) or a WebSocket (`"WS"`)."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with jitter, reset once events flow again.

    Delays grow `initial * 2**n` up to `maximum`; each is drawn from its upper
    half so that many clients cut off together do not return together. An SSE
    `retry:` sets `initial` to the server's wish.
    """

    initial: float = 0.5
    maximum: float = 10.0
    attempts: int = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * 2**self.attempts)
        self.attempts += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempts = 0


class Session:
    """The state of one logical stream across any number of connections.

    A run is started once (`start`), then resumed at `/runs/{id}/…?after=`;
    a channel is resumed at its own path. `feed` turns a connection's bytes
    (or WebSocket frames) into events, skipping anything already delivered,
    and raises `RunFailed` / `StreamGap`; `dropped` says how long to wait
    before reconnecting, or raises once `retries` reconnects in a row failed.
    """

    def __init__(
        self,
        transport: Transport,
        decode: Callable[[Any], Any],
        *,
        start: Target | None = None,
        run_id: str | None = None,
        channel: str | None = None,
        after: str | None = None,
        retries: int = 10,
        on_gap: Literal["raise", "yield"] = "raise",
        backoff: Backoff | None = None,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        if on_gap not in ("raise", "yield"):
            raise ValueError(f"on_gap must be 'raise' or 'yield', not {on_gap!r}")
        self.transport = transport
        self.run_id = run_id
        self.channel = channel
        self.last_id = after
        self.done = False
        self.reconnects = 0
        self._decode = decode
        self._start = start
        self._retries = retries
        self._on_gap = on_gap
        self._backoff = backoff or Backoff()
        self._failures = 0
        self._flowing = False
        # The server said `unavailable` (draining, or its broker is down):
        # the next connection is made at once, not after a backoff.
        self._resume_now = False
        self._buffer = b""
        self._sse = SSEDecoder()

    # -- which connection to make ---------------------------------------------------

    def target(self) -> Target:
        if self._start is not None and self.run_id is None and self.last_id is None:
            return self._start
        if self.run_id is not None:
            base = f"/runs/{quote(self.run_id, safe='')}"
        elif self.channel is not None:
            base = f"/channels/{quote(self.channel, safe='')}"
        else:  # pragma: no cover - the constructors always give one of the three
            raise RuntimeError("a session needs a start request, a run id or a channel")
        params = {"after": self.last_id} if self.last_id is not None else {}
        if self.transport == "ws":
            return Target("WS", f"{base}/ws", params)
        return Target("GET", f"{base}/events", params, headers=accept(self.transport))

    def opened(self, headers: Mapping[str, str]) -> None:
        """A connection is up: learn the run id, or where a live subscription began."""
        self._buffer = b""
        self._sse = SSEDecoder()
        self._flowing = False
        if self.run_id is None:
            self.run_id = headers.get(RUN_HEADER.lower()) or None
        if self.last_id is None:
            # A channel says where "live from now" began: resuming from there
            # loses nothing published while we were away.
            self.last_id = headers.get(AFTER_HEADER.lower()) or None

    # -- what arrives ---------------------------------------------------------------

    def feed(self, chunk: bytes | str) -> list[Event]:
        """The events in a chunk of the response (or one WebSocket frame), in order."""
        if self.transport == "sse":
            assert isinstance(chunk, bytes)
            # A notice without `id:` carries the decoder's last id, and so is
            # skipped below as already delivered.
            raw = [(e.id or None, e.event, _json(e.data_json)) for e in self._sse.feed(chunk)]
            if self._sse.retry is not None:
                self._backoff.initial = self._sse.retry / 1000
            return self._accept(raw)
        if self.transport == "ws":
            return self._accept([_envelope(chunk)])
        assert isinstance(chunk, bytes)
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        return self._accept([_envelope(line) for line in lines if line.strip()])

    def _accept(self, raw: list[tuple[str | None, str, Any]]) -> list[Event]:
        events: list[Event] = []
        for id, kind, value in raw:
            if kind == UNAVAILABLE:
                # A notice outside the log (no id; over SSE, the decoder's last
                # one): the server is draining or lost its broker, and ends
                # this response. Resume from last_id at once, here or (behind
                # a balancer) on another process.
                self._resume_now = True
                continue
            if id is None:
                continue  # another notice outside the log: nothing to deliver
            if self.done or id == self.last_id:
                continue  # already delivered before a reconnect
            self.last_id = id
            if not self._flowing:
                self._flowing = True
                self._failures = 0
                self._backoff.reset()
            if kind in TERMINAL and self.run_id is not None:
                self.done = True
                if kind == ERROR:
                    info = value if isinstance(value, dict) else {}
                    raise RunFailed(
                        self.run_id,
                        str(info.get("type", "Exception")),
                        str(info.get("message", value)),
                    )
            elif kind == GAP and self._on_gap == "raise":
                info = value if isinstance(value, dict) else {}
                raise StreamGap(
                    int(info.get("missed", 0)), id, restarted=bool(info.get("restarted"))
                )
            events.append(Event(id, kind, self._decode(value)))
        return events

    # -- when a connection ends -----------------------------------------------------

    def dropped(self, error: TidewireError | None) -> float:
        """A connection ended before the stream did: the delay before the next one.

        Raises `error` itself when retrying cannot help (a 4xx), and
        `Disconnected` after `retries` failures in a row.
        """
        if isinstance(error, HTTPStatusError) and error.status_code not in RETRYABLE:
            raise error
        if error is not None and not isinstance(error, (TransportError, HTTPStatusError)):
            raise error
        self._failures += 1
        self.reconnects += 1
        resume_now, self._resume_now = self._resume_now, False
        if self._failures > self._retries:
            what = f"run {self.run_id}" if self.run_id else f"channel {self.channel}"
            raise Disconnected(
                f"lost the connection to {what} and {self._retries} reconnects failed"
                f" (last event {self.last_id}): {error or 'the server ended the response'}",
                attempts=self._failures - 1,
                last_id=self.last_id,
            ) from error
        if resume_now:
            return 0.0  # told by the server: no need to wait and see
        delay = self._backoff.next()
        if isinstance(error, HTTPStatusError) and error.retry_after is not None:
            # The server said when (a draining process, a quota): not sooner,
            # and not longer than a reconnect would ever wait.
            delay = max(delay, min(error.retry_after, MAX_RETRY_AFTER))
        return delay


def accept(transport: Transport) -> dict[str, str]:
    return {"accept": SSE} if transport == "sse" else {}


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"an SSE event whose data is not JSON: {raw[:80]!r}") from exc


def _envelope(raw: bytes | str) -> tuple[str | None, str, Any]:
    try:
        obj = orjson.loads(raw)
        id = obj.get("id")
        return (None if id is None else str(id)), str(obj["event"]), obj.get("data")
    except (orjson.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
        shown = raw[:80] if isinstance(raw, (bytes, str)) else raw
        raise ProtocolError(f"not a tidewire event: {shown!r}") from exc
