"""The Redis broker: logs in Redis Streams, shared by every process of a deployment.

Each log is a stream at `<prefix><log>`, with a small hash beside it at
`<prefix><log>#meta` (`#` cannot occur in a channel name or a run id, so the
two never collide). Envelope ids are the stream ids, `<ms>-<seq>`: `ms` is
Redis's clock (never going back within a log) and `seq` is the log's own
count of events, so the seq of any id, even of a trimmed event, is known,
and a reader that was trimmed past can be told exactly how much it missed.
Appending, trimming and ending are Lua scripts: each is atomic.

Blocking reads do not hold a connection each. One task per broker follows
every log that has readers in this process with a single `XREAD BLOCK`, and
keeps a copy of each log's newest events (a *mirror*) that the readers here
are served from and woken by, as `MemoryBroker` wakes its readers. Readers
further behind read the stream itself.

If Redis cannot be reached, every method raises `BrokerUnavailable`: at
once when it is down, within `timeout` seconds when it hangs; readers
waiting for events too. The following task retries with a growing delay
and goes on from where each log was. Readers that arrive together share
their commands: thousands of subscribers cost Redis one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import logging
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..events import Envelope
from . import (
    AppendConflict,
    BadPosition,
    Batch,
    BrokerUnavailable,
    Retention,
    Tap,
    TooManyLogs,
    wire_size,
)
from .memory import Waiters

__all__ = ["RedisBroker"]

logger = logging.getLogger("tidewire")

T = TypeVar("T")

Position = tuple[int, int]  # a stream id as (ms, seq): tuples order as Redis orders ids

#: What a command raises when Redis cannot be reached (the built-in
#: TimeoutError is an OSError).
_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_U64 = 1 << 64

# Entries are `t <type> d <data JSON>`; the end marker is `end 1`. Its id is
# `<ms>-0`, after every event and never an event's id (their seq starts at 1).
# The hash holds `seq` (events so far), `last` (the newest event's id), `ms`
# (the ms of the newest entry, marker included), `age` (max age in ms, or ""),
# `bytes` (the wire_size of the events in the stream: Redis cannot trim by
# bytes, so the script counts them and trims oldest-first itself), and `end`
# once the log is ended.
#
# KEYS: the stream, its hash, and the sorted set of the logs of its kind (by
# last append, in ms) when their number is capped. ARGV: max_len, max age
# (ms), max bytes, keep_after, max logs, idle ttl (ms) ("" for none), the
# log's name, the events the log is expected to hold before these ("" for
# any), then (type, data) pairs. A capped kind that is full returns
# {"full", <ms until its oldest log is idle long enough to go>}. A log that
# holds more than expected returns {"dup", <ids>} when its next events are
# these very ones (an earlier try that landed late), else {"conflict"}.

_APPEND = """
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_logs = tonumber(ARGV[5])
local idle = tonumber(ARGV[6])
if max_logs then
    if idle then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ms - idle) end
    if not redis.call('ZSCORE', KEYS[3], ARGV[7]) and redis.call('ZCARD', KEYS[3]) >= max_logs then
        local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
        local wait = 60000
        if idle and oldest[2] then wait = tonumber(oldest[2]) + idle - ms end
        return {'full', string.format('%d', wait)}
    end
    redis.call('ZADD', KEYS[3], ms, ARGV[7])
