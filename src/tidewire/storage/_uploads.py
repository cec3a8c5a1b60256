"""The one resumable-upload algorithm (tus), over a small backend protocol.

`Uploads` validates and decides, for every storage: the offset check, the
size limit, the checksum and the rollback it asks for, keeping what arrived
when the client went away, the running sha256, pushing the expiry forward,
and when the upload becomes a file. A backend only stores, as a tusd data
store does under tusd's handler; so a tus bug is fixed here, once.

LocalStorage and S3Storage are `Uploads`: they get `create_upload`,
`upload`, `append` and `abort` from it, and give it these (its abstract
methods, the backend protocol):

    lock_upload(id)            async context: every other append, abort and
                               expiry of this upload waits (in other processes
                               too, where the backend can see them)
    load_upload(id)            (state, offset): the state as stored, expired or
                               not, and how many bytes are stored (the length
                               once finished); `UploadNotFound` if there is none
    start_upload(state)        store a new upload of no bytes, or nothing at all
    write_upload(state, offset, hashers)
                               async context: a `Writer` of bytes from `offset`
    save_upload(state)         store the state (after an append)
    complete_upload(state, sha256)
                               turn the stored bytes into a listed file; returns
                               its id. sha256 None: this process has not seen
                               every byte, so the backend hashes them again
    remove_upload(state)       forget an upload and its bytes (a file it became
                               stays)

    Writer
      block                    how many bytes one write should carry
      head                     bytes already stored (and hashed) that go again
                               in front of this append's, to be gathered into
                               its first block (S3: a tail too short for a part)
      write(parts, last)       store a block after the last one, and feed every
                               hasher its bytes but those of `head` (where they
                               are written, in worker threads: storage/_blocks.py)
      rollback()               the append failed: back to the offset it began at
      keep() -> int            what was written stays; the upload's offset now

The state is a JSON-able dict. `Uploads` makes and reads the keys of
`new_state`; a backend may add keys of its own (S3: the multipart upload's
parts) and keeps them through these calls.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from . import BadChecksum, OffsetMismatch, Upload, UploadNotFound, new_id, valid_id
from ._blocks import Pump, too_large, uninterrupted

__all__ = ["Hashers", "KeyedLocks", "State", "Uploads", "Writer"]

State = dict[str, Any]
#: hashlib objects, each to be fed every byte an append writes.
Hashers = list[Any]


class Writer(Protocol):
    block: int
    head: bytes

    async def write(self, parts: list[bytes], last: bool) -> None: ...

    async def rollback(self) -> None: ...

    async def keep(self) -> int: ...


class Uploads(abc.ABC):
    """`Storage`'s resumable-upload methods, over what a subclass stores (`UploadBackend`)."""

    def __init__(self) -> None:
        # The sha256 of each upload appended to by this process, with the
        # offset it has hashed up to: it goes on while the offsets line up.
        self._hashes: dict[str, tuple[int, Any]] = {}

    # -- what a backend does (see the module's docstring) ----------------

    @abc.abstractmethod
    def lock_upload(self, id: str) -> AbstractAsyncContextManager[None]: ...

    @abc.abstractmethod
    async def load_upload(self, id: str) -> tuple[State, int]: ...

    @abc.abstractmethod
    async def start_upload(self, state: State) -> None: ...

    @abc.abstractmethod
    def write_upload(
        self, state: State, offset: int, hashers: Hashers
    ) -> AbstractAsyncContextManager[Writer]: ...

    @abc.abstractmethod
    async def save_upload(self, state: State) -> None: ...

    @abc.abstractmethod
    async def complete_upload(self, state: State, sha256: str | None) -> str: ...

    @abc.abstractmethod
    async def remove_upload(self, state: State) -> None: ...

    # -- the algorithm ---------------------------------------------------

    async def create_upload(
        self,
        *,
        length: int,
        name: str,
        type: str,
        metadata: str,
        expires: float,
        owner: str | None = None,
    ) -> Upload:
        if length < 0:
            raise ValueError("length must not be negative")
        state = new_state(length=length, name=name, type=type, metadata=metadata, expires=expires)
        state["owner"] = owner
        await self.start_upload(state)
        if length == 0:
            # Nothing to wait for: it is a file already.
            try:
                return await self.append(state["id"], 0, _nothing())
            except BaseException:
                # Nobody learns this upload's id: nothing may stay behind.
                with contextlib.suppress(Exception):
                    await uninterrupted(self.remove_upload(state))
                raise
        return upload_of(state, 0)

    async def upload(self, id: str) -> Upload:
        state, offset = await self._load(id)
        return upload_of(state, offset)

    async def append(
        self,
        id: str,
        offset: int,
        chunks: AsyncIterable[bytes],
        *,
        checksum: tuple[str, bytes] | None = None,
    ) -> Upload:
        if not valid_id(id):
            raise UploadNotFound(id)
        check = hashlib.new(checksum[0]) if checksum else None
        async with self.lock_upload(id):
            state, current = await self._load(id)
            length: int = state["length"]
            if offset != current:
                raise OffsetMismatch(f"the upload is at offset {current}", current)
            if state["file"] is not None:
                # Finished: there is nothing left to append.
                async for chunk in chunks:
                    if chunk:
                        raise too_large(length)()
                return upload_of(state, length)

            whole = self._whole_hash(id, offset)
            backup = whole.copy() if whole is not None else None
            hashers = [h for h in (whole, check) if h is not None]
            failure: BaseException | None = None
            async with self.write_upload(state, offset, hashers) as writer:
                head = writer.head
                pump = Pump(
                    writer.write,
                    block=writer.block,
                    limit=length - offset + len(head),
                    over=too_large(length),
                )
                try:
                    await pump.run(_prepend(head, chunks), keep=check is None)
                    if check is not None and checksum and check.digest() != checksum[1]:
                        raise BadChecksum(f"the {checksum[0]} of the appended bytes differs")
                except BaseException as exc:
                    if not pump.kept:
                        await writer.rollback()
                        if backup is not None:
                            self._hashes[id] = (offset, backup)
                        raise
                    # The client went away: what did arrive stays, to resume from.
                    failure = exc
                offset = await writer.keep()
            state["expires"] = time.time() + state["ttl"]
            if whole is not None:
                self._hashes[id] = (offset, whole)
            if offset == length:
                sha256 = whole.hexdigest() if whole is not None else None
                state["file"] = await self.complete_upload(state, sha256)
                self._hashes.pop(id, None)
            await self.save_upload(state)
            if failure is not None:
                raise failure
            return upload_of(state, offset)

    async def abort(self, id: str) -> None:
        if not valid_id(id):
            raise UploadNotFound(id)
        async with self.lock_upload(id):
            state, _ = await self._load(id)
            await self.remove_upload(state)
            self.forget_upload(id)

    def forget_upload(self, id: str) -> None:
        """Drop what this process keeps of an upload that the backend removed (by `expire`)."""
        self._hashes.pop(id, None)

    async def _load(self, id: str) -> tuple[State, int]:
        if not valid_id(id):
            raise UploadNotFound(id)
        state, offset = await self.load_upload(id)
        if expired(state):
            raise UploadNotFound(id)
        return state, offset

    def _whole_hash(self, id: str, offset: int) -> Any:
        """The running sha256 of the upload, if this process has seen all of its bytes."""
        hashed, sha = self._hashes.pop(id, (-1, None))
        if hashed == offset:
            return sha
        return hashlib.sha256() if offset == 0 else None


def new_state(*, length: int, name: str, type: str, metadata: str, expires: float) -> State:
    now = time.time()
    return {
        "id": new_id(now),
        "length": length,
        "name": name,
        "type": type,
        "metadata": metadata,
        "created": now,
        "expires": expires,
        # Each append pushes `expires` this far ahead, so an upload in
        # progress does not expire midway.
        "ttl": max(expires - now, 0.0),
        "file": None,
        "extra": {},
    }


def expired(state: State, now: float | None = None) -> bool:
    return bool(state["expires"] <= (time.time() if now is None else now))


def upload_of(state: State, offset: int) -> Upload:
    return Upload(
        id=state["id"],
        length=state["length"],
        offset=offset,
        name=state["name"],
        type=state["type"],
        metadata=state["metadata"],
        created=state["created"],
        expires=state["expires"],
        file=state["file"],
        extra=state["extra"],
        # States written before uploads had owners have none.
        owner=state.get("owner"),
    )


class KeyedLocks:
    """An asyncio.Lock per key, forgotten when nobody holds or awaits it.

    A backend's `lock_upload` within one process.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


async def _prepend(first: bytes, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in chunks:
        yield chunk


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield
