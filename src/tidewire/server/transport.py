"""Log streaming: read a log from a position and write it as NDJSON, SSE or WebSocket frames.

Owns the reader (`LogCursor`), the HTTP response (`LogResponse`) and the
WebSocket loop (`stream_websocket`); what routes need around them
(negotiation, resume positions, lean endpoints, refusals) is routing.py's.

The events come already encoded (see `tidewire.events`); a transport only
joins the bytes of whatever is ready into one write, so a watcher that is
behind catches up in a few large writes rather than many small ones.

This is an ASGI response of its own rather than `fastapi.sse`'s
`EventSourceResponse`, which serializes each item and passes it through two
memory streams and a task group: per event, that costs more than the whole
of our write path (bench/results.md, W1: fastapi.sse against tidewire SSE,
about 12x apart). The SSE bytes themselves come from `fastapi.sse`'s encoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from fastapi.sse import KEEPALIVE_COMMENT
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from ..broker import Batch, Broker, BrokerUnavailable
from ..events import NDJSON_HEARTBEAT, Envelope, dump_data
from ..metrics import GAPS, connections
from ..runs import Watcher
from ..wire import GAP, NDJSON, POSITION, SSE, UNAVAILABLE, WARNING_HEADER
from . import SERVER_SEND
from .drain import Drain
from .handoff import handed_off
from .protocol import chunked_cycle, client_gone, unwatch_client, watch_client

__all__ = [
    "Format",
    "LogCursor",
    "LogResponse",
    "ahead_header",
    "ahead_notice",
    "position_block",
    "stream_websocket",
]

Format = Literal["ndjson", "sse"]

#: At most this many events are read at once (and go into one write).
BATCH = 512

#: The most bytes one write carries, and how far behind a channel subscriber
#: may fall before it skips ahead, unless a route says otherwise
#: (`Settings.subscriber_buffer_bytes`).
BUDGET = 4 << 20

MEDIA_TYPES = {"ndjson": NDJSON, "sse": f"{SSE}; charset=utf-8"}

RAW_HEADERS = {
    fmt: [
        (b"content-type", media_type.encode()),
        # Neither browsers nor proxies may cache or buffer a live stream.
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
    ]
    for fmt, media_type in MEDIA_TYPES.items()
}


@dataclass(slots=True)
class LogCursor:
    """A reader's place in one log. With a run's `watcher`, it also reports
    progress, which is what lets the run's generator go on (backpressure)."""

    broker: Broker
    log: str
    after: str
    heartbeat: float
    watcher: Watcher | None = None

    #: For a run in another process: how often an idle watcher checks that
    #: the process is alive (a third of the lease).
    check_every: float | None = None
    checked: float = 0.0  # when it last checked (loop time)

    #: Put before every id this reader hands out (`after` is the log's own):
    #: a run's events are `<run id>.<log id>`, so that an id alone names the
    #: run it came from (what lets a reconnect to /streams/{name} resume it).
    prefix: str = ""

    #: The most bytes one write carries (`Settings.subscriber_buffer_bytes`).
    budget: int = BUDGET
    #: A channel's reader: when further behind the log's head than `budget`,
    #: it skips ahead to about `budget` before the head and is told with a
    #: `gap`. Never for a run: a connected watcher loses nothing (backpressure).
    skip_ahead: bool = False

    @property
    def position(self) -> str:
        """Where this reader is, as an id clients can resume from."""
        return self.prefix + self.after

    async def next(self, *, wait: bool = True) -> Batch:
        """The next events; an empty batch after `heartbeat` seconds without any
        (at once, without `wait`)."""
        if not wait:
            batch = await self.broker.read(self.log, self.after, limit=BATCH, timeout=0)
        elif self.check_every is None:
            batch = await self.broker.read(
                self.log, self.after, limit=BATCH, timeout=self.heartbeat
            )
        else:
            batch = await self._next_checking(self.check_every)
        if self.skip_ahead and batch.events:
            batch = await self._skip_if_behind(batch)
        if batch.events:
            self.after = batch.events[-1].id
        elif batch.resume_id is not None:
            self.after = batch.resume_id
        if not self.prefix:
            return batch
        # Each event's named twin is made once and kept with it, so every
        # watcher of a run writes the same encoded bytes (events.Envelope.named).
        prefix = self.prefix
        return Batch(
            [e.named(prefix) for e in batch.events],
            batch.missed,
            None if batch.resume_id is None else prefix + batch.resume_id,
            batch.ended,
            batch.restarted,
        )

    async def _skip_if_behind(self, batch: Batch) -> Batch:
        """`batch`, or, when this reader is further behind the head than `budget`
        bytes, what follows a skip to about `budget` bytes before the head.

        Only a batch that came full (`BATCH` events, or more than `budget`
        bytes) may mean that: a reader that keeps up gets short ones, and
        pays one sum of lengths per batch. The distance to the head is
        estimated from the count of events after this batch (the last
        component of both brokers' ids is the event's seq) times this batch's
        mean event size: the brokers do not keep byte offsets.
        """
        events = batch.events
        size = sum([len(e.data_json) for e in events])
        if len(events) < BATCH and size <= self.budget:
            return batch
        head = _id_key(await self.broker.last_id(self.log))[-1]
        mean = size / len(events)
        behind = size + (head - events[-1].seq) * mean
        if behind <= self.budget:
            return batch
        # Keep the newest `budget` bytes' worth of events, at least one.
        target = head - max(1, int(self.budget / max(mean, 1.0)))  # skip up to this seq
        missed = batch.missed
        if target < events[-1].seq:
            kept = [e for e in events if e.seq > target]
            skipped = events[: len(events) - len(kept)]
            missed += len(skipped)
            resume = skipped[-1].id if skipped else batch.resume_id
            return Batch(kept, missed, resume, batch.ended, batch.restarted)
        # The whole batch and more: read on without sending, a batch at a
        # time (no more than one held at once), up to the target.
        missed += len(events)
        after = events[-1].id
        seq = events[-1].seq
        while seq < target:
            skipped_batch = await self.broker.read(
                self.log, after, limit=min(BATCH, target - seq), timeout=0
            )
            if not skipped_batch.events:
                break
            missed += skipped_batch.missed + len(skipped_batch.events)
            after = skipped_batch.events[-1].id
            seq = skipped_batch.events[-1].seq
        rest = await self.broker.read(self.log, after, limit=BATCH, timeout=0)
        resume = rest.resume_id if rest.missed else after
        return Batch(rest.events, missed + rest.missed, resume, rest.ended, batch.restarted)

    async def _next_checking(self, every: float) -> Batch:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.heartbeat
        while True:
            wait = min(every, deadline - loop.time())
            batch = await self.broker.read(self.log, self.after, limit=BATCH, timeout=wait)
            if batch.events or batch.missed or batch.ended or batch.restarted:
                return batch
            if self.watcher is not None and loop.time() - self.checked >= every:
                self.checked = loop.time()
                await self.watcher.check_owner_alive()
            if loop.time() >= deadline:
                return batch

    def delivered(self, batch: Batch) -> None:
        if self.watcher is not None and batch.events:
            self.watcher.advance(batch.events[-1].seq)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.leave()


