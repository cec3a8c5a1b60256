"""Brokers: logs (`Logs`), and coordination between processes (`Coordination`).

Logs are ordered, bounded sequences of events, one per run or channel. The
`Logs` protocol is shaped for Redis Streams as much as for memory: ids are
strings, a reader asks for what follows a position and may block until it
comes, logs are trimmed by count and age, and a writer can mark a log ended.
Nothing outside a broker knows which broker it has.

Logs are bounded in bytes too. An event's size is the length of its NDJSON
line as the log's own id names it (`wire_size`): data JSON, type and id plus
the envelope's 29 bytes. Each log has its own budget (`Retention.max_bytes`),
and all the logs one process holds share `max_retained_bytes`: past it, the
oldest events of the biggest logs go first, down to 1/32 under the budget (so
that the search for the biggest is paid once per so many bytes, not per event).
Neither budget trims events after `Retention.keep_after`, which a run sets to
its slowest connected watcher's position: a run that is watched never loses an
unread event to trimming (its generator waits instead, see runs/local.py).

Beside logs, a broker carries (`Coordination`) what the processes of one deployment tell
each other about runs: small records with a time to live (a run's state,
its watchers' positions), leases (which process runs a generator, and is
it alive), and messages on topics (cancel this run). In memory these are
trivial; on Redis they are how a run started on one machine is watched and
cancelled from another. Coordination also counts for `quotas`: sets of
expiring members with a limit (slots), rate buckets and counters, each
checked and changed atomically so that every process sees one count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..events import Envelope

logger = logging.getLogger("tidewire")

__all__ = [
    "AppendConflict",
    "BadPosition",
    "Batch",
    "Broker",
    "BrokerUnavailable",
    "Coordination",
    "Logs",
    "Retention",
    "Tap",
    "TooManyLogs",
    "from_url",
    "sweep_forever",
    "wire_size",
]

#: Bytes of the NDJSON envelope around id, type and data: `{"id":"","event":"","data":}\n`.
ENVELOPE_BYTES = 29


def wire_size(event: Envelope) -> int:
    """What an event counts against byte budgets: the length of its NDJSON line."""
    return len(event.id) + len(event.event) + len(event.data_json) + ENVELOPE_BYTES


class BadPosition(ValueError):
    """A position (`Last-Event-ID`, `?after=`) that is not an id of this broker."""


class BrokerUnavailable(ConnectionError):
    """The broker cannot be reached (Redis is down): requests that need it get 503."""


class AppendConflict(Exception):
    """An append guarded by `expect` found events in its place that are not its own:
    another process wrote the log (it took over the run)."""


class TooManyLogs(Exception):
    """An append would begin one log more of a kind than `Retention.max_logs` allows
    (channels: `max_channels`). `retry_after`: seconds until the oldest idle one goes."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of a log is kept: at most `max_len` events, none older than `max_age`
    seconds, at most `max_bytes` bytes (`wire_size`), oldest first.

    `keep_after`: events with a greater seq are not trimmed by bytes, neither
    this log's budget nor the process's (a connected run watcher has not read
    them). Count and age trimming ignore it: a run's count window is smaller
    than its history (see Settings), and runs have no age limit.

    `kind`, `max_logs`, `idle_ttl`: logs of one kind (channels) are at most
    `max_logs` at once; a log counts from its first append until `idle_ttl`
    seconds pass without one, when it is dropped (Redis: its keys expire).
    Beginning one more raises `TooManyLogs`.
    """

    max_len: int
    max_age: float | None = None
    max_bytes: int | None = None
    keep_after: int | None = None
    kind: str = ""
    max_logs: int | None = None
    idle_ttl: float | None = None


@dataclass(slots=True)
class Batch:
    """What one read of a log returns.

    `missed` counts events trimmed away before this reader got them; the
    reader should resume at `resume_id`, which is past them. `ended` is true
    when the log was closed and `events` reaches its end. `restarted` is true
    when the reader's position is from before the log began again (an id of
    an earlier process of the in-memory broker): whatever came after it there
    is gone, how much is unknown (`missed` counts only what was trimmed since),
    and `resume_id` is the start of the log as it is now.
    """

    events: list[Envelope] = field(default_factory=list)
    missed: int = 0
    resume_id: str | None = None
    ended: bool = False
    restarted: bool = False


class Tap(Protocol):
    """A reader at a log's head that is handed the log's new events as they come
    (`Logs.tap`), rather than a task of its own woken to read them.

    Why: a channel with a thousand subscribers is a thousand tasks to wake,
    each reading the same events and encoding them again, for every event
    (bench W3: ~7 µs of a core a subscriber). Handed the same batch, the taps
    at one position share one encoding (`shared`), and each delivery is a
    write to a socket. Whatever a tap cannot simply write (a gap, the log's
    end, a client that does not keep up) releases it, and its reader reads on
    by itself from where the tap left it.
    """

    #: The most events one `feed` takes; a batch that large releases the tap
    #: (its reader is behind: it reads on in batches of its own).
    limit: int

    def feed(self, batch: Batch, shared: dict[object, bytes]) -> bool:
        """Deliver `batch` (events only: no gap, not the end); False: it was not
        delivered, and this tap is released. `shared` is one dict for every tap
        fed this batch: what it holds, each of them may reuse."""
        ...

    def release(self) -> None:
        """No more feeds: the reader reads on by itself."""
        ...


class Logs(Protocol):
    """Logs: append, read (waiting for more), trim, end, delete.

    `max_retained_bytes` bounds the events this process holds, all logs
    together (None: no bound); the application sets it from its Settings
    unless the broker was given one.
    """

    max_retained_bytes: int | None

    async def append(
        self,
        log: str,
        items: Sequence[tuple[str, bytes]],
        retention: Retention,
        *,
        expect: int | None = None,
    ) -> list[Envelope]:
        """Add `(event type, data JSON)` items to a log, in order; trim it; return the events.

        `expect`, the number of events the log held before these: when it
        holds more, an earlier try of this very append landed (a Redis that
        hung ran it when it woke, after the caller had given up on it), and
        its events are returned instead of being appended twice; when they
        are not these items, `AppendConflict`.
        """
        ...

    def check_id(self, id: str) -> None:
        """Raise `BadPosition` unless `id` could be an event id of this broker (or `"0"`)."""
        ...

    async def read(self, log: str, after: str, *, limit: int, timeout: float | None) -> Batch:
        """Events after the id `after` (`"0"`: from the start), at most `limit`.

        Waits up to `timeout` seconds (None: forever) while there is nothing
        to return; an empty batch means the time ran out.
        """
        ...

    def tap(self, log: str, after: str, tap: Tap) -> bool:
        """Feed `tap` this log's events after `after` as they come, until it is
        released or `untap`ped. False (and no tap) when `after` is not the
        newest event here (the reader has events to read first) or this log
        cannot be followed here now (the broker is down, the log ended)."""
        ...

    def untap(self, log: str, tap: Tap) -> None:
        """Stop feeding `tap` (it need not be tapped)."""
        ...

    async def last_id(self, log: str) -> str:
        """The id of the newest event (`"0"` for none): where "live from now" starts."""
        ...

    async def end(self, log: str) -> None:
        """Mark the log ended: readers that reach its end are told so."""
        ...

    async def delete(self, log: str) -> None:
        """Forget a log and its events."""
        ...

    async def sweep(self) -> None:
        """Drop logs idle past their `idle_ttl` and events past their `max_age`, on logs
        nobody writes to or reads (which nothing else would trim)."""
        ...


class Coordination(Protocol):
    """What the processes of one deployment tell each other: records with a
    time to live, leases, and messages on topics (see `runs.cluster`)."""

    async def put_state(
        self, key: str, fields: Mapping[str, str], ttl: float | None = None
    ) -> None:
        """Set fields of a record, creating it. With `ttl`, the whole record is
        forgotten `ttl` seconds from now; without, its expiry is unchanged."""
        ...

    async def get_state(self, key: str) -> dict[str, str]:
        """A record's fields; `{}` if there is none."""
        ...

    async def delete_state(self, key: str, *fields: str) -> None:
        """Remove some fields of a record, or (with none named) the whole record."""
        ...

    async def claim(self, key: str, holder: str, ttl: float) -> bool:
        """Take or renew a lease: True, and `holder` holds `key` for `ttl`
        seconds from now, if it was free, expired, or already `holder`'s."""
        ...

    async def send(self, topic: str, message: str) -> None:
        """Send a message to whoever listens on `topic` now (none may)."""
        ...

    def listen(self, topic: str) -> AsyncIterator[str]:
        """The messages sent to `topic` from now on, for as long as it is iterated."""
        ...

    async def hold(self, key: str, member: str, limit: int, ttl: float) -> float | None:
        """Put `member` in the set `key` for `ttl` seconds, unless the set holds
        `limit` members already (expired ones do not count; one already there
        is renewed whatever the count). None when held; else the seconds until
        the soonest member expires."""
        ...

    async def renew(self, key: str, members: Sequence[str], ttl: float) -> None:
        """Push the expiry of those `members` still in the set `key` to `ttl` seconds from now."""
        ...

    async def drop(self, key: str, member: str) -> None:
        """Take `member` out of the set `key` (nothing if it is not there)."""
        ...

    async def take(self, key: str, rate: float, burst: int) -> float:
        """Take one from the bucket `key` (refilled at `rate` per second, holding
        at most `burst`): 0 if taken, else the seconds until one is there."""
        ...

    async def add(self, key: str, amount: int, limit: int | None = None) -> int | None:
        """Add `amount` to the counter `key` and return its new value, unless that
        would pass `limit`: then leave it and return None. (`amount` 0 reads it.)"""
        ...


