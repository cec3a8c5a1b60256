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
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pydantic

from .broker import Broker, Retention
from .config import Settings
from .events import Message, dump_data

__all__ = ["Run", "Runs", "Stream", "TooManyRuns"]

logger = logging.getLogger("tidewire")

RunState = Literal["running", "finished", "failed", "cancelled"]
Item = tuple[str, bytes]  # (event type, data JSON), ready for a log

#: Query parameters that belong to tidewire, not to a stream's generator.
RESERVED_PARAMS = frozenset({"detach", "after"})


class TooManyRuns(Exception):
    """`max_runs` runs are running already."""


def encode_item(item: Any) -> Item:
    if isinstance(item, Message):
        return item.event, dump_data(item.data)
    return "message", dump_data(item)


class Stream:
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
        if self.is_async:
            return _AsyncSource(self.func(**params))
        return _ThreadSource(self.func(**params), settings.close_timeout)


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
    async def __anext__(self) -> Item: ...
    async def aclose(self) -> None: ...


class _AsyncSource:
    def __init__(self, agen: Any) -> None:
        self._agen = agen

    def __aiter__(self) -> _AsyncSource:
        return self

    async def __anext__(self) -> Item:
        return encode_item(await self._agen.__anext__())

    async def aclose(self) -> None:
        await self._agen.aclose()


class _ThreadSource:
    """A sync generator run in a thread of its own, handing items to the loop in batches.

    The thread waits when `_max` items are pending (the loop side is slower);
    the loop side waits when none are. Closing stops the generator at its next
    `yield`, in its own thread, so its `finally` runs where it should.
    """

    _max = 64

    def __init__(self, gen: Generator[Any, None, None], close_timeout: float) -> None:
        self._gen = gen
        self._close_timeout = close_timeout
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._items: deque[Item] = deque()
        self._ready: list[Item] = []
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
                if not self._put(encode_item(item)):
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

    def _put(self, item: Item) -> bool:
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

    async def __anext__(self) -> Item:
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
    id: str
    stream: str
    attached: bool
    created: float = field(default_factory=time.time)
    state: RunState = "running"
    ended: float | None = None
    events: int = 0  # events appended so far, end/error/cancelled included
    # Positions (seq) of the watchers connected now, by watcher number; the
    # generator never gets more than `run_window` events ahead of the lowest.
    cursors: dict[int, int] = field(default_factory=dict)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    # The last watcher's place, kept for a while after it left, and the timer
    # that gives it up.
    linger: tuple[int, asyncio.TimerHandle] | None = None

    @property
    def log(self) -> str:
        return f"run:{self.id}"

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "stream": self.stream,
            "state": self.state,
            "events": self.events,
            "created": self.created,
            "ended": self.ended,
        }


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
            run.progress.set()

    def leave(self) -> None:
        self._runs.release(self.run, self.key)


class Runs:
    """The runs of this process: start, look up, watch, cancel."""

    def __init__(self, broker: Broker, settings: Settings) -> None:
        self.broker = broker
        self.settings = settings
        self.retention = Retention(settings.run_history)
        self._runs: dict[str, Run] = {}
        self._keys = itertools.count(1)
        self.running = 0

    def get(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    def start(self, stream: Stream, params: dict[str, Any], *, attached: bool) -> Run:
        """Start a run. An attached run gets its first watcher at once, before any event."""
        if self.running >= self.settings.max_runs:
            raise TooManyRuns(f"{self.running} runs are running, the most this server allows")
        run = Run(id=secrets.token_hex(8), stream=stream.name, attached=attached)
        self._runs[run.id] = run
        source = stream.open(params, self.settings)
        run.task = asyncio.get_running_loop().create_task(self._execute(run, source))
        self.running += 1
        return run

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
        return Watcher(self, run, key)

    def release(self, run: Run, key: int) -> None:
        """A watcher left: give up its place, or keep it a while for the last one."""
        if key not in run.cursors:
            return
        if run.state != "running" or len(run.cursors) > 1 or not run.attached:
            del run.cursors[key]
            run.progress.set()
            return
        # The last watcher of an attached run left. Keep its place for a
        # while: a dropped connection that resumes loses nothing.
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.settings.disconnect_grace, self._abandon, run, key)
        run.linger = (key, timer)

    def _abandon(self, run: Run, key: int) -> None:
        run.linger = None
        run.cursors.pop(key, None)
        run.progress.set()
        if not run.cursors and run.state == "running" and self.settings.cancel_on_disconnect:
            logger.info("run %s: no watcher left, cancelling", run.id)
            self.cancel(run)

    def cancel(self, run: Run) -> bool:
        """Ask a running run to stop; False if it had already ended."""
        if run.state != "running" or run.task is None or run.task.done():
            return False
        run.task.cancel()
        return True

    async def _room(self, run: Run) -> None:
        # Backpressure: wait while the slowest connected watcher is a full
        # window behind. With nobody connected the run goes on; its log keeps
        # the newest `run_history` events for whoever comes later.
        window = self.settings.run_window
        while run.cursors and run.events - min(run.cursors.values()) >= window:
            run.progress.clear()
            await run.progress.wait()

    async def _append(self, run: Run, items: list[Item]) -> None:
        await self.broker.append(run.log, items, self.retention)
        run.events += len(items)

    async def _execute(self, run: Run, source: _Source) -> None:
        final: Item
        try:
            try:
                produced = 0
                async for item in source:
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
        await self._append(run, [final])
        await self.broker.end(run.log)
        asyncio.get_running_loop().call_later(self.settings.run_ttl, self._expire, run.id)

    def _expire(self, run_id: str) -> None:
        run = self._runs.pop(run_id, None)
        if run is not None:
            asyncio.get_running_loop().create_task(self.broker.delete(run.log))

    async def aclose(self) -> None:
        """Cancel every run and wait for them to wind up."""
        tasks = [run.task for run in self._runs.values() if run.task and self.cancel(run)]
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.close_timeout + 1)


async def _close(source: _Source) -> None:
    # Closing must finish even when the run is being cancelled, or the
    # generator's `finally` would be cut short.
    task = asyncio.ensure_future(source.aclose())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