# The broker went away (Redis restarting). The client is told, the response
# ends, and it resumes later from its last id. No `id`: this is not an event
# of the log, and an SSE client must keep its Last-Event-ID.
_UNAVAILABLE = {"message": "the broker is unreachable; reconnect and resume from your last id"}
UNAVAILABLE_NDJSON = b'{"event":"%s","data":%s}\n' % (UNAVAILABLE.encode(), dump_data(_UNAVAILABLE))
UNAVAILABLE_SSE = b"event: %s\ndata: %s\n\n" % (UNAVAILABLE.encode(), dump_data(_UNAVAILABLE))
#: WebSocket close code for the same: 1013, "try again later".
UNAVAILABLE_CLOSE = 1013

# The server is draining (SIGTERM): the same notice, saying so; the client
# resumes at once, from its last id, on another process.
_DRAINING = {
    "message": "the server is shutting down; reconnect and resume from your last id",
    "draining": True,
}
DRAINING_NDJSON = b'{"event":"%s","data":%s}\n' % (UNAVAILABLE.encode(), dump_data(_DRAINING))
DRAINING_SSE = b"event: %s\ndata: %s\n\n" % (UNAVAILABLE.encode(), dump_data(_DRAINING))
DRAINING_WS = b'{"event":"%s","data":%s}' % (UNAVAILABLE.encode(), dump_data(_DRAINING))
#: WebSocket close code after the notice: 1012, "service restart".
DRAINING_CLOSE = 1012
#: WebSocket close code for a run watcher cut for stalling the run (`stall_timeout`).
STALLED_CLOSE = 1008