class Broker(Logs, Coordination, Protocol):
    """Logs and coordination, from one backend (memory, or one Redis)."""

    #: Whether other processes read these logs (and may serve a run's
    #: watchers while the process that runs it drains).
    shared: bool

    async def ping(self) -> None:
        """Return once the backend answers; raise `BrokerUnavailable` if it cannot
        be reached (`/readyz` bounds the wait)."""
        ...

    async def aclose(self) -> None:
        """Release the broker's resources."""
        ...


async def sweep_forever(broker: Logs, every: float) -> None:
    """`broker.sweep()` every `every` seconds, for as long as the application serves."""
    while True:
        await asyncio.sleep(every)
        try:
            await broker.sweep()
        except BrokerUnavailable:
            pass  # it will be back; the next sweep catches up
        except Exception:
            logger.exception("sweeping idle logs failed")


def from_url(url: str | None, *, lease: float = 10.0) -> Broker:
    """The broker a URL names: `redis://host:port/db` (also `rediss://`, `unix://`),
    or `memory://` / nothing for this process's memory.

    `lease` (Settings.lease): a shared broker that hangs is noticed within it."""
    if not url or url == "memory://":
        from .memory import MemoryBroker

        return MemoryBroker()
    if url.startswith(("redis://", "rediss://", "unix://")):
        try:
            from .redis import RedisBroker
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                f"the Redis broker needs {exc.name!r}: pip install 'tidewire[redis]'"
            ) from exc
        return RedisBroker(url, lease=lease)
    raise ValueError(f"unknown broker {url!r}: use redis://host:port/db, or memory://")
