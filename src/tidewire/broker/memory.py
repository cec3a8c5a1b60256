"""The in-memory broker: one process, no dependencies, the embedded default."""

from __future__ import annotations

import asyncio
import heapq
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Mapping, Sequence

from ..events import Envelope
from . import AppendConflict, BadPosition, Batch, Retention, Tap, TooManyLogs, wire_size

__all__ = ["MemoryBroker"]


#: Readers woken per turn of the event loop. Each woken reader writes to its
#: connection before the loop polls its sockets again, so a log with many
#: readers wakes them a slice at a time: between slices the loop reads new
#: requests (the next publish) and runs everything else that is ready. A
#: slice is a few milliseconds of writes (bench W3: ~40 µs a reader).
WAKE_SLICE = 64

#: Logs dropped for being idle whose numbering is remembered (`MemoryBroker._dropped`):
#: a channel dropped longer ago than that many others numbers from 1 again.
DROPPED_LOGS = 65_536

#: Taps fed per turn of the event loop (`Waiters.taps`): a feed is a write to
#: a socket and little else (~3 µs), so a slice is a fifth of a millisecond.
#: Short turns let a publish through a long feed: a publish takes several
#: turns, and it came in a second behind each slice. Bench W3, 10,000
#: subscribers on 2 workers and Redis, in runs of 256 against 64 side by
#: side: p99 306/250 vs 255/224 ms, publish round trip p50 58/43 vs 21/20 ms;
#: 32 was no better than 64.
FEED_SLICE = 64

#: After a feed of more than one slice, no feed begins for this fraction of
#: the time it took (see `Waiters._feed_soon`). Not less: at a quarter, with
#: the core shared with other load, 10,000 subscribers on 2 workers and Redis
#: got 47-51 of 100 publishes a second answered (92-96 at a half, same run).
FEED_QUIET = 0.5