def gap_event(batch: Batch) -> Envelope:
    """The `gap` event telling one reader how many events it missed (and, when
    its position was from before a restart, that more may be lost)."""
    GAPS.inc()
    data: dict[str, object] = {"missed": batch.missed}
    if batch.restarted:
        data["restarted"] = True
    return Envelope(batch.resume_id or "0", 0, GAP, dump_data(data))


def has_gap(batch: Batch) -> bool:
    """Whether the reader of `batch` is owed a `gap` before its events."""
    return bool(batch.missed) or batch.restarted


def _id_key(id: str) -> tuple[int, ...]:
    # Both brokers' ids (`<epoch>-3`, `1700000000000-3`; `0`, and on memory a
    # bare number from before epochs) order as tuples of numbers.
    return tuple(int(part) for part in id.split("-"))


async def ahead_notice(cursor: LogCursor) -> Envelope | None:
    """A `gap` for a reader asking from past the newest event (made up, or of a
    later epoch of the in-memory broker: a clock set back between restarts;
    an earlier epoch's is the broker's to tell, see `Batch.restarted`), which
    is then moved to the newest event; else None.

    Taken silently, such a reader would skip whatever comes before its id. The
    notice has the id it reads on from, so an SSE client resumes from there.
    """
    if cursor.after == "0":
        return None
    head = await cursor.broker.last_id(cursor.log)
    if _id_key(cursor.after) <= _id_key(head):
        return None
    asked, cursor.after = cursor.position, head
    GAPS.inc()
    data = {"missed": 0, "ahead": asked}
    return Envelope(cursor.position, 0, GAP, dump_data(data))


def ahead_header(notice: Envelope | None) -> dict[str, str]:
    """`Tidewire-Warning`, saying what `ahead_notice` says, for clients that read headers."""
    if notice is None:
        return {}
    asked = notice.data["ahead"]
    return {WARNING_HEADER: f"{asked} is ahead of the log; reading on from {notice.id}"}


def position_block(id: str) -> bytes:
    """An SSE block that only sets the client's last event id.

    WHATWG EventSource keeps the `id:` of a block with no data and dispatches
    nothing; so do browsers with an empty `data:`. Node's `eventsource`
    (eventsource-parser) ignores ids of blocks without a `data:` line, but
    takes this one, as an event of type `position` nobody listens to.
    """
    return f"event: {POSITION}\nid: {id}\ndata:\n\n".encode()


