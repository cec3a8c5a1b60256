"""Streams and runs.

A *stream* is a registered generator function; a *run* is one execution of
it, writing its events into a log that any number of watchers read.

Sync generators run each in a thread of their own rather than in the shared
thread pool: the original service's `time.sleep` style then costs a thread
per run, not a place in a queue of 40.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pydantic

from .blobs import Blobs, Pending
from .broker import Broker, BrokerUnavailable, Retention
from .config import Settings
from .events import LargeBlob, Message, depth_checked, dump_data
from .heap import trim

__all__ = ["Run", "Runs", "StreamFunction", "TooManyRuns"]

logger = logging.getLogger("tidewire")

RunState = Literal["running", "finished", "failed", "cancelled"]
Item = tuple[str, bytes]  # (event type, data JSON), ready for a log

#: Query parameters that belong to tidewire, not to a stream's generator.
RESERVED_PARAMS = frozenset({"detach", "after"})


#: Seconds from a run's expiry to the heap trim that returns its memory to
#: the operating system (see `heap`): expiries close together share one.
TRIM_DELAY = 1.0


class TooManyRuns(Exception):
    """`max_runs` runs are running already."""


def encode_item(item: Any, inline_limit: int | None = None) -> Item | Pending:
    """A yielded item, encoded; or `Pending` if a blob in it must be stored first."""
    event, data = (item.event, item.data) if isinstance(item, Message) else ("message", item)
    try:
        # Too deep to encode: the run ends with an `error` saying so.
        with depth_checked():
            return event, dump_data(data, inline_limit=inline_limit)
    except LargeBlob:
        return Pending(event, data)


class StreamFunction:
    """A generator function registered as a stream; its signature is its parameter schema."""

    def __init__(self, func: Callable[..., Any], name: str, description: str) -> None:
        if not (inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func)):
            raise TypeError(f"{func.__qualname__} must be a generator function (sync or async)")
        self.func = func
        self.name = name
        self.description = description
        self.is_async = inspect.isasyncgenfunction(func)
        self.params = _params_model(func, name)

    def schema(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "params": self.params.model_json_schema(),
        }

    def validate(self, values: dict[str, Any]) -> dict[str, Any]:
        """Check and convert parameters; raises `pydantic.ValidationError`."""
        model = self.params.model_validate(values)
        return {name: getattr(model, name) for name in type(model).model_fields}

    def open(self, params: dict[str, Any], settings: Settings) -> _Source:
        limit = settings.inline_blob_limit
        if self.is_async:
            return _AsyncSource(self.func(**params), limit)
        return _ThreadSource(self.func(**params), settings.close_timeout, limit)


def _params_model(func: Callable[..., Any], name: str) -> type[pydantic.BaseModel]:
    hints = inspect.get_annotations(func, eval_str=True)
    fields: dict[str, Any] = {}
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"stream {name!r}: parameter {param.name!r} must be a named parameter")
        if param.name in RESERVED_PARAMS:
            raise TypeError(f"stream {name!r}: parameter name {param.name!r} is reserved")
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
    config = pydantic.ConfigDict(extra="ignore")
    model: type[pydantic.BaseModel] = pydantic.create_model(
        f"{name}_params", __config__=config, **fields
    )
    return model


class _Source(Protocol):
    """A generator seen from the event loop: items come out already encoded."""

    def __aiter__(self) -> _Source: ...
    async def __anext__(self) -> Item | Pending: ...
    async def aclose(self) -> None: ...


class _AsyncSource:
    def __init__(self, agen: Any, inline_limit: int | None) -> None:
        self._agen = agen
        self._limit = inline_limit

    def __aiter__(self) -> _AsyncSource:
        return self

    async def __anext__(self) -> Item | Pending:
        return encode_item(await self._agen.__anext__(), self._limit)

    async def aclose(self) -> None:
        await self._agen.aclose()


class _ThreadSource:
    """A sync generator run in a thread of its own, handing items to the loop in batches.

    The thread waits when `_max` items are pending (the loop side is slower);
    the loop side waits when none are. Closing stops the generator at its next
    `yield`, in its own thread, so its `finally` runs where it should.
    """

    _max = 64

    def __init__(
        self, gen: Generator[Any, None, None], close_timeout: float, inline_limit: int | None
    ) -> None:
        self._gen = gen
        self._limit = inline_limit
        self._close_timeout = close_timeout
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._items: deque[Item | Pending] = deque()
        self._ready: list[Item | Pending] = []
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: BaseException | None = None
        self._closing = False
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="tidewire-generator", daemon=True)
        self._thread.start()

    # -- in the generator's thread --------------------------------------

    def _run(self) -> None:
        try:
            for item in self._gen:
                if not self._put(encode_item(item, self._limit)):
                    break
        except BaseException as exc:
            self._error = exc
        finally:
            # A generator left at a yield (cancelled, or its item could not be
            # encoded) gets GeneratorExit there, so its `finally` runs now.
            try:
                self._gen.close()
            except BaseException as exc:
                self._error = self._error or exc
            with self._lock:
                self._done = True
                self._wake()
            self._call(_resolve, self._exited)

    def _put(self, item: Item | Pending) -> bool:
        with self._not_full:
            while len(self._items) >= self._max and not self._closing:
                self._not_full.wait()
            if self._closing:
                return False
            self._items.append(item)
            self._wake()
            return True

    def _wake(self) -> None:
        # Called with the lock held; one wake-up per wait, not per item.
        if self._waiter is not None:
            self._call(_resolve, self._waiter)
            self._waiter = None

    def _call(
        self, callback: Callable[[asyncio.Future[None]], None], arg: asyncio.Future[None]
    ) -> None:
        # A closed loop means the server stopped: nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, arg)

    # -- on the event loop ----------------------------------------------

    def __aiter__(self) -> _ThreadSource:
        return self

    async def __anext__(self) -> Item | Pending:
        while not self._ready:
            with self._lock:
                if self._items:
                    self._ready = list(self._items)
                    self._ready.reverse()  # pop() from the end is O(1)
                    self._items.clear()
                    self._not_full.notify()
                    break
                if self._done:
                    if self._error is not None:
                        raise self._error
                    raise StopAsyncIteration
                waiter = self._waiter = self._loop.create_future()
            await waiter
        return self._ready.pop()

    async def aclose(self) -> None:
        with self._lock:
            self._closing = True
            self._not_full.notify()
        # A generator inside time.sleep cannot be interrupted; give it a while,
        # then let it finish on its own (it stops at its next yield).
        try:
            async with asyncio.timeout(self._close_timeout):
                await asyncio.shield(self._exited)
        except TimeoutError:
            logger.warning("generator still running %.1fs after close", self._close_timeout)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass(eq=False)
class Run:
    """A run, as this process knows it: its own (`local`), or one running elsewhere."""

    id: str
    stream: str
    attached: bool
    owner: str  # the instance (process) that runs the generator
    local: bool = True
    created: float = field(default_factory=time.time)
    state: RunState = "running"
    ended: float | None = None
    events: int = 0  # events appended so far, end/error/cancelled included
    # Positions (seq) of the watchers connected to this process now, by
    # watcher number; a generator never gets more than `run_window` events
    # ahead of the lowest here or in any other process.
    cursors: dict[int, int] = field(default_factory=dict)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    # The last watcher's place, kept for a while after it left, and the timer
    # that gives it up.
    linger: tuple[int, asyncio.TimerHandle] | None = None
    # A local run: the lowest position of watchers in other processes, and
    # when it was last read (monotonic); `events` when it was read.
    remote_low: int | None = None
    remote_checked: float = 0.0
    remote_checked_at: int = 0
    # A local run whose lease another process took: it must stop, quietly.
    lost: bool = False
    # A run elsewhere: the position this process last told the others.
    told: int = -1

    @property
    def log(self) -> str:
        return f"run:{self.id}"

    def low(self) -> int | None:
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

    def advance(self, seq: int) -> None:
        run = self.run
        if seq > run.cursors.get(self.key, 0):
            run.cursors[self.key] = seq
            if run.local:
                run.progress.set()
            elif seq - run.told >= self._runs.tell_step:
                self._runs.tell_soon(run)

    async def idle(self) -> None:
        """Nothing came for a while: is the run's process still alive?"""
        if not self.run.local:
            await self._runs.check_owner(self.run)

    def leave(self) -> None:
        self._runs.release(self.run, self.key)