end
local meta = redis.call('HMGET', KEYS[2], 'seq', 'ms', 'bytes')
local seq = tonumber(meta[1]) or 0
local top = tonumber(meta[2]) or 0
local bytes = tonumber(meta[3]) or 0
local expect = tonumber(ARGV[8])
if expect and seq ~= expect then
    -- The newest entries, back to the first of this append's places.
    local want = (#ARGV - 8) / 2
    local found = {}
    if seq > expect then
        local back = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', seq - expect + 1)
        for i = #back, 1, -1 do
            local id, fields = back[i][1], back[i][2]
            local n = tonumber(string.match(id, '-(%d+)$'))
            if fields[1] == 't' and n > expect and n <= expect + want then
                local k = 9 + 2 * (n - expect - 1)
                if fields[2] ~= ARGV[k] or fields[4] ~= ARGV[k + 1] then return {'conflict'} end
                found[#found + 1] = id
            end
        end
    end
    if #found ~= want then return {'conflict'} end
    return {'dup', unpack(found)}
end
if top > ms then ms = top end
local ids = {}
for i = 9, #ARGV, 2 do
    seq = seq + 1
    local id = string.format('%d-%d', ms, seq)
    redis.call('XADD', KEYS[1], id, 't', ARGV[i], 'd', ARGV[i + 1])
    bytes = bytes + #id + #ARGV[i] + #ARGV[i + 1] + 29
    ids[#ids + 1] = id
end
-- Trim oldest-first by count, age and bytes, counting the bytes of what goes.
local len = redis.call('XLEN', KEYS[1])
local max_len = tonumber(ARGV[1])
local cutoff = tonumber(ARGV[2])
if cutoff then cutoff = ms - cutoff end
local max_bytes = tonumber(ARGV[3])
local keep_after = tonumber(ARGV[4])
local start = '-'
local cut = nil
while true do
    local batch = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 64)
    local stop = #batch == 0
    for _, entry in ipairs(batch) do
        local id, fields = entry[1], entry[2]
        local id_ms, id_seq = string.match(id, '^(%d+)-(%d+)$')
        local by_bytes = max_bytes and bytes > max_bytes
            and (not keep_after or tonumber(id_seq) <= keep_after)
        if not (len > max_len or (cutoff and tonumber(id_ms) < cutoff) or by_bytes) then
            stop = true
            break
        end
        len = len - 1
        if fields[1] == 't' then bytes = bytes - (#id + #fields[2] + #fields[4] + 29) end
        cut = string.format('%s-%d', id_ms, tonumber(id_seq) + 1)
    end
    if stop then break end
    start = '(' .. batch[#batch][1]
end
if cut then redis.call('XTRIM', KEYS[1], 'MINID', '=', cut) end
redis.call('HSET', KEYS[2], 'seq', seq, 'ms', string.format('%d', ms), 'last', ids[#ids],
           'age', ARGV[2], 'bytes', bytes)
if idle then
    -- An idle log goes, as it goes from the sorted set: nothing keeps it.
    redis.call('PEXPIRE', KEYS[1], idle)
    redis.call('PEXPIRE', KEYS[2], idle)
end
return ids
"""

_READ = """
local meta = redis.call('HMGET', KEYS[2], 'seq', 'last', 'age', 'end')
local start = '(' .. ARGV[1] .. '-' .. ARGV[2]
if meta[3] and meta[3] ~= '' then
    -- Age trimming happens on quiet logs too: what is too old is not read.
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local cutoff = now - tonumber(meta[3])
    if tonumber(ARGV[1]) < cutoff then start = string.format('%d-0', cutoff) end
end
local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', ARGV[3])
return {meta[1] or '', meta[2] or '', meta[3] or '', meta[4] or '', entries}
"""

_END = """
local meta = redis.call('HMGET', KEYS[2], 'last', 'ms', 'end')
if not meta[3] then
    local t = redis.call('TIME')
    local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local top = tonumber(meta[2]) or 0
    if ms <= top then ms = top + 1 end
    redis.call('XADD', KEYS[1], string.format('%d-0', ms), 'end', '1')
    redis.call('HSET', KEYS[2], 'end', '1', 'ms', string.format('%d', ms))
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return meta[1] or ''
"""

_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# Quotas' counting. A slot set is a sorted set of members scored by their
# expiry (Redis's clock, ms): the counting semaphore of "Redis in Action"
# 6.3, with expiry so that a process that dies frees its slots.
_HOLD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
        and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return math.max(0, tonumber(first[2]) - now)
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
return -1
"""

_RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
    redis.call('ZADD', KEYS[1], 'XX', until_, ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
    local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
end
return 0
"""

# The generic cell rate algorithm (GCRA), as redis-cell implements it: a
# token bucket kept as one number per client (the theoretical arrival time,
# TAT), so a check is one GET and one SET, with no refill timer, and with
# Redis's clock every process agrees. Returns 0, or the ms to wait.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
tat = tat + interval
local wait = tat - tonumber(ARGV[2]) * interval - now
if wait > 0 then return tostring(wait) end
redis.call('SET', KEYS[1], tostring(tat), 'PX', math.max(1, math.ceil(tat - now)))
return '0'
"""

_ADD = """
local value = tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[1])
if value < 0 then value = 0 end
if ARGV[2] ~= '' and tonumber(ARGV[1]) > 0 and value > tonumber(ARGV[2]) then return -1 end
if value == 0 then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], value) end
return value
"""


def _optional(value: int | None) -> str | int:
    return "" if value is None else value


def _position(id: str) -> Position:
    """Parse an id from outside (a client's `Last-Event-ID`, `?after=`)."""
    if id == "0":
        return (0, 0)
    match = _ID.fullmatch(id)
    if match is None or int(match[1]) >= _U64 or int(match[2]) >= _U64:
        raise BadPosition(
            f"{id!r} is not an event id here: ids look like 1700000000000-42 (or 0 for the start)"
        )
    return int(match[1]), int(match[2])


def _parse(id: str) -> Position:
    """Parse an id that came from Redis."""
    ms, _, seq = id.partition("-")
    return int(ms), int(seq)


@contextlib.contextmanager
def _reachable() -> Iterator[None]:
    try:
        yield
    except _DOWN as exc:
        raise BrokerUnavailable(f"redis is unreachable: {exc}") from exc


def _event(id: str, event_type: bytes, data_json: bytes) -> Envelope:
    return Envelope(id, int(id.partition("-")[2]), event_type.decode(), data_json)


class _Held:
    """Bytes (`wire_size`) of the events in every mirror of one broker together."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class _Mirror(Waiters):
    """This process's copy of the newest events of one log, and the readers here waiting on it.

    It holds a contiguous run of events (by seq) ending at `head`, filled by
    the following task (and at once by appends made here). A reader whose
    position is inside it, or at its head, is served from it; any other
    reader reads the stream.
    """

    __slots__ = (
        "age", "age_known", "bytes", "ended", "events", "head", "held", "now_ms", "position",
        "sizes", "used",
    )  # fmt: skip

    def __init__(
        self,
        head: Position,
        age: int | None,
        age_known: bool,
        ended: bool,
        held: _Held,
        now_ms: Callable[[], float] = lambda: time.time() * 1000,
    ) -> None:
        super().__init__()
        self.now_ms = now_ms  # Redis's clock, as this process reckons it (for `age`)
        self.events: deque[Envelope] = deque()
        self.sizes: deque[int] = deque()  # each event's wire_size
        self.bytes = 0  # their sum, also counted in `held`
        self.held = held
        self.head = head  # the newest event known here
        # The stream id the following task reads after: the newest entry it
        # has seen (the end marker included), or the newest event when it starts.
        self.position = f"{head[0]}-{head[1]}"
        self.age = age  # max age in ms, as the log's writer set it
        self.age_known = age_known
        self.ended = ended
        self.used = time.monotonic()

    def add(self, event: Envelope, window: int) -> bool:
        """Keep a new event; False if it was here already (appended by this process)."""
        position = _parse(event.id)
        if position <= self.head:
            return False
        if self.events and event.seq != self.events[-1].seq + 1:
            # Not the next one: trimmed before it was read, or the log was
            # deleted and begun again. What is here no longer leads up to it.
            self.clear()
        size = wire_size(event)
        self.events.append(event)
        self.sizes.append(size)
        self.bytes += size
        self.held.bytes += size
        if len(self.events) > window:
            self.drop()
        self.head = position
        return True

    def drop(self) -> None:
        """Forget the oldest event here (its readers read it from Redis)."""
        self.events.popleft()
        size = self.sizes.popleft()
        self.bytes -= size
        self.held.bytes -= size

    def clear(self) -> None:
        self.events.clear()
        self.sizes.clear()
        self.held.bytes -= self.bytes
        self.bytes = 0

    def take(self, position: Position, limit: int, now_ms: float) -> Batch | None:
        """The events after `position`; None if they are not all here."""
        events = self.events
        if self.age is not None:
            cutoff = now_ms - self.age
            while events and _parse(events[0].id)[0] < cutoff:
                self.drop()
        if position >= self.head:
            return Batch(ended=self.ended)  # nothing new (a position beyond the head: none yet)
        if not events:
            return None
        start = position[1] - events[0].seq + 1
        if not 0 <= start < len(events):
            return None
        # Seqs locate the position; ids confirm it is this log's (not one
        # from before a deletion, whose seqs started again).
        if _parse(events[start].id) <= position or (
            start and _parse(events[start - 1].id) > position
        ):
            return None
        stop = min(len(events), start + limit)
        return Batch(
            events=[events[i] for i in range(start, stop)],
            ended=self.ended and stop == len(events),
        )

    def tap_batch(self, position: object, limit: int) -> tuple[Batch, object] | None:
        assert isinstance(position, tuple)
        batch = self.take(position, limit, self.now_ms())
        if batch is None:
            return None
        return batch, _parse(batch.events[-1].id) if batch.events else position

    def fail(self, message: str) -> None:
        """Raise `BrokerUnavailable` in every reader waiting here."""
        self.release_taps()  # they read on, and are told
        if self.deferred is not None:
            self.deferred.cancel()
            self.deferred = None
        # Readers of a wake-up still going on too: they would read a copy
        # that is no longer followed.
        readers = [w for waiters in self.waiters.values() for w in waiters]
        for waiter in [*readers, *(self.waking or ())]:
            if not waiter.done():
                waiter.set_exception(BrokerUnavailable(message))
        self.waiters.clear()
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()


class RedisBroker:
    """Logs in Redis Streams; ids are Redis stream ids, `<ms>-<seq>`.

    tw = Tidewire(broker=RedisBroker("redis://127.0.0.1:6379/0"))

    `prefix` begins every key (several deployments may share one Redis);
    `ended_ttl` is how long an ended log stays in Redis at most; `window` is
    how many of a log's newest events each process keeps for its readers.
    At most `max_connections` commands are under way at once (more wait for
    a connection, up to `timeout` seconds, the limit on any command too;
    by default a third of `lease`, at most 3 s);
    waiting readers need none of them. `max_retained_bytes` bounds the
    copies this process keeps, all together: past it, the oldest events of
    the biggest go (their readers read them from Redis).
    """

    #: Every process on the same Redis (and prefix) reads these logs.
    shared = True

    #: How long one `XREAD` blocks, in milliseconds: how often the following
    #: task looks round when nothing happens. At most half the lease (see __init__).
    block_ms = 5_000
    #: Seconds a log nobody here has read stays followed.
    idle = 30.0

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "tw:",
        ended_ttl: float = 24 * 3600.0,
        window: int = 2_048,
        max_connections: int = 16,
        timeout: float | None = None,
        max_retained_bytes: int | None = None,
        lease: float = 10.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.ended_ttl = ended_ttl
        self.window = window
        # A Redis that hangs (SIGSTOP, a full network buffer, a long fork)
        # answers nothing and closes nothing: only timeouts notice it. They
        # are derived from the run lease (Settings.lease) so that a hang is
        # noticed, and answered 503, well within one lease: a command
        # within lease/3, the following task's blocking read within
        # lease/2 + lease/3. Each connection is also pinged before use when
        # it was idle longer than a lease tick (health_check_interval), so a
        # pooled connection to a Redis that went away fails at the ping,
        # within the same timeout, not halfway through a command.
        if timeout is None:
            timeout = min(3.0, lease / 3)
        self.block_ms = max(10, min(self.block_ms, round(lease * 1000 / 2)))
        # Fail fast when Redis is away: short timeouts, and one retry only,
        # on a broken connection (not a timeout): it replaces a pooled
        # connection that a Redis restart left dead.
        options: dict[str, Any] = {
            "socket_connect_timeout": min(timeout, 1.0),
            "health_check_interval": lease / 3,
            "retry": Retry(NoBackoff(), 1, (redis.exceptions.ConnectionError,)),
        }
        # Commands queue for one of `max_connections` slots here rather than in
        # redis-py's BlockingConnectionPool, which wakes every waiter each time
        # a connection comes back: with thousands of readers subscribing at
        # once, that costs more than the commands.
        self._slots = asyncio.Semaphore(max_connections)
        self._timeout = timeout
        self._pool = aioredis.ConnectionPool.from_url(url, socket_timeout=timeout, **options)
        self._redis = aioredis.Redis(connection_pool=self._pool)
        # The following task's own connection: it blocks for block_ms at a time.
        options["retry"] = Retry(NoBackoff(), 0)
        self._tail_pool = aioredis.ConnectionPool.from_url(
            url, max_connections=1, socket_timeout=self.block_ms / 1000 + timeout, **options
        )
        self._tail_redis = aioredis.Redis(connection_pool=self._tail_pool)
        self._append = self._redis.register_script(_APPEND)
        self._read = self._redis.register_script(_READ)
        self._end = self._redis.register_script(_END)
        self._claim = self._redis.register_script(_CLAIM)
        self._hold = self._redis.register_script(_HOLD)
        self._renew = self._redis.register_script(_RENEW)
        self._take = self._redis.register_script(_TAKE)
        self._add = self._redis.register_script(_ADD)

        self._mirrors: dict[str, _Mirror] = {}
        self._held = _Held()
        self.max_retained_bytes = max_retained_bytes
        self._tail: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # a log to follow was added
        self._retry = asyncio.Event()  # a reader wants the following task to retry now
        self._down: str | None = None  # why the following task cannot reach Redis
        self._skew_ms = 0.0  # Redis's clock minus ours
        # Interrupting the XREAD when a log is added: which logs it covers,
        # and which it should.
        self._generation = 0
        self._blocked: tuple[int, int] | None = None  # (client id, generation) while blocked
        self._unblocker: asyncio.Task[None] | None = None
        self._swept = time.monotonic()
        self._closed = False
        self._inflight: dict[tuple[Any, ...], asyncio.Future[Any]] = {}
        self._writes = 0  # appends, ends and deletes made here: see _shared()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBroker:
        return cls(url, **options)

    @contextlib.asynccontextmanager
    async def _command(self) -> AsyncIterator[None]:
        """Hold a slot for one command; raise `BrokerUnavailable` if Redis cannot be reached."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise BrokerUnavailable(
                f"redis is too slow: no command finished in {self._timeout:g}s"
            ) from None
        try:
            with _reachable():
                yield
        finally:
            self._slots.release()

    def _key(self, log: str) -> str:
        return self.prefix + log

    def _keys(self, log: str) -> list[str]:
        return [self.prefix + log, self.prefix + log + "#meta"]

    def _now_ms(self) -> float:
        return time.time() * 1000 + self._skew_ms

    # -- logs (the `Logs` protocol) -------------------------------------------

    async def append(
        self,
        log: str,
        items: Sequence[tuple[str, bytes]],
        retention: Retention,
        *,
        expect: int | None = None,
    ) -> list[Envelope]:
        if not items:
            return []
        age = "" if retention.max_age is None else str(max(1, round(retention.max_age * 1000)))
        args: list[str | bytes | int] = [
            retention.max_len,
            age,
            _optional(retention.max_bytes),
            _optional(retention.keep_after),
            _optional(retention.max_logs),
            "" if retention.idle_ttl is None else max(1, round(retention.idle_ttl * 1000)),
            log,
            _optional(expect),
        ]
        for event_type, data_json in items:
            args += (event_type, data_json)
        self._writes += 1
        keys = [*self._keys(log), f"{self.prefix}kind:{retention.kind}"]
        async with self._command():
            ids = await self._append(keys=keys, args=args)
        if ids and ids[0] == b"full":
            raise TooManyLogs(
                f"the most {retention.kind or 'log'}s this server allows exist",
                retry_after=max(1.0, math.ceil(int(ids[1]) / 1000)),
            )
        if ids and ids[0] == b"conflict":
            raise AppendConflict(f"{log} holds events that are not this append's")
        if ids and ids[0] == b"dup":
            ids = ids[1:]  # an earlier try landed: these are its events
        events = [
            Envelope(raw.decode(), int(raw.partition(b"-")[2]), event_type, data_json)
            for raw, (event_type, data_json) in zip(ids, items, strict=True)
        ]
        mirror = self._mirrors.get(log)
        if mirror is not None:
            # Readers here see their own process's appends at once; the
            # following task brings the same events again and they are skipped.
            mirror.age = None if retention.max_age is None else int(age)
            mirror.age_known = True
            if events[0].seq == mirror.head[1] + 1 and _parse(events[0].id) > mirror.head:
                for event in events:
                    mirror.add(event, self.window)
                self._keep_budget()
                mirror.notify()
        return events

    @property
    def retained_bytes(self) -> int:
        """Bytes of the events this process keeps in its copies of logs."""
        return self._held.bytes

    def _keep_budget(self) -> None:
        """Past `max_retained_bytes`, drop the oldest events of the biggest copies here,
        down to 1/32 under it (see `broker`). Nothing is lost: Redis has them."""
        budget = self.max_retained_bytes
        if budget is None or self._held.bytes <= budget:
            return
        goal = budget - budget // 32
        heap = [(-m.bytes, name) for name, m in self._mirrors.items() if m.events]
        heapq.heapify(heap)
        while self._held.bytes > goal and heap:
            _, name = heapq.heappop(heap)
            mirror = self._mirrors[name]
            runner_up = -heap[0][0] if heap else 0
            while self._held.bytes > goal and mirror.events and mirror.bytes >= runner_up:
                mirror.drop()
            if mirror.events:
                heapq.heappush(heap, (-mirror.bytes, name))

    def check_id(self, id: str) -> None:
        _position(id)

    async def read(self, log: str, after: str, *, limit: int, timeout: float | None) -> Batch:
        position = _position(after)
        wait = timeout is None or timeout > 0
        mirror = self._mirrors.get(log)
        if mirror is not None and self._down is None:
            mirror.used = time.monotonic()
            here = mirror.take(position, limit, self._now_ms())
            if here is not None and (here.events or here.ended):
                return here
            if here is not None and wait:
                # At the head of the copy here: wait for the next events,
                # without asking Redis. The common case, by far.
                return await self._wait(log, mirror, min(position, mirror.head), limit, timeout)
        shared, head, meta = await self._shared(
            ("fetch", log, position, limit, self._writes), self._fetch, log, position, limit
        )
        # Each reader gets a batch of its own: the events are shared.
        batch = dataclasses.replace(shared, events=list(shared.events))
        if batch.events or batch.missed or batch.ended or not wait:
            return batch
        # Nothing after `position` is in the log (or it is beyond the head):
        # wait from the head.
        return await self._wait(log, self._follow(log, head, meta), head, limit, timeout)

    async def _fetch(
        self, log: str, position: Position, limit: int
    ) -> tuple[Batch, Position, tuple[str, bool]]:
        """Read the stream itself; also return its head, and its max age and whether it ended."""
        async with self._command():
            reply = await self._read(keys=self._keys(log), args=[*position, limit + 1])
        seq_raw, last_raw, age_raw, end_raw, entries = reply
        ended = bool(end_raw)
        head_seq = int(seq_raw or 0)
        head = _parse(last_raw.decode()) if last_raw else (0, 0)
        events: list[Envelope] = []
        for raw_id, fields in entries:
            if fields[0] == b"t":  # not the end marker
                events.append(_event(raw_id.decode(), fields[1], fields[3]))
                if len(events) == limit:
                    break
        batch = Batch(events=events)
        if events:
            first = events[0]
            batch.missed = max(0, first.seq - position[1] - 1)
            if batch.missed:
                batch.resume_id = f"{_parse(first.id)[0]}-{first.seq - 1}"
            batch.ended = ended and events[-1].seq >= head_seq
        else:
            if position < head:
                # Everything after the position was trimmed away.
                batch.missed = max(0, head_seq - position[1])
                if batch.missed:
                    batch.resume_id = last_raw.decode()
            batch.ended = ended
        return batch, head, (age_raw.decode(), bool(seq_raw) or ended)

    def _follow(self, log: str, head: Position, meta: tuple[str, bool]) -> _Mirror:
        """The mirror of a log, made (and followed from `head`) if there is none."""
        mirror = self._mirrors.get(log)
        if mirror is None:
            age, exists = meta
            mirror = _Mirror(
                head, int(age) if age else None, exists, False, self._held, self._now_ms
            )
            self._mirrors[log] = mirror
            self._generation += 1
            self._changed.set()
            self._start()
            self._interrupt()
        mirror.used = time.monotonic()
        return mirror

    async def _wait(
        self, log: str, mirror: _Mirror, position: Position, limit: int, timeout: float | None
    ) -> Batch:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        left = timeout
        while True:
            if self._down is not None:
                self._retry.set()  # perhaps Redis is back: do not wait for the next retry
            self._start()
            if not await mirror.wait(left):
                return Batch()
            batch = mirror.take(position, limit, self._now_ms())
            if batch is None:
                # The copy here moved past this reader (it fell behind).
                return (await self._fetch(log, position, limit))[0]
            if batch.events or batch.ended:
                return batch
            # Woken for events this reader already had (it was ahead of the copy).
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    return Batch()

    def tap(self, log: str, after: str, tap: Tap) -> bool:
        mirror = self._mirrors.get(log)
        if mirror is None or self._down is not None or mirror.ended:
            return False
        position = _position(after)
        if position != mirror.head:
            return False
        mirror.taps[tap] = position
        mirror.used = time.monotonic()
        return True

    def untap(self, log: str, tap: Tap) -> None:
        mirror = self._mirrors.get(log)
        if mirror is not None:
            mirror.taps.pop(tap, None)
            mirror.used = time.monotonic()  # kept a while for the reader's next read

    async def last_id(self, log: str) -> str:
        mirror = self._mirrors.get(log)
        if mirror is not None and self._down is None:
            # Perhaps a few milliseconds behind Redis: a subscriber starting
            # "live from now" then gets those events too, and Redis is spared
            # one command per subscriber.
            ms, seq = mirror.head
            return "0" if seq == ms == 0 else f"{ms}-{seq}"
        return await self._shared(("last", log, self._writes), self._last_id, log)

    async def _last_id(self, log: str) -> str:
        async with self._command():
            last = await self._redis.hget(self._keys(log)[1], "last")
        return cast(bytes, last).decode() if last else "0"

    async def _shared(
        self, key: tuple[Any, ...], call: Callable[..., Awaitable[T]], *args: Any
    ) -> T:
        """`call(*args)`, made once for every reader asking the same at the same time.

        Thousands of subscribers arriving together (a page load, a reconnect
        storm) then cost Redis one command, not thousands. `key` includes
        the count of writes made here, so that a reader never shares a
        reply older than an append this process finished before it asked.
        """
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(call(*args))
            self._inflight[key] = future
            future.add_done_callback(partial(self._landed, key))
        # Shielded: one reader giving up must not cancel it for the others.
        return cast(T, await asyncio.shield(future))

    def _landed(self, key: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.cancelled():
            future.exception()  # retrieved: every caller may have gone

    async def end(self, log: str) -> None:
        self._writes += 1
        async with self._command():
            last = await self._end(keys=self._keys(log), args=[round(self.ended_ttl * 1000)])
        mirror = self._mirrors.get(log)
        # Only once the copy here holds the last event: else the end marker
        # comes through the following task, after it.
        if mirror is not None and mirror.head == (_parse(last.decode()) if last else (0, 0)):
            mirror.ended = True
            mirror.notify()

    async def delete(self, log: str) -> None:
        self._writes += 1
        async with self._command():
            await self._redis.delete(*self._keys(log))
        mirror = self._mirrors.pop(log, None)
        if mirror is not None:
            mirror.clear()
            mirror.ended = True
            mirror.release_taps()
            mirror.wake()

    async def sweep(self) -> None:
        """Nothing to do: Redis expires idle logs itself (`idle_ttl`), each append
        trims its kind's set of idle names, and copies here nobody reads are
        dropped by the following task."""

    # -- following logs -----------------------------------------------------

    def _start(self) -> None:
        if (self._tail is None or self._tail.done()) and not self._closed:
            self._tail = asyncio.get_running_loop().create_task(self._tail_forever())

    def _interrupt(self) -> None:
        """Make a blocked XREAD return, so that the next one covers the logs just added."""
        if self._closed or self._blocked is None:
            return
        if self._unblocker is None or self._unblocker.done():
            self._unblocker = asyncio.get_running_loop().create_task(self._unblock())

    async def _unblock(self) -> None:
        # CLIENT UNBLOCK does nothing if it reaches Redis before the XREAD it
        # means to end (they travel on different connections): try again
        # until the XREAD that is blocked covers every log.
        for _ in range(200):
            blocked = self._blocked
            if blocked is None:
                await asyncio.sleep(0.005)
                continue
            client_id, generation = blocked
            if generation >= self._generation:
                return
            try:
                async with self._command():
                    await self._redis.client_unblock(client_id)
            except (BrokerUnavailable, redis.exceptions.RedisError):
                return  # the following task finds out and retries
            await asyncio.sleep(0.005)

    async def _tail_forever(self) -> None:
        delay = 0.05
        while not self._closed:
            try:
                await self._tail_once()
            except Exception as exc:
                if self._closed:
                    return
                if self._down is None:
                    delay = 0.05  # it was following: a new outage
                self._fail(exc)
                if isinstance(exc, _DOWN):
                    logger.warning("redis unreachable (%s): retrying in %.2fs", exc, delay)
                else:
                    logger.exception("following logs in redis failed: retrying")
            with contextlib.suppress(Exception):
                # A connection that failed halfway through a reply is not reused.
                await self._tail_pool.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._retry.wait()  # or a reader asks for a retry now
            self._retry.clear()
            delay = min(delay * 2, 2.0)

    def _fail(self, exc: BaseException) -> None:
        self._down = f"redis is unreachable: {exc}"
        self._blocked = None
        for mirror in self._mirrors.values():
            mirror.fail(self._down)

    async def _tail_once(self) -> None:
        """Follow the watched logs until Redis fails."""
        tail = self._tail_redis
        client_id = int(await tail.client_id())
        seconds, micros = await tail.time()
        self._skew_ms = seconds * 1000 + micros / 1000 - time.time() * 1000
        if self._down is not None:
            logger.info("redis reachable again: following %d logs", len(self._mirrors))
        self._down = None
        while not self._closed:
            self._sweep()
            watched = {name: m for name, m in self._mirrors.items() if not m.ended}
            if not watched:
                self._changed.clear()
                await self._changed.wait()
                continue
            generation = self._generation
            streams: dict[Any, Any] = {self._key(n): m.position for n, m in watched.items()}
            self._blocked = (client_id, generation)
            try:
                reply = await tail.xread(streams, count=1_024, block=self.block_ms)
            finally:
                self._blocked = None
            if reply:
                await self._deliver(cast(list[Any], reply))

    async def _deliver(self, reply: list[Any]) -> None:
        unknown_age = []
        for key, entries in reply:
            name = key.decode()[len(self.prefix) :]
            mirror = self._mirrors.get(name)
            if mirror is None:
                continue  # deleted meanwhile
            new = False
            for raw_id, fields in entries:
                id = raw_id.decode()
                mirror.position = id
                event_type = fields.get(b"t")
                if event_type is None:
                    mirror.ended = True
                    new = True
                elif mirror.add(_event(id, event_type, fields[b"d"]), self.window):
                    new = True
            if not mirror.age_known:
                unknown_age.append((name, mirror))
            if new:
                mirror.notify()
        self._keep_budget()
        for name, mirror in unknown_age:
            # A log that did not exist when it was first read here.
            age = await self._tail_redis.hget(self._keys(name)[1], "age")
            mirror.age = int(age) if age else None
            mirror.age_known = True

    def _sweep(self) -> None:
        """Stop following logs that nobody here has read for a while."""
        now = time.monotonic()
        if now - self._swept < self.idle / 4:
            return
        self._swept = now
        for name, mirror in list(self._mirrors.items()):
            if now - mirror.used > self.idle and not mirror.waiting():
                del self._mirrors[name]
                mirror.clear()

    # -- coordination (the `Coordination` protocol) ---------------------------

    async def ping(self) -> None:
        async with self._command():
            await self._redis.ping()

    async def put_state(
        self, key: str, fields: Mapping[str, str], ttl: float | None = None
    ) -> None:
        name = self.prefix + "state:" + key
        async with self._command(), self._redis.pipeline(transaction=True) as pipe:
            if fields:
                values: dict[Any, Any] = dict(fields)
                pipe.hset(name, mapping=values)
            if ttl is not None:
                pipe.pexpire(name, max(1, round(ttl * 1000)))
            await pipe.execute()

    async def get_state(self, key: str) -> dict[str, str]:
        async with self._command():
            record = cast(
                dict[bytes, bytes], await self._redis.hgetall(self.prefix + "state:" + key)
            )
        return {k.decode(): v.decode() for k, v in record.items()}

    async def delete_state(self, key: str, *fields: str) -> None:
        name = self.prefix + "state:" + key
        async with self._command():
            if fields:
                await self._redis.hdel(name, *fields)
            else:
                await self._redis.delete(name)

    async def claim(self, key: str, holder: str, ttl: float) -> bool:
        async with self._command():
            taken = await self._claim(
                keys=[self.prefix + "lease:" + key], args=[holder, max(1, round(ttl * 1000))]
            )
        return bool(taken)

    async def hold(self, key: str, member: str, limit: int, ttl: float) -> float | None:
        async with self._command():
            wait = await self._hold(
                keys=[self.prefix + "slots:" + key],
                args=[member, limit, max(1, round(ttl * 1000))],
            )
        return None if int(wait) < 0 else int(wait) / 1000

    async def renew(self, key: str, members: Sequence[str], ttl: float) -> None:
        if not members:
            return
        async with self._command():
            await self._renew(
                keys=[self.prefix + "slots:" + key], args=[max(1, round(ttl * 1000)), *members]
            )

    async def drop(self, key: str, member: str) -> None:
        async with self._command():
            await self._redis.zrem(self.prefix + "slots:" + key, member)

    async def take(self, key: str, rate: float, burst: int) -> float:
        async with self._command():
            wait = await self._take(
                keys=[self.prefix + "bucket:" + key], args=[repr(1000.0 / rate), burst]
            )
        return float(wait) / 1000

    async def add(self, key: str, amount: int, limit: int | None = None) -> int | None:
        async with self._command():
            value = int(
                await self._add(
                    keys=[self.prefix + "count:" + key],
                    args=[amount, "" if limit is None else limit],
                )
            )
        return None if value < 0 else value

    async def send(self, topic: str, message: str) -> None:
        async with self._command():
            await self._redis.publish(self.prefix + "topic:" + topic, message)

    async def listen(self, topic: str) -> AsyncIterator[str]:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            with _reachable():
                await pubsub.subscribe(self.prefix + "topic:" + topic)
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        yield message["data"].decode()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    # -----------------------------------------------------------------------

    async def aclose(self) -> None:
        self._closed = True
        tasks = [task for task in (self._tail, self._unblocker) if task is not None]
        for task in tasks:
            task.cancel()
        # On Python 3.11 a cancellation can be lost inside redis-py (its
        # asyncio.wait_for drops one that comes as the write it guards
        # completes); the following task then stops when its connection closes.
        await self._tail_pool.disconnect()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        mirrors, self._mirrors = self._mirrors, {}
        for mirror in mirrors.values():
            mirror.clear()
            mirror.ended = True
            mirror.release_taps()
            mirror.wake()
        await self._tail_redis.aclose()
        await self._redis.aclose()
        await self._tail_pool.aclose()
        await self._pool.aclose()
