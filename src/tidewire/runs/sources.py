"""Sources: a generator seen from the event loop, its items coming out encoded.

An async generator is iterated on the loop. A sync generator runs in a thread
of its own rather than in the shared thread pool: the original service's
`time.sleep` style then costs a thread per run, not a place in a queue of 40.
Closing either runs the generator's `finally` where it belongs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import types
from collections import deque
from collections.abc import Callable, Generator
from typing import Any, Protocol

from ..blobs import Pending
from .stream import Item, encode_item

__all__ = ["AsyncSource", "Source", "ThreadSource", "close"]

logger = logging.getLogger("tidewire")


class Source(Protocol):
    """A generator seen from the event loop: items come out already encoded."""

    def __aiter__(self) -> Source: ...
    async def __anext__(self) -> Item | Pending: ...
    async def batch(self, limit: int, max_bytes: int) -> list[Item | Pending]:
        """The next item, and after it up to `limit` in all that are ready now,
        without waiting, ending with the one whose data reaches `max_bytes`
        in all; `StopAsyncIteration` at the end."""
        ...

    async def aclose(self) -> None: ...


class AsyncSource:
    """An async generator, iterated on the loop.

    `batch` takes, after the next item, those the generator yields without
    suspending: it steps the generator's `__anext__` by hand, and one that
    suspends (awaits something not ready) is left paused there, to be
    awaited by the next call (`_resume`). A run then appends and watchers
    read those items together, at once, not one at a time (bench W1), while
    items that come apart in time still go out as each comes.
    """

    def __init__(self, agen: Any, inline_limit: int | None) -> None:
        self._agen = agen
        self._limit = inline_limit
        # The generator's `__anext__` paused at an await, and what it yielded there.
        self._paused: tuple[Any, Any] | None = None
        # What the generator (or encoding its item) raised after a batch's
        # first item: raised by the next call, once the items before it are in.
        self._raised: BaseException | None = None

    def __aiter__(self) -> AsyncSource:
        return self

    async def __anext__(self) -> Item | Pending:
        return (await self.batch(1, 0))[0]

    async def batch(self, limit: int, max_bytes: int) -> list[Item | Pending]:
        if self._raised is not None:
            raised, self._raised = self._raised, None
            raise raised
        if self._paused is not None:
            step, yielded = self._paused
            self._paused = None
            item = await _resume(step, yielded, None)
        else:
            item = await self._agen.__anext__()
        items = [encode_item(item, self._limit)]
        size = _size(items[0])
        while len(items) < limit and size < max_bytes:
            step = self._agen.__anext__()
            try:
                yielded = step.send(None)
            except StopIteration as ready:  # it yielded an item without suspending
                try:
                    items.append(encode_item(ready.value, self._limit))
                    size += _size(items[-1])
                except BaseException as exc:
                    self._raised = exc
                    break
            except BaseException as exc:  # it ended (StopAsyncIteration) or failed
                self._raised = exc
                break
            else:  # it awaits something: the items so far go now
                self._paused = (step, yielded)
                break
        return items

    async def aclose(self) -> None:
        if self._paused is not None:
            # Stopped while the generator awaits (the run was cancelled):
            # it is cancelled there, as it would be had the run awaited it.
            step, yielded = self._paused
            self._paused = None
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await _resume(step, yielded, asyncio.CancelledError())
        await self._agen.aclose()


def _size(item: Item | Pending) -> int:
    # What an item adds to a run's unread bytes, near enough (a pending
    # blob is stored as a file: its event is small).
    return len(item[1]) if isinstance(item, tuple) else 0


@types.coroutine
def _resume(step: Any, yielded: Any, throw: BaseException | None) -> Generator[Any, Any, Any]:
    """Await a generator's `__anext__` that was stepped by hand and paused at
    an await: what it yielded there goes to the task as though the task had
    stepped it (or `throw` goes in instead), and every later step is passed
    on, as `yield from` does."""
    try:
        if throw is not None:
            yielded = step.throw(throw)
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                step.close()
                raise
            except BaseException as exc:
                yielded = step.throw(exc)
            else:
                yielded = step.send(sent)
    except StopIteration as done:
        return done.value


class ThreadSource:
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

    def __aiter__(self) -> ThreadSource:
        return self

    async def __anext__(self) -> Item | Pending:
        return (await self.batch(1, 0))[0]

    async def batch(self, limit: int, max_bytes: int) -> list[Item | Pending]:
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
        ready = self._ready
        items = [ready.pop()]
        size = _size(items[0])
        while ready and len(items) < limit and size < max_bytes:
            items.append(ready.pop())
            size += _size(items[-1])
        return items

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


async def close(source: Source) -> None:
    """Close a source, finishing even when the caller is being cancelled."""
    # Cut short, the generator's `finally` would not run to its end.
    task = asyncio.ensure_future(source.aclose())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
