"""Moving a request's chunks into storage in large blocks, one block in flight.

uvicorn hands a body over in ~64 KiB chunks. Writing (and hashing) each one
in a worker thread would cost a thread hop per chunk; writing them on the
loop would stall it. So chunks are gathered into blocks of about 1 MiB (a
part, on S3) and each block is written while the next one gathers: the
network and the disk overlap, memory stays at about two blocks, and the
loop hops to a thread once per block.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, TypeVar

from . import TooLarge

__all__ = ["BLOCK", "Pump", "Sink", "finish", "too_large", "uninterrupted"]

BLOCK = 1 << 20

T = TypeVar("T")


class Pump:
    """Copies chunks to `write` in blocks of at least `block` bytes (the last may be smaller).

    `write(parts, last)` gets a block as the chunks it is made of; `last` is
    true for the final, possibly short, block of the run.
    """

    def __init__(
        self,
        write: Callable[[list[bytes], bool], Awaitable[None]],
        *,
        block: int = BLOCK,
        limit: int | None = None,
        over: Callable[[], Exception] | None = None,
    ) -> None:
        self._write = write
        self._block = block
        self._limit = limit
        self._over = over
        #: Bytes received from the chunks so far.
        self.size = 0
        #: Whether the chunks failed but every byte they gave was written.
        self.kept = False

    async def run(self, chunks: AsyncIterable[bytes], *, keep: bool = False) -> int:
        """Copy `chunks`; returns the number of bytes.

        More than `limit` bytes raise `over()` before the excess is written.
        If `chunks` itself raises (the client went away) and `keep` is true,
        what did arrive is written first; then the error goes on.
        """
        parts: list[bytes] = []
        gathered = 0
        inflight: asyncio.Future[None] | None = None

        async def flush() -> None:
            # The last block (if any) after the one in flight, then wait for both.
            nonlocal inflight
            if parts:
                if inflight is not None:
                    await inflight
                inflight = asyncio.ensure_future(self._write(parts, True))
            if inflight is not None:
                await inflight

        iterator = aiter(chunks)
        try:
            while True:
                try:
                    chunk = await anext(iterator)
                except StopAsyncIteration:
                    break
                except BaseException:
                    if keep:
                        await flush()
                        self.kept = True
                    raise
                if not chunk:
                    continue
                self.size += len(chunk)
                if self._limit is not None and self.size > self._limit:
                    raise (self._over or OverflowError)()
                parts.append(chunk)
                gathered += len(chunk)
                if gathered >= self._block:
                    if inflight is not None:
                        await inflight
                    inflight = asyncio.ensure_future(self._write(parts, False))
                    parts, gathered = [], 0
            await flush()
            return self.size
        except BaseException:
            if inflight is not None and not inflight.done():
                inflight.cancel()
                # Let it unwind (an S3 request is aborted); its own error,
                # if any, is not the one to report.
                with contextlib.suppress(BaseException):
                    await asyncio.wait([inflight])
            raise


def too_large(limit: int | None) -> Callable[[], Exception]:
    """A `Pump`'s `over` for at most `limit` bytes (a file's size limit, an upload's length)."""
    return lambda: TooLarge(f"more than {limit} bytes", limit or 0)


class Sink:
    """Blocks hashed and written by a worker thread: subclasses say where (`put`).

    Once `stop` returns no write is under way and none will start, even one
    whose thread had not begun yet when its task was cancelled; so a failed
    copy can be rolled back safely.
    """

    def __init__(self, hashers: list[Any]) -> None:
        self.hashers = hashers
        self._lock = threading.Lock()
        self._stopped = False

    def put(self, parts: list[bytes]) -> None:
        """Store a block, given as the chunks it is made of, in order."""
        raise NotImplementedError

    def stop(self) -> None:
        with self._lock:
            self._stopped = True

    async def awrite(self, parts: list[bytes], last: bool = False) -> None:
        # Hashed and written by one thread, one hop per block: on the one
        # core a server gets, two threads (one hashing, one writing) cost
        # a second hop and its wake-ups per block and bought nothing (bench
        # W6, pinned). It finishes even if this is cancelled, so that a
        # block is never hashed without being written (or the reverse)
        # unless `stop` said so.
        loop = asyncio.get_running_loop()
        await uninterrupted(loop.run_in_executor(None, self._put, parts))

    def _put(self, parts: list[bytes]) -> None:
        with self._lock:
            if self._stopped:
                return
            # The chunks as they came, not joined: a join is a copy of every byte.
            for hasher in self.hashers:
                for part in parts:
                    hasher.update(part)
            self.put(parts)


async def finish(cleanup: Callable[..., Any], *args: Any) -> None:
    """Run `cleanup(*args)` in a thread and wait for its end, even through a cancellation.

    A rollback left halfway would be worse than one that ends a moment late
    (a block landing after a truncation, a descriptor closed under a write),
    so a cancellation that arrives meanwhile is passed on once it is done.
    """
    await uninterrupted(asyncio.to_thread(cleanup, *args))


async def uninterrupted(work: Awaitable[T]) -> T:
    """Await `work` to its end; a cancellation meanwhile is raised afterwards."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result