class LogResponse(Response):
    """A chunked HTTP response that follows a log until it ends or the client leaves."""

    # Slots, not an instance dict: one of these stays alive with every open
    # stream (bench W4). (Response's own attributes, set by others, still
    # have its __dict__, made only if one is.)
    __slots__ = (
        "_ended",
        "_started",
        "background",
        "cursor",
        "drain",
        "fmt",
        "notice",
        "raw_headers",
        "retry_ms",
        "status_code",
    )

    def __init__(
        self,
        cursor: LogCursor,
        fmt: Format,
        headers: dict[str, str],
        retry_ms: int,
        notice: Envelope | None = None,
        drain: Drain | None = None,
    ):
        # Not Response.__init__: it would add `content-length: 0`; this body is chunked.
        self.status_code = 200
        self.background = None
        # Shared, not built per response: thousands of these may be open at once.
        self.raw_headers = RAW_HEADERS[fmt]
        if headers:
            self.raw_headers = [
                *self.raw_headers,
                *((k.lower().encode(), v.encode()) for k, v in headers.items()),
            ]
        self.cursor = cursor
        self.fmt = fmt
        self.retry_ms = retry_ms
        self.notice = notice  # a `gap` to send before anything else
        self.drain = drain
        self._started = False  # the response's start was sent
        self._ended = False  # and its end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") == "HEAD":
            # The headers a GET gets, and no body: a HEAD follows nothing (a
            # channel's stream never ends, and the server sends no body of it;
            # followed, the connection hung with no answer to its next request).
            try:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                self.cursor.close()
            return
        watcher = self.cursor.watcher
        if watcher is not None:
            # A run watcher that stalls the run for `stall_timeout` is cut:
            # this response then ends unfinished, and the server closes the
            # connection (a write to a client that reads nothing never ends).
            watcher.on_stall = _canceller()
        # Counted inline, not in a `with`: a context manager object would stay
        # alive for as long as the stream, on every idle connection.
        gauge = connections(self.fmt, _kind(self.cursor))
        gauge.inc()
        drain = self.drain
        # Below the app's middleware, for the events after the first write (see SERVER_SEND).
        lean = SERVER_SEND.get()
        task = asyncio.current_task()
        assert task is not None
        try:
            if drain is not None:
                # A drain's start cancels this task: the client is then told.
                # (Not `with drain.live()`: its generator would stay alive
                # with every idle stream.)
                drain.enter()
            if drain is None or not drain.draining:
                # The client's leaving cancels this task: a `_Listener` waits in
                # `receive`, or under tidewire's own protocol, the protocol's
                # `connection_lost` does it (no task at all).
                watched = watch_client(task)
                listener = None if watched is not None else _Listener(receive, task)
                try:
                    # Here, not in a method: its frame would stay alive with
                    # every idle stream (bench W4).
                    await send(
                        {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                    )
                    self._started = True
                    # This response's own headers are sent: not kept for the
                    # stream's life (a list, tuples and bytes: ~0.3 KB, bench W4).
                    self.raw_headers = RAW_HEADERS[self.fmt]
                    if lean is not None and handed_off() is not None:
                        # Handed off by tidewire's app, whose layers act on a
                        # response's start only (handoff.py): the rest goes
                        # below them, and their `send` wrappers are not kept
                        # for the stream's life (~0.6 KB, bench W4).
                        send = lean
                    await self._follow(send, lean)
                    self._ended = True
                except asyncio.CancelledError:
                    # Not the client gone, nor cut on purpose (a stalled run
                    # watcher, a drain): someone else's cancellation.
                    gone = listener.gone if listener is not None else client_gone(watched)
                    if not gone and not (
                        (watcher is not None and watcher.stalled)
                        or (drain is not None and drain.draining)
                    ):
                        raise
                    task.uncancel()
                except OSError:
                    pass  # the server saw the client go while we wrote (ASGI 2.4)
                finally:
                    if listener is not None:
                        listener.close()
                    else:
                        unwatch_client(watched)
            if drain is not None:
                drain.leave(task)
                if drain.draining and not self._ended:
                    await self._tell_draining(send)
        finally:
            if drain is not None:
                drain.leave(task)
            gauge.dec()
            self.cursor.close()

    async def _tell_draining(self, send: Send) -> None:
        """End this response with the `unavailable` notice: the server is draining."""
        sse = self.fmt == "sse"
        messages: list[Message] = []
        if not self._started:
            messages.append(
                {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
            )
        body = DRAINING_SSE if sse else DRAINING_NDJSON
        messages.append({"type": "http.response.body", "body": body, "more_body": False})
        # A client that reads nothing may not take it either: it has a second.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                for message in messages:
                    await send(message)

    async def _follow(self, send: Send, lean: Send | None) -> None:
        """Write the log's events: the first write and the last through `send`
        (the app's layers', unless the response was handed off: see
        `__call__`), the ones between through `lean` when given (the server's
        own `send`)."""
        middle = send
        sse = self.fmt == "sse"
        heartbeat = KEEPALIVE_COMMENT if sse else NDJSON_HEARTBEAT
        cursor = self.cursor
        first = True
        # Only the watchers of a run in another process check on it as they wait.
        tapping = cursor.check_every is None
        cycle: RequestResponseCycle | None = None
        while True:
            try:
                # The first block goes out at once, whatever is there: it
                # carries the starting position.
                batch = await cursor.next(wait=not first)
            except BrokerUnavailable:
                notice = UNAVAILABLE_SSE if sse else UNAVAILABLE_NDJSON
                await send({"type": "http.response.body", "body": notice, "more_body": False})
                return
            parts = []
            if first and self.notice is not None:
                parts.append(self.notice.sse() if sse else self.notice.ndjson())
            if has_gap(batch):
                gap = gap_event(batch)
                parts.append(gap.sse() if sse else gap.ndjson())
            if sse:
                parts.extend([event.sse() for event in batch.events])
            else:
                parts.extend([event.ndjson() for event in batch.events])
            if first and sse:
                # How soon EventSource comes back after a drop, in the first
                # block: a block of its own reaches some clients (httpx-sse)
                # as an empty event. With no event yet, the block is the
                # starting position, which EventSource keeps as its last id:
                # a live subscription dropped now resumes without loss.
                if not parts:
                    parts.append(position_block(cursor.position))
                parts[0] = f"retry: {self.retry_ms}\n".encode() + parts[0]
            idle = b"" if batch.ended or first else heartbeat
            first = False
            # One length per part: a reader that is behind must not make one
            # write of all it is behind by (512 events of up to 1 MiB each),
            # nor may a reader that never reads pin more than one write: the
            # server's `send` waits for the client (flow control) before the next.
            if parts and sum(map(len, parts)) > cursor.budget:
                for chunk in _chunks(parts, cursor.budget):
                    await middle({"type": "http.response.body", "body": chunk, "more_body": True})
                del chunk  # up to `budget` bytes, not to be held while idle
                if batch.ended:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            elif batch.ended:
                await send(
                    {"type": "http.response.body", "body": b"".join(parts), "more_body": False}
                )
            else:
                # No local for the body: this frame waits on below, and what
                # its locals hold stays alive with every idle stream.
                await middle(
                    {
                        "type": "http.response.body",
                        "body": b"".join(parts) if parts else idle,
                        "more_body": True,
                    }
                )
            if lean is not None:
                middle = lean
            cursor.delivered(batch)
            if batch.ended:
                return
            if tapping and cycle is None:
                cycle = chunked_cycle()
                tapping = cycle is not None
            if cycle is not None and len(batch.events) < BATCH:
                # Caught up: the events that follow are handed to this
                # connection by the broker as they come (`_Tap`), until
                # something needs more than a write of them.
                # (Inline, not a method: its frame would stay alive with every
                # idle subscription, bench W4.)
                tap = _Tap(cursor, cycle, sse)
                if not cursor.broker.tap(cursor.log, cursor.after, tap):
                    continue  # events came meanwhile: read them
                # What was written is not kept while it waits (the first
                # block, the batch: ~0.3 KB an idle stream, bench W4).
                del parts, batch
                loop = asyncio.get_running_loop()
                wait = cursor.heartbeat
                try:
                    while not tap.released:
                        tap.waiting = waiting = loop.create_future()
                        _alarms(loop).add(waiting, wait)
                        if await waiting:
                            break  # released: read on
                        quiet = time.monotonic() - tap.fed_at
                        if quiet < cursor.heartbeat:
                            wait = cursor.heartbeat - quiet
                            continue
                        # A heartbeat's time with no event. Still tapped as it
                        # goes: a feed meanwhile that finds the socket paused
                        # releases the tap (`released`).
                        # (No local for the message: it would be held while idle.)
                        await middle(
                            {"type": "http.response.body", "body": heartbeat, "more_body": True}
                        )
                        tap.fed_at = time.monotonic()
                        wait = cursor.heartbeat
                finally:
                    cursor.broker.untap(cursor.log, tap)


class _Tap:
    """One connection following a log by the broker's feed (`broker.Tap`): each
    batch goes straight to its socket, as one chunk of its chunked body.

    Every tap of a batch at one position writes the same bytes: the first
    encodes them (SSE or NDJSON, with the run's prefix if any) into `shared`.
    A batch larger than the cursor's budget, a client gone, or one whose
    socket has asked to pause writing (it does not keep up) is refused: the
    connection's task reads on as before, waiting for the client as needed.
    """

    __slots__ = ("cursor", "cycle", "fed_at", "released", "sse", "waiting")

    limit = BATCH

    def __init__(self, cursor: LogCursor, cycle: RequestResponseCycle, sse: bool) -> None:
        self.cursor = cursor
        self.cycle = cycle
        self.sse = sse
        self.fed_at = time.monotonic()
        self.waiting: asyncio.Future[bool] | None = None
        self.released = False

    def feed(self, batch: Batch, shared: dict[object, bytes]) -> bool:
        cycle = self.cycle
        if cycle.disconnected or cycle.response_complete or cycle.flow.write_paused:
            return False
        cursor = self.cursor
        key = (self.sse, cursor.prefix)
        chunk = shared.get(key)
        if chunk is None:
            chunk = shared[key] = _chunk(batch, self.sse, cursor.prefix, cursor.budget)
        if not chunk:
            return False
        cycle.transport.write(chunk)
        cursor.after = batch.events[-1].id
        cursor.delivered(batch)
        self.fed_at = time.monotonic()
        return True

    def release(self) -> None:
        self.released = True
        if self.waiting is not None:
            _resolve(self.waiting, True)


def _chunk(batch: Batch, sse: bool, prefix: str, budget: int) -> bytes:
    """`batch` as one HTTP/1.1 chunk of a stream's body; empty when larger than `budget`."""
    events = [e.named(prefix) for e in batch.events] if prefix else batch.events
    body = b"".join([e.sse() for e in events] if sse else [e.ndjson() for e in events])
    if len(body) > budget:
        return b""
    return b"%x\r\n%b\r\n" % (len(body), body)


class _Alarms:
    """Futures set to False about when they are due: one timer for all of them
    due in the same tenth of a second, not one a connection (a tapped
    connection's heartbeats: a timer handle is ~0.2 KB on each idle connection, bench W4).
    Never early; up to a tenth of a second late. A future done before it is
    due (its tap released) is left as it is, and held until then."""

    __slots__ = ("due",)

    def __init__(self) -> None:
        self.due: dict[int, list[asyncio.Future[bool]]] = {}

    def add(self, future: asyncio.Future[bool], delay: float) -> None:
        loop = asyncio.get_running_loop()
        slot = math.ceil((loop.time() + delay) * 10)
        futures = self.due.get(slot)
        if futures is None:
            futures = self.due[slot] = []
            loop.call_at(slot / 10, self._ring, slot)
        futures.append(future)

    def _ring(self, slot: int) -> None:
        for future in self.due.pop(slot, ()):
            _resolve(future, False)


#: Each event loop's own (tests run servers on several loops at once).
_loop_alarms: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Alarms] = (
    weakref.WeakKeyDictionary()
)


def _alarms(loop: asyncio.AbstractEventLoop) -> _Alarms:
    alarms = _loop_alarms.get(loop)
    if alarms is None:
        alarms = _loop_alarms[loop] = _Alarms()
    return alarms


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _kind(cursor: LogCursor) -> Literal["run", "channel"]:
    # Only a channel's readers skip ahead (a run's never lose events).
    return "channel" if cursor.skip_ahead else "run"


def _chunks(parts: list[bytes], budget: int) -> Iterator[bytes]:
    """`parts` joined into writes of at most `budget` bytes (a part larger
    than that is cut: an HTTP body is a byte stream, events may span writes)."""
    held: list[bytes] = []
    size = 0
    for part in parts:
        if size + len(part) > budget and held:
            yield b"".join(held)
            held, size = [], 0
        if len(part) > budget:
            view = memoryview(part)
            for start in range(0, len(part), budget):
                yield bytes(view[start : start + budget])
            continue
        held.append(part)
        size += len(part)
    if held:
        yield b"".join(held)


def _canceller() -> Callable[[], object]:
    task = asyncio.current_task()
    assert task is not None
    return task.cancel


#: The context of `_Listener`'s callbacks, which read no context variable:
#: without one given, each callback would hold a copy of its own.
_NO_CONTEXT = contextvars.Context()
#: One name for every listener task: unnamed, each would get a string of its own.
_LISTENER = "tidewire-disconnect-listener"


class _Listener:
    """Waits in `receive` for the client to go, then cancels `task`.

    Each wait is a task whose coroutine is the server's own `receive()`; a
    message other than `http.disconnect` (the request's body) arms the next.
    No coroutine of ours waits with it, nor a closure: an idle stream costs
    that task and this object with slots (bench W4)."""

    __slots__ = ("gone", "receive", "task", "waiting")

    def __init__(self, receive: Receive, task: asyncio.Task[object]) -> None:
        self.receive = receive
        self.task = task
        self.gone = False
        self.waiting = self._arm()

    def _arm(self) -> asyncio.Future[Message]:
        message = self.receive()
        waiting: asyncio.Future[Message]
        if asyncio.iscoroutine(message):
            waiting = asyncio.get_running_loop().create_task(message, name=_LISTENER)
        else:
            waiting = asyncio.ensure_future(message)
        waiting.add_done_callback(self._heard, context=_NO_CONTEXT)
        return waiting

    def _heard(self, waiting: asyncio.Future[Message]) -> None:
        if waiting.cancelled():
            return
        if waiting.exception() is None and waiting.result()["type"] != "http.disconnect":
            self.waiting = self._arm()
            return
        # Gone (or `receive` failed, as a gone client's may).
        self.gone = True
        self.task.cancel()

    def close(self) -> None:
        self.waiting.remove_done_callback(self._heard)
        self.waiting.cancel()


#: Seconds a WebSocket whose client has gone is given to publish the frames
#: it sent before it closed.
DRAIN_TIMEOUT = 5.0


async def stream_websocket(
    websocket: WebSocket,
    cursor: LogCursor,
    headers: dict[str, str],
    on_text: Callable[[str], Awaitable[None]] | None = None,
    on_bytes: Callable[[bytes], Awaitable[None]] | None = None,
    notice: Envelope | None = None,
    drain: Drain | None = None,
) -> None:
    """Follow a log over an accepted-here WebSocket, one envelope per text frame.

    Frames the client sends go to `on_text` / `on_bytes` (a channel publishes
    them); without a handler they are ignored. Idle heartbeats are the
    server's WebSocket pings (`tidewire serve` sets uvicorn's ping interval).
    When `drain` begins, the client gets the `unavailable` notice and the
    socket closes with 1012.
    """
    await websocket.accept(headers=[(k.lower().encode(), v.encode()) for k, v in headers.items()])
    # Counted inline, not in a `with`: see LogResponse.
    gauge = connections("ws", _kind(cursor))
    gauge.inc()
    try:
        if drain is None:
            await _stream_websocket(websocket, cursor, on_text, on_bytes, notice, None)
            return
        with drain.live():
            await _stream_websocket(websocket, cursor, on_text, on_bytes, notice, drain)
    finally:
        gauge.dec()


async def _stream_websocket(
    websocket: WebSocket,
    cursor: LogCursor,
    on_text: Callable[[str], Awaitable[None]] | None,
    on_bytes: Callable[[bytes], Awaitable[None]] | None,
    notice: Envelope | None,
    drain: Drain | None,
) -> None:
    task = asyncio.current_task()
    assert task is not None

    async def listen() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None and on_text is not None:
                await on_text(message["text"])
            elif message.get("bytes") is not None and on_bytes is not None:
                await on_bytes(message["bytes"])

    def on_gone(_: asyncio.Future[None]) -> None:
        task.cancel()

    listener = asyncio.ensure_future(listen())
    listener.add_done_callback(on_gone)
    watcher = cursor.watcher
    if watcher is not None:
        watcher.on_stall = task.cancel
    try:
        if drain is not None and drain.draining:
            raise asyncio.CancelledError  # began while this one was accepted
        if notice is not None:
            await websocket.send_text(notice.ws())
        while True:
            batch = await cursor.next()
            if has_gap(batch):
                await websocket.send_text(gap_event(batch).ws())
            for event in batch.events:
                await websocket.send_text(event.ws())
            cursor.delivered(batch)
            if batch.ended:
                break
        await websocket.close(1000)
    except BrokerUnavailable:
        await websocket.close(UNAVAILABLE_CLOSE, "the broker is unreachable; resume later")
    except asyncio.CancelledError:
        stalled = watcher is not None and watcher.stalled
        draining = drain is not None and drain.draining
        if not listener.done() and not stalled and not draining:
            raise
        if task.cancelling():
            task.uncancel()
        if draining and not listener.done():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):  # a client that reads nothing has a second
                    await websocket.send_text(DRAINING_WS.decode())
                    await websocket.close(
                        DRAINING_CLOSE, "the server is shutting down; resume from your last id"
                    )
        elif stalled:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):  # it reads nothing: it may not take this either
                    await websocket.close(
                        STALLED_CLOSE, "stalled the run; resume from your last id"
                    )
    except (WebSocketDisconnect, OSError, RuntimeError):
        # The client left while we wrote. What it sent before its close frame
        # is still queued: publish it (a client that sends and closes at once
        # must not lose its last frames), for as long as that takes, within reason.
        if on_text is not None or on_bytes is not None:
            # The listener's end must not cancel this wait (it is what we wait for).
            listener.remove_done_callback(on_gone)
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT):
                    await asyncio.shield(listener)
            except asyncio.CancelledError:
                if not listener.done():
                    raise
                task.uncancel()  # asked for by the listener's end, before the callback went
            except Exception:
                pass  # out of time, or a frame that failed: the rest is given up
    finally:
        listener.remove_done_callback(on_gone)
        listener.cancel()
        cursor.close()
        if websocket.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await websocket.close(1000)