class Waiters:
    """The readers of one log waiting for its next events, and how they are woken.

    Shared with the Redis broker, whose local copies of logs wake their
    readers the same way.
    """

    __slots__ = (
        "again", "deferred", "fed_quiet_until", "feeding", "quiet_until", "refeed", "stale",
        "taps", "timers", "waiters", "waking",
    )  # fmt: skip

    def __init__(self) -> None:
        # Readers at the head that are handed new events (broker.Tap), and the
        # position each has reached, in the log's own terms (see `tap_batch`).
        self.taps: dict[Tap, object] = {}
        self.feeding = False  # a feed is going on, a slice a turn
        self.refeed = False  # and events came meanwhile: another follows
        self.stale = False  # and the batches it has read lack them
        self.fed_quiet_until = 0.0  # no feed begins before (see `_feed_soon`)
        # Readers waiting for the next append, by the timeout they asked for.
        # One timer per timeout expires them all: a reader that came late in
        # a wait may be released early (a heartbeat sent sooner), but a log
        # with a thousand readers costs one timer per wait, not a thousand.
        self.waiters: dict[float, list[asyncio.Future[bool]]] = {}
        self.timers: dict[float, asyncio.TimerHandle] = {}
        # Adaptive coalescing of wake-ups, see notify().
        self.quiet_until = 0.0
        self.deferred: asyncio.TimerHandle | None = None
        # The readers of a wake-up still going on, a slice a turn (see WAKE_SLICE),
        # and whether events came meanwhile (then another wake-up follows).
        self.waking: list[asyncio.Future[bool]] | None = None
        self.again = False

    def notify(self) -> None:
        """Wake the readers for new events: at once, unless the last wake-up was costly.

        Waking a thousand readers keeps the event loop busy for tens of
        milliseconds. So after each wake-up this log stays quiet for half as
        long as that wake-up took, and events that arrive meanwhile go out
        together in the next one. Under light load the wait is microseconds;
        under heavy load fan-out takes at most about two thirds of the loop,
        and each reader writes several events at once instead of one. (Half:
        bench W3 measured p99 90 ms at half, 124 ms at a full quiet period,
        and 19 s with none, for 1,000 readers at 100 events/s.) The wake-up
        itself goes a slice of readers a loop turn (WAKE_SLICE), so that
        publishing and other connections are never queued behind all of them.
        """
        if self.taps:
            self._feed_soon()
        if self.waking is not None:
            self.again = True  # readers not woken yet will read these events too
            return
        if self.deferred is not None:
            return  # a wake-up is already due
        loop = asyncio.get_running_loop()
        if loop.time() >= self.quiet_until:
            self.wake()
        else:
            self.deferred = loop.call_at(self.quiet_until, self.wake)

    def wake(self) -> None:
        """Wake every reader waiting now (the first slice at once, the rest on later turns)."""
        if self.deferred is not None:
            self.deferred.cancel()
            self.deferred = None
        readers = [waiter for waiters in self.waiters.values() for waiter in waiters]
        self.waiters.clear()
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        if self.waking is not None:
            # Already waking: these go at the end of it, in its slices.
            self.waking.extend(readers)
            return
        loop = asyncio.get_running_loop()
        self.waking = readers
        self.again = False
        self._wake_slice(loop, 0, loop.time())

    def _wake_slice(self, loop: asyncio.AbstractEventLoop, start: int, started: float) -> None:
        readers = self.waking
        assert readers is not None
        stop = start + WAKE_SLICE
        for waiter in readers[start:stop]:
            if not waiter.done():
                waiter.set_result(True)
        # Queued behind the readers just woken, each of these runs once they
        # all have: the next slice, or the measure of what the wake-up cost.
        if stop < len(readers):
            loop.call_soon(self._wake_slice, loop, stop, started)
        else:
            self.waking = None
            if len(readers) > 1:
                loop.call_soon(self._measure, started)
            elif self.again:
                self.again = False
                self.notify()

    def _measure(self, started: float) -> None:
        now = asyncio.get_running_loop().time()
        self.quiet_until = now + (now - started) / 2
        if self.again:
            self.again = False
            self.notify()

    def tap_batch(self, position: object, limit: int) -> tuple[Batch, object] | None:
        """The events after `position` for a tap, and the position after them;
        None when they are not all here (the tap is released: its reader reads them)."""
        raise NotImplementedError

    def _feed_soon(self) -> None:
        """Feed the taps: on the loop's next turn, or once the quiet after the last feed ends.

        Not in the appending call: a publish is answered without waiting for
        its fan-out. As with readers woken (`notify`), a feed that took long
        is followed by a quiet half as long, and what is appended meanwhile
        goes out together: with more taps than a core can write each event
        to, each write carries several events, and the loop still has time
        for publishes and for the processes it shares a core with (bench W3,
        10,000 subscribers on 2 workers and Redis: 14 of 100 publishes a
        second were answered without the quiet).
        """
        if self.feeding:
            # Taps not fed yet get these too (their batches are read again);
            # the others in the feed that follows.
            self.refeed = self.stale = True
            return
        self.feeding = True
        loop = asyncio.get_running_loop()
        if loop.time() >= self.fed_quiet_until:
            loop.call_soon(self._feed, list(self.taps), 0, {}, loop.time())
        else:
            loop.call_at(self.fed_quiet_until, self._feed_due)

    def _feed_due(self) -> None:
        self._feed(list(self.taps), 0, {}, asyncio.get_running_loop().time())

    def _feed(
        self,
        taps: list[Tap],
        start: int,
        batches: dict[object, tuple[tuple[Batch, object] | None, dict[object, bytes]]],
        began: float,
    ) -> None:
        """Feed a slice of `taps` what follows their positions; the rest on later turns.

        Taps at one position (nearly all of them, at the head) share one batch
        and what they make of it (`shared`: its encodings). A tap whose batch
        has a gap, is the end, or that refuses it, is released.

        Events appended during a feed go to the taps it has not reached yet:
        an event waits at most for one feed and its quiet, not for the rest
        of the feed going on before them (bench W3, 10,000 subscribers).
        """
        if self.stale:
            self.stale = False
            batches = {}
        stop = start + FEED_SLICE
        current = self.taps
        for tap in taps[start:stop]:
            position = current.get(tap)
            if position is None:
                continue  # untapped meanwhile
            got = batches.get(position)
            if got is None:
                got = batches[position] = (self.tap_batch(position, tap.limit), {})
            taken, shared = got
            if taken is None:
                del current[tap]
                tap.release()
                continue
            batch, after = taken
            if not batch.events and not (batch.missed or batch.ended or batch.restarted):
                continue  # nothing new for it yet
            if batch.missed or batch.ended or batch.restarted or not tap.feed(batch, shared):
                del current[tap]
                tap.release()
                continue
            current[tap] = after
        loop = asyncio.get_running_loop()
        if stop < len(taps):
            loop.call_soon(self._feed, taps, stop, batches, began)
            return
        self.feeding = False
        if stop > FEED_SLICE:  # more than one turn's worth
            now = loop.time()
            self.fed_quiet_until = now + (now - began) * FEED_QUIET
        if self.refeed:
            self.refeed = False
            self._feed_soon()

    def release_taps(self) -> None:
        """Release every tap: this copy of the log is gone or no longer followed."""
        taps = list(self.taps)
        self.taps.clear()
        for tap in taps:
            tap.release()

    def waiting(self) -> bool:
        """Whether any reader waits here, or is being woken."""
        if self.waking or self.taps:
            return True
        return any(not w.done() for waiters in self.waiters.values() for w in waiters)

    def wait(self, timeout: float | None) -> asyncio.Future[bool]:
        """A future that becomes True on the next append, or False after about `timeout`."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        key = -1.0 if timeout is None else timeout
        self.waiters.setdefault(key, []).append(waiter)
        if timeout is not None and key not in self.timers:
            self.timers[key] = loop.call_later(timeout, self.expire, key)
        return waiter

    def expire(self, key: float) -> None:
        self.timers.pop(key, None)
        for waiter in self.waiters.pop(key, ()):
            if not waiter.done():
                waiter.set_result(False)


class _Log(Waiters):
    __slots__ = (
        "base", "bytes", "ended", "epoch", "events", "next_seq", "sizes", "times", "written",
    )  # fmt: skip

    def __init__(self, epoch: str, last_seq: int = 0) -> None:
        super().__init__()
        self.epoch = epoch  # the broker's: every id here is `<epoch>-<seq>`
        self.events: deque[Envelope] = deque()
        self.times: deque[float] = deque()  # monotonic time each event was appended
        self.sizes: deque[int] = deque()  # each event's wire_size
        self.bytes = 0  # their sum
        # Numbering goes on from the seq it had when it was last dropped (see
        # `MemoryBroker._dropped`): `base` is where this copy of it began.
        self.base = self.next_seq = last_seq + 1
        self.ended = False
        self.written = 0.0  # monotonic time of the last append

    def add(self, event: Envelope, now: float) -> None:
        size = wire_size(event)
        self.events.append(event)
        self.times.append(now)
        self.sizes.append(size)
        self.bytes += size

    def drop(self) -> int:
        """Forget the oldest event; the bytes freed."""
        self.events.popleft()
        self.times.popleft()
        size = self.sizes.popleft()
        self.bytes -= size
        return size

    def trimmable(self, keep_after: int | None) -> bool:
        """Whether its oldest event may be trimmed by bytes."""
        return bool(self.events) and (keep_after is None or self.events[0].seq <= keep_after)

    def trim(self, retention: Retention, now: float) -> int:
        """Trim by count, age and bytes; the bytes freed."""
        freed = 0
        while len(self.events) > retention.max_len:
            freed += self.drop()
        if retention.max_age is not None:
            cutoff = now - retention.max_age
            while self.times and self.times[0] < cutoff:
                freed += self.drop()
        if retention.max_bytes is not None:
            while self.bytes > retention.max_bytes and self.trimmable(retention.keep_after):
                freed += self.drop()
        return freed

    def take(self, after: int, limit: int, *, restarted: bool = False) -> Batch:
        first = self.next_seq - len(self.events)  # seq of events[0]
        # Not what went with the log when it was dropped (`base`): as on Redis,
        # a channel dropped for being idle is a new one when written again.
        missed = max(0, first - max(after, self.base - 1) - 1)
        start = max(after + 1, first) - first
        # Ids end in the seq numbers themselves, so the slice is by index.
        stop = min(len(self.events), start + limit)
        events = [self.events[i] for i in range(start, stop)] if start < stop else []
        return Batch(
            events=events,
            missed=missed,
            resume_id=f"{self.epoch}-{first - 1}" if missed or restarted else None,
            ended=self.ended and stop >= len(self.events),
            restarted=restarted,
        )

    def tap_batch(self, position: object, limit: int) -> tuple[Batch, object] | None:
        assert isinstance(position, int)
        batch = self.take(position, limit)
        return batch, batch.events[-1].seq if batch.events else position

    def waiting_readers(self) -> bool:
        return self.waiting()

    def idle(self) -> bool:
        """Nobody wrote here since it was made and nobody waits."""
        return self.next_seq == self.base and not self.waiting_readers()


#: An id from outside: `<epoch>-<seq>`, or a bare whole number (`0`, the start; any
#: other is an id of a tidewire from before epochs), in ASCII digits only. int() alone
#: would also take "+7", " 7", "7_0" and an Arabic-Indic 7, which name no event: a client
#: sending them gets 400, not a read from 7. (At most 20 digits each, as in a Redis id:
#: no id here ever gets longer.)
_ID = re.compile(r"(?:([0-9]{1,20})-)?([0-9]{1,20})")

_last_epoch = 0


def new_epoch() -> str:
    """An epoch for a new broker: the time it began, in milliseconds since 1970.

    Logs in memory begin again at 1 when the process restarts, so an id kept
    from before would name another event (or none). The epoch, the first part
    of every id, tells them apart. It counts up, as the time part of a Redis
    id does, so that an id of an earlier process sorts *before* the log: the
    reader missed what came after it there, how much is unknown, and gets a
    `gap` then everything retained now (`MemoryBroker.read`). An id of a later
    epoch (made up, or the clock was set back between two runs) sorts after
    the log, and the server tells its reader (server/transport.py
    `ahead_notice`). Either way an id of another epoch gets a `gap`, whichever
    way the clock went. (Counting down, to make every old id "ahead", would
    also skip what the new process published before the reader came back.)
    Later than any epoch made before in this process: two brokers made in the
    same millisecond (tests) still differ.
    """
    global _last_epoch
    _last_epoch = max(time.time_ns() // 1_000_000, _last_epoch + 1)
    return str(_last_epoch)


def _position(after: str, epoch: str) -> int | None:
    """The seq `after` names in `epoch`: 0 for `0`, None for an id of another epoch."""
    match = _ID.fullmatch(after)
    if match is None:
        raise BadPosition(
            f"{after!r} is not an event id here: ids look like {epoch}-42 (or 0 for the start)"
        )
    if match[1] is None:
        return 0 if int(match[2]) == 0 else None
    return int(match[2]) if int(match[1]) == int(epoch) else None


class _State:
    """Records, leases and topics for the processes of a deployment: here, just one.

    The `Coordination` half of the broker; `MemoryBroker` adds the `Logs`.
    """

    def __init__(self) -> None:
        # key -> (fields, expiry on the monotonic clock or None)
        self._records: dict[str, tuple[dict[str, str], float | None]] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._lease_mark = 64
        self._topics: dict[str, set[asyncio.Queue[str]]] = {}
        # Quotas' counting (see `Coordination.hold`, `take`, `add`).
        self._slots: dict[str, dict[str, float]] = {}  # key -> member -> expiry
        # key -> no member of it expires before this: a key is swept when that
        # time has passed, not on every hold (one client's 10,000 connections
        # made each new one scan all the others: bench W3, a quarter of the
        # server's CPU while its subscribers connected).
        self._sweeps: dict[str, float] = {}
        self._buckets: dict[str, float] = {}  # key -> theoretical arrival time (GCRA)
        self._bucket_mark = 64
        self._counters: dict[str, int] = {}

    def _record(self, key: str) -> tuple[dict[str, str], float | None] | None:
        record = self._records.get(key)
        if record is not None and record[1] is not None and record[1] <= time.monotonic():
            del self._records[key]
            return None
        return record

    async def put_state(
        self, key: str, fields: Mapping[str, str], ttl: float | None = None
    ) -> None:
        record = self._record(key)
        values, expiry = record if record is not None else ({}, None)
        values.update(fields)
        if ttl is not None:
            expiry = time.monotonic() + ttl
        self._records[key] = (values, expiry)

    async def get_state(self, key: str) -> dict[str, str]:
        record = self._record(key)
        return dict(record[0]) if record is not None else {}

    async def delete_state(self, key: str, *fields: str) -> None:
        record = self._record(key)
        if record is None:
            return
        if not fields:
            del self._records[key]
            return
        for name in fields:
            record[0].pop(name, None)

    async def claim(self, key: str, holder: str, ttl: float) -> bool:
        now = time.monotonic()
        current = self._leases.get(key)
        if current is not None and current[0] != holder and current[1] > now:
            return False
        self._leases[key] = (holder, now + ttl)
        if len(self._leases) > 2 * self._lease_mark:
            # Expired leases are dropped in bulk, now and then: amortised O(1).
            self._leases = {k: v for k, v in self._leases.items() if v[1] > now}
            self._lease_mark = max(64, len(self._leases))
        return True

    def _live(self, key: str, now: float) -> dict[str, float]:
        members = self._slots.get(key, {})
        if members and self._sweeps.get(key, 0.0) <= now:
            for member in [m for m, expiry in members.items() if expiry <= now]:
                del members[member]
            # Renewals only move expiries later, so this stays a lower bound.
            self._sweeps[key] = min(members.values(), default=math.inf)
        return members

    async def hold(self, key: str, member: str, limit: int, ttl: float) -> float | None:
        now = time.monotonic()
        members = self._live(key, now)
        if member not in members and len(members) >= limit:
            return min(members.values()) - now if members else 0.0
        expiry = members[member] = now + ttl
        self._slots.setdefault(key, members)
        self._sweeps[key] = min(self._sweeps.get(key, math.inf), expiry)
        return None

    async def renew(self, key: str, members: Sequence[str], ttl: float) -> None:
        held = self._slots.get(key, {})
        expiry = time.monotonic() + ttl
        for member in members:
            if member in held:
                held[member] = expiry

    async def drop(self, key: str, member: str) -> None:
        members = self._slots.get(key)
        if members is not None:
            members.pop(member, None)
            if not members:
                del self._slots[key]
                self._sweeps.pop(key, None)

    async def take(self, key: str, rate: float, burst: int) -> float:
        # GCRA, as the Redis broker's script (it says why).
        now = time.monotonic()
        interval = 1.0 / rate
        tat = max(self._buckets.get(key, now), now) + interval
        wait = tat - burst * interval - now
        if wait > 0:
            return wait
        self._buckets[key] = tat
        if len(self._buckets) > 2 * self._bucket_mark:
            # A bucket whose time has passed is full: the same as no entry.
            self._buckets = {k: t for k, t in self._buckets.items() if t > now}
            self._bucket_mark = max(64, len(self._buckets))
        return 0.0

    async def add(self, key: str, amount: int, limit: int | None = None) -> int | None:
        # Never below 0: a file stored before the quota was counted may be deleted.
        value = max(0, self._counters.get(key, 0) + amount)
        if limit is not None and amount > 0 and value > limit:
            return None
        if value:
            self._counters[key] = value
        else:
            self._counters.pop(key, None)
        return value

    async def send(self, topic: str, message: str) -> None:
        for queue in self._topics.get(topic, ()):
            queue.put_nowait(message)

    async def listen(self, topic: str) -> AsyncIterator[str]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._topics.setdefault(topic, set()).add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            listeners = self._topics[topic]
            listeners.discard(queue)
            if not listeners:
                del self._topics[topic]


class MemoryBroker(_State):
    """Logs in this process's memory. Ids are `"<epoch>-1"`, `"<epoch>-2"`, …
    within each log, `epoch` being the broker's (see `new_epoch`).

    `max_retained_bytes` bounds all its logs together (see `broker`).
    """

    #: No other process reads these logs.
    shared = False

    def __init__(self, *, max_retained_bytes: int | None = None) -> None:
        super().__init__()
        self.max_retained_bytes = max_retained_bytes
        #: The first part of every id (see `new_epoch`).
        self.epoch = new_epoch()
        self._logs: dict[str, _Log] = {}
        self._retention: dict[str, Retention] = {}
        self._bytes = 0  # wire_size of every event held, all logs together
        # Logs of each capped kind, least recently appended to first, and
        # how long each kind may stay idle.
        self._kinds: dict[str, OrderedDict[str, float]] = {}
        self._idle_ttl: dict[str, float | None] = {}
        # The last seq of each log dropped for being idle (a channel), newest
        # last: written again, it numbers on from there. Numbering from 1
        # again, an id a client kept from before would name a new event, and
        # resuming from it would skip events silently. At most DROPPED_LOGS.
        self._dropped: OrderedDict[str, int] = OrderedDict()

    @property
    def retained_bytes(self) -> int:
        """Bytes of the events held now, all logs together."""
        return self._bytes

    def _log(self, name: str) -> _Log:
        log = self._logs.get(name)
        if log is None:
            log = self._logs[name] = _Log(self.epoch, self._dropped.pop(name, 0))
        return log

    def _discard(self, name: str, log: _Log) -> None:
        """Forget `log`, and remember where its numbering was, if anywhere."""
        del self._logs[name]
        if log.next_seq > 1:
            self._dropped[name] = log.next_seq - 1
            if len(self._dropped) > DROPPED_LOGS:
                self._dropped.popitem(last=False)

    def _admit(self, log: str, retention: Retention, now: float) -> None:
        """Count `log` among the logs of its kind, or raise `TooManyLogs`."""
        members = self._kinds.setdefault(retention.kind, OrderedDict())
        self._idle_ttl[retention.kind] = retention.idle_ttl
        if log in members:
            members.move_to_end(log)
            members[log] = now
            return
        assert retention.max_logs is not None
        if len(members) >= retention.max_logs:
            self._drop_idle(members, retention.idle_ttl, now)
        if len(members) >= retention.max_logs:
            oldest = next(iter(members.values()))
            wait = 60.0 if retention.idle_ttl is None else oldest + retention.idle_ttl - now
            raise TooManyLogs(
                f"{len(members)} {retention.kind or 'log'}s exist, the most this server allows",
                retry_after=max(1.0, math.ceil(wait)),
            )
        members[log] = now

    def _drop_idle(self, members: OrderedDict[str, float], ttl: float | None, now: float) -> None:
        if ttl is None:
            return
        while members:
            name, written = next(iter(members.items()))
            if now - written < ttl:
                return
            del members[name]
            target = self._logs.get(name)
            if target is None:
                continue
            self._bytes -= target.bytes
            self._retention.pop(name, None)
            if target.waiting_readers():
                # Its subscribers stay; the log begins again, empty, when next written.
                target.events.clear()
                target.times.clear()
                target.sizes.clear()
                target.bytes = 0
            else:
                self._discard(name, target)

    async def append(
        self,
        log: str,
        items: Sequence[tuple[str, bytes]],
        retention: Retention,
        *,
        expect: int | None = None,
    ) -> list[Envelope]:
        now = time.monotonic()
        if retention.max_logs is not None:
            self._admit(log, retention, now)
        target = self._log(log)
        if expect is not None and target.next_seq - 1 != expect:
            # In memory an append cannot half-happen; the guard is kept for the contract.
            done = [e for e in target.events if expect < e.seq <= expect + len(items)]
            if [(e.event, e.data_json) for e in done] != list(items):
                raise AppendConflict(f"{log} holds events that are not this append's")
            return done
        self._retention[log] = retention
        target.written = now
        events = []
        before = target.bytes
        prefix = self.epoch + "-"
        for event_type, data_json in items:
            seq = target.next_seq
            target.next_seq += 1
            event = Envelope(prefix + str(seq), seq, event_type, data_json)
            target.add(event, now)
            events.append(event)
        target.trim(retention, now)
        self._bytes += target.bytes - before
        self._keep_budget()
        target.notify()
        return events

    def _keep_budget(self) -> None:
        """Past `max_retained_bytes`, trim the oldest events of the biggest logs.

        Down to 1/32 under the budget, so that finding the biggest logs (a
        heap of all of them) is paid once per that many bytes appended.
        Events a connected run watcher has not read (`keep_after`) stay.
        """
        budget = self.max_retained_bytes
        if budget is None or self._bytes <= budget:
            return
        goal = budget - budget // 32
        heap: list[tuple[int, str]] = []
        for name, log in self._logs.items():
            retention = self._retention.get(name)
            if log.trimmable(None if retention is None else retention.keep_after):
                heap.append((-log.bytes, name))
        heapq.heapify(heap)
        while self._bytes > goal and heap:
            _, name = heapq.heappop(heap)
            log = self._logs[name]
            retention = self._retention.get(name)
            keep_after = None if retention is None else retention.keep_after
            runner_up = -heap[0][0] if heap else 0
            # Down to the next biggest (then that one takes a turn), or the goal.
            while self._bytes > goal and log.bytes >= runner_up and log.trimmable(keep_after):
                self._bytes -= log.drop()
            if log.trimmable(keep_after):
                heapq.heappush(heap, (-log.bytes, name))

    def check_id(self, id: str) -> None:
        _position(id, self.epoch)

    async def read(self, log: str, after: str, *, limit: int, timeout: float | None) -> Batch:
        target = self._log(log)
        seq = _position(after, self.epoch)
        retention = self._retention.get(log)
        if retention is not None and retention.max_age is not None:
            # Age trimming happens on quiet logs too.
            self._bytes -= target.trim(retention, time.monotonic())
        if seq is None:
            # An id of another epoch, from before a restart: the log began
            # again since, so this reader reads it all, told at once (see `new_epoch`).
            batch = target.take(0, limit, restarted=True)
            if target.idle():
                self._discard(log, target)  # readers of made-up names must not leave logs behind
            return batch
        # An id beyond the head (made up; the server tells its readers, see
        # `ahead_notice`): read on from the head rather than wait for it.
        position = min(seq, target.next_seq - 1)
        batch = target.take(position, limit)
        if batch.events or batch.missed or batch.ended or timeout == 0:
            return batch
        try:
            woken = await target.wait(timeout)
        finally:
            if self._logs.get(log) is target and target.idle():
                # Readers of made-up names must not leave logs behind.
                target.wake()
                self._discard(log, target)
        return target.take(position, limit) if woken else Batch()

    def tap(self, log: str, after: str, tap: Tap) -> bool:
        target = self._logs.get(log)
        if target is None or target.ended:
            return False
        if _position(after, self.epoch) != target.next_seq - 1:
            return False
        target.taps[tap] = target.next_seq - 1
        return True

    def untap(self, log: str, tap: Tap) -> None:
        target = self._logs.get(log)
        if target is not None:
            target.taps.pop(tap, None)
            if target.idle():
                self._discard(log, target)  # as a reader's read leaves it (see `read`)

    async def last_id(self, log: str) -> str:
        # `<epoch>-0` for an empty log, not `0`: a reader starting there that
        # comes back after a restart is told it may have missed events.
        return f"{self.epoch}-{self._log(log).next_seq - 1}"

    async def end(self, log: str) -> None:
        target = self._log(log)
        target.ended = True
        target.notify()

    async def delete(self, log: str) -> None:
        target = self._logs.pop(log, None)
        retention = self._retention.pop(log, None)
        if retention is not None and retention.kind in self._kinds:
            self._kinds[retention.kind].pop(log, None)
        if target is not None:
            self._bytes -= target.bytes
            target.ended = True
            target.release_taps()
            target.wake()

    async def sweep(self) -> None:
        now = time.monotonic()
        for name, retention in list(self._retention.items()):
            target = self._logs.get(name)
            if target is not None and retention.max_age is not None:
                self._bytes -= target.trim(retention, now)
        for kind, members in self._kinds.items():
            self._drop_idle(members, self._idle_ttl.get(kind), now)

    async def ping(self) -> None:
        """This process's memory always answers."""

    async def aclose(self) -> None:
        for name in list(self._logs):
            await self.delete(name)
