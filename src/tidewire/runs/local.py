"""Runs in this process: starting, watching, backpressure, cancelling, expiry.

A *run* is one execution of a stream (see `stream`), writing its events into
a log that any number of watchers read. A run is executed by the process
that started it; watchers and cancels may come from others, and everything
that involves another process is delegated to `cluster.Cluster` (with the
memory broker it is this same process, and cheap).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from .. import metrics, wire
from ..blobs import Blobs, Pending
from ..broker import AppendConflict, Broker, BrokerUnavailable, wire_size
from ..config import Settings
from ..events import dump_data
from ..heap import trim
from .cluster import Cluster, log_name
from .sources import Source, close
from .stream import Item, StreamFunction

if TYPE_CHECKING:
    from ..quotas import Quotas

__all__ = ["Run", "Runs", "TooManyRuns", "Watcher"]

logger = logging.getLogger("tidewire")

RunState = Literal["running", "finished", "failed", "cancelled"]

#: Seconds from a run's expiry to the heap trim that returns its memory to
#: the operating system (see `heap`): expiries close together share one.
TRIM_DELAY = 1.0

#: How often (seconds) a blocked generator looks again at where watchers in
#: other processes are, and how stale that may be before it looks anyway.
REMOTE_POLL = 0.05
REMOTE_REFRESH = 0.1


#: The most events a run appends at once (those its generator yields without
#: waiting): one append, one wake-up of its watchers and one write each for
#: them all, rather than one per event. Also how many it appends before it
#: lets the loop run others, when its generator never waits.
BATCH = 64


class TooManyRuns(Exception):
    """`max_runs` runs are running already."""


@dataclass(eq=False)
class Run:
    """A run, as this process knows it: its own (`local`), or one running elsewhere."""

    id: str
    stream: str
    attached: bool
    owner: str  # the instance (process) that runs the generator
    local: bool = True
    #: Whose quota it counts against (`quotas.client_key`; "": nobody's).
    client: str = ""
    #: The `sub` of the identity that started it ("" with access control off):
    #: only it (or an admin) may see, watch or cancel the run. In the shared
    #: record too, so that every process refuses the others alike.
    sub: str = ""
    created: float = field(default_factory=time.time)
    state: RunState = "running"
    ended: float | None = None
    events: int = 0  # events appended so far, end/error/cancelled included
    # Positions (seq) of the watchers connected to this process now, by
    # watcher number; a generator never gets more than `run_window` events
    # ahead of the lowest here or in any other process.
    cursors: dict[int, int] = field(default_factory=dict)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    # The watchers connected here now, by number: the ones a stalled run may cut.
    watchers: dict[int, Watcher] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    # The last watcher's place, held for a while after it left, and the timer
    # that gives it up.
    held_place: tuple[int, asyncio.TimerHandle] | None = None
    # A local run: the lowest position of watchers in other processes, and
    # when it was last read (monotonic); `events` when it was read.
    remote_low: int | None = None
    remote_checked: float = 0.0
    remote_checked_at: int = 0
    # A local run whose lease another process took: it must stop, quietly.
    lost: bool = False
    # A local run whose generator is being closed: a cancel now would cut that short.
    closing: bool = False
    # A run elsewhere: the position this process last reported to the others.
    reported: int = -1
    # A local run: bytes (wire_size) appended so far, and that count after
    # each of the newest events (enough of them to measure what a watcher
    # within the count window has not read).
    bytes: int = 0
    offsets: deque[int] = field(default_factory=deque)

    def unread_bytes(self, position: int) -> int | None:
        """Bytes appended after `position`; None if that is beyond what is measured."""
        if position <= 0:
            return self.bytes
        index = position - (self.events - len(self.offsets)) - 1
        if not 0 <= index < len(self.offsets):
            return None
        return self.bytes - self.offsets[index]

    @classmethod
    def elsewhere(cls, run_id: str, record: dict[str, str]) -> Run:
        """A run another process executes, from its shared record."""
        return cls(
            id=run_id,
            stream=record["stream"],
            attached=bool(record["attached"]),
            owner=record["owner"],
            local=False,
            sub=record.get("sub", ""),
            created=float(record["created"]),
        )

    @property
    def log(self) -> str:
        return log_name(self.id)

    def slowest_position(self) -> int | None:
        """The position of the slowest watcher, here or elsewhere; None if none."""
        low = min(self.cursors.values()) if self.cursors else None
        if self.remote_low is not None and (low is None or self.remote_low < low):
            return self.remote_low
        return low

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "stream": self.stream,
            "state": self.state,
            "events": self.events,
            "created": self.created,
            "ended": self.ended,
        }

    def record(self) -> dict[str, str]:
        """The run's shared record, for other processes."""
        return {
            "stream": self.stream,
            "attached": "1" if self.attached else "",
            "owner": self.owner,
            "sub": self.sub,
            "state": self.state,
            "events": str(self.events),
            "created": repr(self.created),
            "ended": "" if self.ended is None else repr(self.ended),
        }

    def update(self, record: dict[str, str]) -> None:
        self.state = record["state"]  # type: ignore[assignment]
        self.events = max(self.events, int(record["events"]))
        self.ended = float(record["ended"]) if record["ended"] else None