_RUN_ID = re.compile(r"[0-9a-f]{16}\Z")

#: How often (seconds) a blocked generator looks again at where watchers in
#: other processes are, and how stale that may be before it looks anyway.
REMOTE_POLL = 0.05
REMOTE_REFRESH = 0.1


class Runs:
    """Runs: started here, or elsewhere and watched or cancelled from here.

    Every process has an `instance` name. A run's record (`run:<id>`) says
    which instance owns it; the owner holds a lease (`runlease:<id>`) that it
    renews every `lease / 3` seconds. Watchers in other processes tell the
    owner how far they are (`runpos:<id>`, one field per process), which is
    what backpressure needs; and a watcher that finds the lease expired takes
    it and ends the run with an `error`, so that nobody waits forever for a
    process that died. With the memory broker, all of this stays in this one
    process and costs a few dictionary lookups.
    """

    def __init__(self, broker: Broker, settings: Settings, blobs: Blobs) -> None:
        self.broker = broker
        self.settings = settings
        self.blobs = blobs
        self.retention = Retention(settings.run_history)
        self.instance = secrets.token_hex(6)
        self.tell_step = max(1, settings.run_window // 4)
        self._runs: dict[str, Run] = {}
        self._views: dict[str, Run] = {}  # runs elsewhere with watchers here
        self._keys = itertools.count(1)
        self._background: list[asyncio.Task[None]] = []
        self._telling: set[str] = set()
        self._trim: asyncio.TimerHandle | None = None
        self.running = 0

    # -- looking up --------------------------------------------------------

    def here(self, run_id: str) -> Run | None:
        """A run this process executes, if it is one."""
        return self._runs.get(run_id)

    async def get(self, run_id: str) -> Run | None:
        """A run by id: this process's own, or one another process runs."""
        run = self._runs.get(run_id)
        if run is not None:
            return run
        if not _RUN_ID.match(run_id):
            return None
        record = await self.broker.get_state(f"run:{run_id}")
        if not record:
            return None
        view = self._views.get(run_id)
        if view is None:
            view = Run(
                id=run_id,
                stream=record["stream"],
                attached=bool(record["attached"]),
                owner=record["owner"],
                local=False,
                created=float(record["created"]),
            )
        view.update(record)
        if view.state == "running":
            # Whoever looks at a run elsewhere may be the first to see that its
            # process died: then it is failed now, not left "running" forever.
            await self._fail_if_orphaned(view)
        return view

    # -- starting ----------------------------------------------------------

    async def start(self, stream: StreamFunction, params: dict[str, Any], *, attached: bool) -> Run:
        """Start a run. An attached run gets its first watcher at once, before any event."""
        if self.running >= self.settings.max_runs:
            raise TooManyRuns(f"{self.running} runs are running, the most this server allows")
        self._start_background()
        run = Run(
            id=secrets.token_hex(8), stream=stream.name, attached=attached, owner=self.instance
        )
        # Lease and record first: a watcher elsewhere may look it up at once.
        await self.broker.claim(f"runlease:{run.id}", self.instance, self.settings.lease)
        await self.broker.put_state(f"run:{run.id}", run.record())
        self._runs[run.id] = run
        source = stream.open(params, self.settings)
        run.task = asyncio.get_running_loop().create_task(self._execute(run, source))
        self.running += 1
        return run

    # -- watching ----------------------------------------------------------

    def watch(self, run: Run, after_seq: int | None = None) -> Watcher:
        """Register a watcher. `after_seq` is where it starts, if known; by default
        the oldest retained event, so that nothing it may still read is trimmed."""
        if run.linger is not None:
            # Somebody came back: its cursor replaces the one kept for it.
            gone, timer = run.linger
            timer.cancel()
            run.linger = None
            run.cursors.pop(gone, None)
        key = next(self._keys)
        oldest = max(0, run.events - self.settings.run_history)
        run.cursors[key] = oldest if after_seq is None else max(after_seq, oldest)
        if not run.local:
            # Told now, and again every tick (by the background task) for as
            # long as it watches, even while it reads nothing at all.
            self._start_background()
            self._views[run.id] = run
            run.told = -1
            self.tell_soon(run)
        return Watcher(self, run, key)

    def release(self, run: Run, key: int) -> None:
        """A watcher left: give up its place, or keep it a while for the last one."""
        if key not in run.cursors:
            return
        if run.state != "running" or len(run.cursors) > 1 or not run.attached:
            del run.cursors[key]
            self._moved(run)
            return
        # The last watcher of an attached run left. Keep its place for a
        # while: a dropped connection that resumes loses nothing.
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.settings.disconnect_grace, self._abandon, run, key)
        run.linger = (key, timer)

    def _abandon(self, run: Run, key: int) -> None:
        run.linger = None
        run.cursors.pop(key, None)
        self._moved(run)
        if run.local and not run.cursors and run.state == "running":
            self._background.append(asyncio.get_running_loop().create_task(self._orphaned(run)))

    def _moved(self, run: Run) -> None:
        if run.local:
            run.progress.set()
        else:
            self.tell_soon(run)

    async def _orphaned(self, run: Run) -> None:
        # No watcher here; cancel only if none is left elsewhere either.
        with contextlib.suppress(BrokerUnavailable):
            await self._refresh_remote(run)
        if (
            not run.cursors
            and run.remote_low is None
            and run.state == "running"
            and self.settings.cancel_on_disconnect
        ):
            logger.info("run %s: no watcher left, cancelling", run.id)
            self._cancel_here(run)

    def tell_soon(self, run: Run) -> None:
        """Tell the run's owner where this process's watchers are, in the background."""
        if run.id not in self._telling:
            self._telling.add(run.id)
            asyncio.get_running_loop().create_task(self._tell(run))

    async def _tell(self, run: Run) -> None:
        try:
            key = f"runpos:{run.id}"
            if run.cursors and run.state == "running":
                low = min(run.cursors.values())
                # A lingering place is kept as long as the grace period; a
                # live one until the next ticks have renewed it, with margin
                # for a loop that runs late (at least 2 s).
                keep = self.settings.disconnect_grace if run.linger else max(3 * self._tick, 2.0)
                run.told = low
                value = f"{low} {time.time() + keep!r}"
                await self.broker.put_state(key, {self.instance: value}, self.settings.run_ttl)
            else:
                await self.broker.delete_state(key, self.instance)
                if not run.cursors:
                    self._views.pop(run.id, None)
        except BrokerUnavailable:
            pass  # told again at the next tick
        finally:
            self._telling.discard(run.id)

    async def _refresh_remote(self, run: Run) -> None:
        positions = await self.broker.get_state(f"runpos:{run.id}")
        now = time.time()
        low = None
        for instance, value in positions.items():
            seq, _, until = value.partition(" ")
            if instance != self.instance and float(until) > now:
                low = int(seq) if low is None else min(low, int(seq))
        run.remote_low = low
        run.remote_checked = time.monotonic()
        run.remote_checked_at = run.events

    async def _refresh(self, run: Run) -> bool:
        """Bring a run's state up to date from its shared record; False if it has none."""
        record = await self.broker.get_state(f"run:{run.id}")
        if record:
            run.update(record)
        return bool(record)

    async def check_owner(self, run: Run) -> None:
        """Fail a run whose owner stopped renewing its lease: it died."""
        if await self._refresh(run):
            await self._fail_if_orphaned(run)

    async def _fail_if_orphaned(self, run: Run) -> None:
        if run.state != "running":
            return
        # Whoever takes the expired lease reports the death, exactly once.
        if not await self.broker.claim(f"runlease:{run.id}", self.instance, self.settings.lease):
            return
        logger.warning("run %s: its process %s stopped; failing it", run.id, run.owner)
        error = {
            "type": "WorkerLost",
            "message": f"the process running this run stopped (no sign of life "
            f"for {self.settings.lease:g}s)",
        }
        run.state, run.ended = "failed", time.time()
        await self.broker.append(run.log, [("error", dump_data(error))], self.retention)
        # The record before the end of the log: whoever sees the end (a
        # cancel waiting elsewhere) then reads the final state.
        await self.broker.put_state(
            f"run:{run.id}", {"state": run.state, "ended": repr(run.ended)}, self.settings.run_ttl
        )
        await self.broker.end(run.log)

    # -- cancelling --------------------------------------------------------

    async def cancel(self, run: Run) -> bool:
        """Stop a running run and wait until its generator's `finally` has run.

        False if it had already ended. A run elsewhere is asked through the
        broker, and this waits until its log ends.
        """
        if run.state != "running":
            return False
        if run.local:
            if not self._cancel_here(run):
                return False
            assert run.task is not None
            await asyncio.shield(run.task)
            return True
        await self.broker.send(f"control:{run.owner}", f"cancel {run.id}")
        position = "0"
        deadline = time.monotonic() + self.settings.close_timeout + self.settings.lease
        while (left := deadline - time.monotonic()) > 0:
            batch = await self.broker.read(run.log, position, limit=1024, timeout=left)
            if batch.events:
                position = batch.events[-1].id
            if batch.ended:
                break
        await self._refresh(run)
        return True

    def _cancel_here(self, run: Run) -> bool:
        if run.state != "running" or run.task is None or run.task.done():
            return False
        run.task.cancel()
        return True

    # -- running -----------------------------------------------------------

    async def _room(self, run: Run) -> None:
        # Backpressure: wait while the slowest connected watcher, here or
        # elsewhere, is a full window behind. With nobody connected the run
        # goes on; its log keeps the newest `run_history` events for whoever
        # comes later.
        window = self.settings.run_window
        while True:
            if (
                time.monotonic() - run.remote_checked > REMOTE_REFRESH
                or run.events - run.remote_checked_at >= window // 2
            ):
                with contextlib.suppress(BrokerUnavailable):
                    await self._refresh_remote(run)
            low = run.low()
            if low is None or run.events - low < window:
                return
            run.progress.clear()
            if run.cursors and min(run.cursors.values()) == low:
                await run.progress.wait()
            else:
                # Held back by a watcher in another process: look again soon.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(REMOTE_POLL):
                        await run.progress.wait()
                run.remote_checked = 0.0

    async def _append(self, run: Run, items: list[Item]) -> None:
        delay = 0.05
        deadline = time.monotonic() + self.settings.lease
        while True:
            try:
                await self.broker.append(run.log, items, self.retention)
                break
            except BrokerUnavailable:
                # The broker is down for a moment (Redis restarting): the
                # generator waits, as it would for a slow watcher.
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        run.events += len(items)

    async def _execute(self, run: Run, source: _Source) -> None:
        final: Item
        try:
            try:
                produced = 0
                async for item in source:
                    if isinstance(item, Pending):
                        item = (item.event, await self.blobs.dump(item.data))
                    await self._append(run, [item])
                    produced += 1
                    if produced % 64 == 0:
                        # A generator that never awaits would hold the loop.
                        await asyncio.sleep(0)
                    await self._room(run)
            finally:
                await _close(source)
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            run.state, final = "cancelled", ("cancelled", b"null")
        except Exception as exc:
            logger.exception("run %s of stream %r failed", run.id, run.stream)
            error = {"type": type(exc).__name__, "message": str(exc)}
            run.state, final = "failed", ("error", dump_data(error))
        else:
            run.state, final = "finished", ("end", b"null")
        run.ended = time.time()
        self.running -= 1
        loop = asyncio.get_running_loop()
        loop.call_later(self.settings.run_ttl, self._expire, run.id)
        if run.lost:
            return  # another process has ended its log already
        try:
            await self._append(run, [final])
            # The record before the end of the log, as in _fail_if_orphaned.
            await self.broker.put_state(f"run:{run.id}", run.record(), self.settings.run_ttl)
            await self.broker.end(run.log)
        except BrokerUnavailable:
            logger.error("run %s ended (%s) but the broker is unreachable", run.id, run.state)

    def _expire(self, run_id: str) -> None:
        run = self._runs.pop(run_id, None)
        if run is not None:
            asyncio.get_running_loop().create_task(self._forget(run))

    async def _forget(self, run: Run) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await self.broker.delete(run.log)
            await self.broker.delete_state(f"run:{run.id}")
            await self.broker.delete_state(f"runpos:{run.id}")
        if self._trim is None:
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._trim_heap)

    def _trim_heap(self) -> None:
        """Give the memory of forgotten runs back to the operating system."""
        self._trim = None
        trim()

    # -- in the background ---------------------------------------------------

    @property
    def _tick(self) -> float:
        return self.settings.lease / 3

    def _start_background(self) -> None:
        if not self._background:
            loop = asyncio.get_running_loop()
            self._background = [
                loop.create_task(self._renew_forever()),
                loop.create_task(self._obey_forever()),
            ]

    async def _renew_forever(self) -> None:
        """Renew the leases of the runs here, and tell where the watchers here are."""
        while True:
            await asyncio.sleep(self._tick)
            try:
                await self._renew()
            except BrokerUnavailable:
                logger.warning("broker unreachable: leases not renewed")
            except Exception:
                logger.exception("renewing leases failed")

    async def _renew(self) -> None:
        for run in list(self._runs.values()):
            if run.state != "running" or run.lost:
                continue
            if not await self.broker.claim(
                f"runlease:{run.id}", self.instance, self.settings.lease
            ):
                # Another process declared this one dead (it was cut off
                # for longer than the lease): the run is over for everyone.
                logger.error("run %s: lease lost to another process; stopping it", run.id)
                run.lost = True
                self._cancel_here(run)
                continue
            await self.broker.put_state(f"run:{run.id}", {"events": str(run.events)})
            if run.attached and not run.cursors and run.linger is None:
                # Watched only from elsewhere, if at all.
                await self._orphaned(run)
        for view in list(self._views.values()):
            await self._tell(view)

    async def _obey_forever(self) -> None:
        """Carry out what other processes ask of the runs here (cancel)."""
        delay = 0.1
        while True:
            try:
                async for message in self.broker.listen(f"control:{self.instance}"):
                    delay = 0.1
                    verb, _, run_id = message.partition(" ")
                    run = self._runs.get(run_id)
                    if verb == "cancel" and run is not None:
                        self._cancel_here(run)
            except BrokerUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def aclose(self) -> None:
        """Cancel every run here and wait for them to wind up."""
        tasks = [run.task for run in self._runs.values() if run.task and self._cancel_here(run)]
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.close_timeout + 1)
        for task in self._background:
            task.cancel()
        self._background = []
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None


async def _close(source: _Source) -> None:
    # Closing must finish even when the run is being cancelled, or the
    # generator's `finally` would be cut short.
    task = asyncio.ensure_future(source.aclose())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