class Watcher:
    """One watcher's place in a run, held while it is connected."""

    def __init__(self, runs: Runs, run: Run, key: int) -> None:
        self._runs = runs
        self.run = run
        self.key = key
        #: When it last delivered anything (monotonic): what `stall_timeout` is counted from.
        self.moved = time.monotonic()
        #: Cut for stalling the run (see `Runs.cut`); the transport closes its connection.
        self.stalled = False
        #: Called when it is cut: the transport's way to end its connection.
        self.on_stall: Callable[[], object] | None = None

    def advance(self, seq: int) -> None:
        run = self.run
        self.moved = time.monotonic()
        if seq > run.cursors.get(self.key, 0):
            run.cursors[self.key] = seq
            if run.local:
                run.progress.set()
            elif seq - run.reported >= self._runs.cluster.report_step:
                self._runs.cluster.report_positions_soon(run)

    async def check_owner_alive(self) -> None:
        """Nothing came for a while: is the run's process still alive? If not, fail the run."""
        if not self.run.local:
            await self._runs.cluster.check_owner_alive(self.run)

    # server/transport.py's name for it, until it calls check_owner_alive.

    def leave(self) -> None:
        self._runs.release(self.run, self.key)


class Runs:
    """Runs: started here, or elsewhere and watched or cancelled from here."""

    def __init__(self, broker: Broker, settings: Settings, blobs: Blobs) -> None:
        self.broker = broker
        self.settings = settings
        self.blobs = blobs
        self.cluster = Cluster(broker, settings, self)
        self.retention = self.cluster.retention
        self.instance = self.cluster.instance
        self._runs: dict[str, Run] = {}
        self._keys = itertools.count(1)
        self._cancelling_unwatched: list[asyncio.Task[None]] = []
        self._trim: asyncio.TimerHandle | None = None
        self.running = 0
        #: Per-client run quotas, when the app counts them (see `quotas`).
        self.quotas: Quotas | None = None

    # -- looking up --------------------------------------------------------

    def here(self, run_id: str) -> Run | None:
        """A run this process executes, if it is one."""
        return self._runs.get(run_id)

    def runs_here(self) -> Iterable[Run]:
        return self._runs.values()

    async def get(self, run_id: str) -> Run | None:
        """A run by id: this process's own, or one another process runs."""
        run = self._runs.get(run_id)
        if run is not None:
            return run
        record = await self.cluster.record(run_id)
        if record is None:
            return None
        view = self.cluster.views.get(run_id) or Run.elsewhere(run_id, record)
        view.update(record)
        if view.state == "running":
            # Whoever looks at a run elsewhere may be the first to see that its
            # process died: then it is failed now, not left "running" forever.
            await self.cluster.fail_if_orphaned(view)
        return view

    # -- starting ----------------------------------------------------------

    async def start(
        self,
        stream: StreamFunction,
        params: dict[str, Any],
        *,
        attached: bool,
        sub: str = "",
        client: str = "",
    ) -> Run:
        """Start a run for the identity `sub`, counted against `client`'s quota
        (`OverQuota` past it). An attached run gets its first watcher at once,
        before any event."""
        if self.running >= self.settings.max_runs:
            raise TooManyRuns(f"{self.running} runs are running, the most this server allows")
        run = Run(
            id=secrets.token_hex(8),
            stream=stream.name,
            attached=attached,
            owner=self.instance,
            sub=sub,
            client=client,
        )
        if client and self.quotas is not None:
            await self.quotas.start_run(client, run.id)
        try:
            await self.cluster.register(run)
        except BaseException:
            await self._free_slot(run)
            raise
        self._runs[run.id] = run
        source = stream.open(params, self.settings)
        run.task = asyncio.get_running_loop().create_task(self._execute(run, source))
        self.running += 1
        metrics.run_started()
        return run

    # -- watching ----------------------------------------------------------

    def watch(self, run: Run, after_seq: int | None = None) -> Watcher:
        """Register a watcher. `after_seq` is where it starts, if known; by default
        the oldest retained event, so that nothing it may still read is trimmed."""
        if run.held_place is not None:
            # Somebody came back: its cursor replaces the one held for it.
            gone, timer = run.held_place
            timer.cancel()
            run.held_place = None
            run.cursors.pop(gone, None)
        key = next(self._keys)
        oldest = max(0, run.events - self.settings.run_history)
        run.cursors[key] = oldest if after_seq is None else max(after_seq, oldest)
        if not run.local:
            self.cluster.start_watching(run)
        watcher = run.watchers[key] = Watcher(self, run, key)
        return watcher

    def release(self, run: Run, key: int) -> None:
        """A watcher left: give up its place, or hold it a while for the last one."""
        run.watchers.pop(key, None)
        if key not in run.cursors:
            return
        if run.state != "running" or len(run.cursors) > 1 or not run.attached:
            del run.cursors[key]
            self._positions_changed(run)
            return
        # The last watcher of an attached run left. Hold its place for a
        # while: a dropped connection that resumes loses nothing.
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.settings.disconnect_grace, self._give_up_place, run, key)
        run.held_place = (key, timer)

    def cut(self, watcher: Watcher) -> None:
        """Disconnect a watcher that stalled the run for `stall_timeout`.

        Its place is given up at once, not held: the run goes on without it.
        The log keeps the history, so it may come back and resume from its
        last id (and hold the run again while it reads).
        """
        run = watcher.run
        logger.info(
            "run %s: a watcher read nothing for %ss while the run waited on it; disconnecting it",
            run.id,
            self.settings.stall_timeout,
        )
        watcher.stalled = True
        run.watchers.pop(watcher.key, None)
        run.cursors.pop(watcher.key, None)
        self._positions_changed(run)
        if watcher.on_stall is not None:
            watcher.on_stall()
        if run.attached and not run.cursors and run.held_place is None:
            # As for a last watcher that left: it has `disconnect_grace` to come back.
            loop = asyncio.get_running_loop()
            timer = loop.call_later(
                self.settings.disconnect_grace, self._give_up_place, run, watcher.key
            )
            run.held_place = (watcher.key, timer)

    def _give_up_place(self, run: Run, key: int) -> None:
        run.held_place = None
        run.cursors.pop(key, None)
        self._positions_changed(run)
        if run.local and not run.cursors and run.state == "running":
            task = asyncio.get_running_loop().create_task(self.cancel_if_unwatched(run))
            self._cancelling_unwatched = [t for t in self._cancelling_unwatched if not t.done()]
            self._cancelling_unwatched.append(task)

    def _positions_changed(self, run: Run) -> None:
        if run.local:
            run.progress.set()
        else:
            self.cluster.report_positions_soon(run)

    async def cancel_if_unwatched(self, run: Run) -> None:
        """No watcher here: cancel the run if none is left elsewhere either."""
        with contextlib.suppress(BrokerUnavailable):
            await self.cluster.read_remote_positions(run)
        if (
            not run.cursors
            and run.remote_low is None
            and run.state == "running"
            and self.settings.cancel_on_disconnect
        ):
            logger.info("run %s: no watcher left, cancelling", run.id)
            self.cancel_here(run)

    # -- cancelling --------------------------------------------------------

    async def cancel(self, run: Run) -> bool:
        """Stop a running run and wait until its generator's `finally` has run.

        False if it had already ended. A run elsewhere is asked through the
        broker, and this waits until its log ends; raises `CancelNotConfirmed`
        (a `BrokerUnavailable`) if it does not end in time.
        """
        if run.state != "running":
            return False
        if run.local:
            if not self.cancel_here(run):
                return False
            assert run.task is not None
            await asyncio.shield(run.task)
            return True
        await self.cluster.cancel_elsewhere(run)
        return True

    def cancel_here(self, run: Run) -> bool:
        """Cancel a run this process executes; False if it is not running."""
        if run.state != "running" or run.task is None or run.task.done():
            return False
        # Asked again (a repeated message, the record read at a tick) until
        # the generator is being closed, which a cancel must not cut short: a
        # cancel can be lost (inside redis-py on Python 3.11, see RedisBroker.aclose).
        if not run.closing:
            run.task.cancel()
        return True

    # -- running -----------------------------------------------------------

    def _behind(self, run: Run, low: int) -> bool:
        """Whether the slowest watcher is a full window behind: `run_window`
        events, or `run_history_bytes` bytes."""
        if run.events - low >= self.settings.run_window:
            return True
        unread = run.unread_bytes(low)
        return unread is None or unread >= self.settings.run_history_bytes

    def _room(self, run: Run) -> tuple[int, int]:
        """How many events, and bytes of data, the run may append at once: what
        its generator has ready, up to `BATCH`, and no further past the slowest
        watcher's window than one event (as when it appended one at a time)."""
        low = run.slowest_position()
        if low is None:
            return BATCH, self.settings.run_history_bytes
        unread = run.unread_bytes(low) or 0
        return (
            max(1, min(BATCH, self.settings.run_window - (run.events - low))),
            self.settings.run_history_bytes - unread,
        )

    async def _wait_for_watchers(self, run: Run) -> None:
        # Backpressure: wait while the slowest connected watcher, here or
        # elsewhere, is a full window behind, in events or bytes. With nobody
        # connected the run goes on; its log keeps the newest `run_history`
        # events (`run_history_bytes`) for whoever comes later. What a
        # watcher has not read is never trimmed by bytes (`keep_after`), and
        # the byte window keeps it within about `run_history_bytes`.
        window = self.settings.run_window
        stall = self.settings.stall_timeout
        blocked_since: float | None = None
        while True:
            if (
                time.monotonic() - run.remote_checked > REMOTE_REFRESH
                or run.events - run.remote_checked_at >= window // 2
            ):
                with contextlib.suppress(BrokerUnavailable):
                    await self.cluster.read_remote_positions(run)
            low = run.slowest_position()
            if low is None or not self._behind(run, low):
                return
            run.progress.clear()
            if run.cursors and min(run.cursors.values()) == low:
                # Held back by watchers here. One that delivers nothing for
                # `stall_timeout` while the run waits on it is cut: a client
                # that stopped reading must not hold a generator forever.
                now = time.monotonic()
                if blocked_since is None:
                    blocked_since = now
                due = None
                for watcher in list(run.watchers.values()):
                    position = run.cursors.get(watcher.key)
                    if position is None or not self._behind(run, position):
                        continue  # the run does not wait on this one
                    since = max(watcher.moved, blocked_since)
                    if now - since >= stall:
                        self.cut(watcher)
                    elif due is None or since + stall < due:
                        due = since + stall
                if run.progress.is_set():
                    continue
                if due is None:
                    await run.progress.wait()  # a held place: its own timer ends it
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(due - now):
                            await run.progress.wait()
            else:
                # Held back by a watcher in another process: look again soon.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(REMOTE_POLL):
                        await run.progress.wait()
                run.remote_checked = 0.0

    async def _append(self, run: Run, items: list[Item]) -> None:
        delay = 0.05
        cut_off = False
        # Events a connected watcher has not read are kept whatever the byte
        # budgets (watchers only move on, so this position is safe until the next append).
        retention = replace(self.retention, keep_after=run.slowest_position())
        while True:
            try:
                if cut_off and not await self.cluster.reclaim(run):
                    # Another process took the lease while the broker was
                    # away, and ended the run's log for everyone: stop quietly.
                    run.lost = True
                    self.cancel_here(run)
                    await asyncio.sleep(0)  # the cancel lands here
                    return
                # `expect`: an append that timed out may reach the broker all
                # the same (a Redis that hung runs it when it wakes, before or
                # after this try): whichever comes second finds the log longer
                # than expected and is not appended twice.
                appended = await self.broker.append(run.log, items, retention, expect=run.events)
                break
            except AppendConflict:
                # Another process took the run over while the broker was away
                # and wrote its log: stop quietly, as when the lease is lost.
                run.lost = True
                self.cancel_here(run)
                await asyncio.sleep(0)
                return
            except BrokerUnavailable:
                # The broker is down or hangs (Redis restarting, stopped):
                # the generator waits, as it would for a slow watcher, for as
                # long as it takes. Failing the run would lose it for a stall
                # of a few seconds; its lease may expire meanwhile, so it is
                # taken back before the next event (`reclaim`).
                cut_off = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        run.events += len(items)
        metrics.count_events("run", len(items))
        for event in appended:
            run.bytes += wire_size(event)
            run.offsets.append(run.bytes)
        while len(run.offsets) > self.settings.run_window:
            run.offsets.popleft()

    async def _execute(self, run: Run, source: Source) -> None:
        final: Item
        # Its blob files live on while it runs, however long (blobs.Kept).
        kept = self.blobs.kept(self.settings.run_history)
        try:
            try:
                produced = 0
                while True:
                    try:
                        items = await source.batch(*self._room(run))
                    except StopAsyncIteration:
                        break
                    ready: list[Item] = []
                    for item in items:
                        if isinstance(item, Pending):
                            # The items before it go before its blob is stored, as they came.
                            if ready:
                                await self._append(run, ready)
                                ready = []
                            item = (item.event, await self.blobs.dump(item.data, kept))
                        ready.append(item)
                    await self._append(run, ready)
                    produced += len(ready)
                    if produced >= BATCH:
                        # A generator that never awaits would hold the loop.
                        produced = 0
                        await asyncio.sleep(0)
                    await self._wait_for_watchers(run)
            finally:
                run.closing = True
                kept.close()
                await close(source)
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            run.state, final = "cancelled", (wire.CANCELLED, b"null")
        except Exception as exc:
            logger.exception("run %s of stream %r failed", run.id, run.stream)
            error = {"type": type(exc).__name__, "message": str(exc)}
            run.state, final = "failed", (wire.ERROR, dump_data(error))
        else:
            run.state, final = "finished", (wire.END, b"null")
        run.ended = time.time()
        self.running -= 1
        metrics.run_ended(run.state)
        await self._free_slot(run)
        loop = asyncio.get_running_loop()
        loop.call_later(self.settings.run_ttl, self._expire, run.id)
        if run.lost:
            return  # another process has ended its log already
        try:
            await self._append(run, [final])
            await self.cluster.publish_end(run)
            await self.broker.end(run.log)
        except BrokerUnavailable:
            logger.error("run %s ended (%s) but the broker is unreachable", run.id, run.state)

    async def _free_slot(self, run: Run) -> None:
        if run.client and self.quotas is not None:
            await self.quotas.end_run(run.client, run.id)

    def _expire(self, run_id: str) -> None:
        run = self._runs.pop(run_id, None)
        if run is not None:
            metrics.run_forgotten(run.state)
            asyncio.get_running_loop().create_task(self._forget(run))

    async def _forget(self, run: Run) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await self.broker.delete(run.log)
            await self.cluster.forget(run.id)
        if self._trim is None:
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._trim_heap)

    def _trim_heap(self) -> None:
        """Give the memory of forgotten runs back to the operating system."""
        self._trim = None
        trim()

    async def cancel_all(self) -> None:
        """Cancel every run running here and wait for them to wind up (their
        generators get `close_timeout` for their `finally`)."""
        tasks = [run.task for run in self._runs.values() if run.task and self.cancel_here(run)]
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.close_timeout + 1)

    async def aclose(self) -> None:
        """Cancel every run here and wait for them to wind up."""
        await self.cancel_all()
        self.cluster.aclose()
        for task in self._cancelling_unwatched:
            task.cancel()
        self._cancelling_unwatched = []
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
