"""The resumable-upload algorithm (storage/_memory.py) over a backend that keeps all in memory.

The contract suite (test_storage.py) runs it through the real storages; here
the backend is as small as the protocol lets one be, and records what the
algorithm asked of it.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import pytest

from tidewire.storage import (
    BadChecksum,
    OffsetMismatch,
    TooLarge,
    UploadNotFound,
    new_id,
)
from tidewire.storage._uploads import Hashers, KeyedLocks, State, Uploads, Writer

from .test_storage import chunks, failing

T = TypeVar("T")
HOUR = 3600.0


class MemoryWriter:
    block = 4
    head = b""

    def __init__(self, data: bytearray, offset: int, hashers: Hashers) -> None:
        self.data, self.offset, self.hashers = data, offset, hashers

    async def write(self, parts: list[bytes], last: bool) -> None:
        for part in parts:
            self.data += part
            for hasher in self.hashers:
                hasher.update(part)

    async def rollback(self) -> None:
        del self.data[self.offset :]

    async def keep(self) -> int:
        return len(self.data)


class Memory(Uploads):
    """Uploads kept in dicts; its files record the sha256 they were given.

    `Memory(other)` shares `other`'s dicts, as another worker process would
    share a folder or a bucket.
    """

    def __init__(self, other: Memory | None = None) -> None:
        super().__init__()
        self.states: dict[str, State] = other.states if other else {}
        self.bytes: dict[str, bytearray] = other.bytes if other else {}
        self.files: dict[str, tuple[bytes, str | None]] = other.files if other else {}
        self.locks: KeyedLocks = other.locks if other else KeyedLocks()
        self.fail_completion = False

    def lock_upload(self, id: str) -> AbstractAsyncContextManager[None]:
        return self.locks.hold(id)

    async def load_upload(self, id: str) -> tuple[State, int]:
        if id not in self.states:
            raise UploadNotFound(id)
        state = copy.deepcopy(self.states[id])
        return state, state["length"] if state["file"] else len(self.bytes[state["id"]])

    async def start_upload(self, state: State) -> None:
        self.states[state["id"]] = copy.deepcopy(state)
        self.bytes[state["id"]] = bytearray()

    @asynccontextmanager
    async def write_upload(
        self, state: State, offset: int, hashers: Hashers
    ) -> AsyncIterator[Writer]:
        yield MemoryWriter(self.bytes[state["id"]], offset, hashers)

    async def save_upload(self, state: State) -> None:
        self.states[state["id"]] = copy.deepcopy(state)

    async def complete_upload(self, state: State, sha256: str | None) -> str:
        if self.fail_completion:
            raise OSError("no room for the file")
        id = new_id()
        self.files[id] = (bytes(self.bytes.pop(state["id"])), sha256)
        return id

    async def remove_upload(self, state: State) -> None:
        self.states.pop(state["id"], None)
        self.bytes.pop(state["id"], None)


def run(body: Callable[[Memory], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(body(Memory()))


async def create(memory: Memory, length: int, expires: float = HOUR) -> str:
    upload = await memory.create_upload(
        length=length, name="u", type="x", metadata="", expires=time.time() + expires
    )
    return upload.id


def test_appends_become_a_file_hashed_on_the_way() -> None:
    async def body(memory: Memory) -> None:
        id = await create(memory, 10)
        await memory.append(id, 0, chunks(b"012", 1))
        assert (await memory.upload(id)).offset == 3
        done = await memory.append(id, 3, chunks(b"3456789", 2))
        assert done.offset == 10 and done.file is not None
        # The running hash: the backend is not asked to read the bytes again.
        assert memory.files[done.file] == (b"0123456789", hashlib.sha256(b"0123456789").hexdigest())
        assert (await memory.upload(id)).file == done.file

    run(body)


def test_another_process_has_the_bytes_hashed_again() -> None:
    async def body(memory: Memory) -> None:
        id = await create(memory, 4)
        await memory.append(id, 0, chunks(b"ab"))
        elsewhere = Memory(memory)  # another worker
        done = await elsewhere.append(id, 2, chunks(b"cd"))
        assert memory.files[done.file or ""] == (b"abcd", None)

    run(body)


def test_a_wrong_offset_says_where_the_upload_is() -> None:
    async def body(memory: Memory) -> None:
        id = await create(memory, 4)
        await memory.append(id, 0, chunks(b"a"))
        with pytest.raises(OffsetMismatch) as error:
            await memory.append(id, 0, chunks(b"b"))
        assert error.value.offset == 1

    run(body)


def test_a_checksum_mismatch_rolls_back_and_the_running_hash_goes_on() -> None:
    async def body(memory: Memory) -> None:
        id = await create(memory, 12)
        await memory.append(id, 0, chunks(b"0123"))
        wrong = ("sha1", hashlib.sha1(b"other").digest())
        with pytest.raises(BadChecksum):
            await memory.append(id, 4, chunks(b"45678", 1), checksum=wrong)
        assert bytes(memory.bytes[id]) == b"0123"
        right = ("sha1", hashlib.sha1(b"456789ab").digest())
        done = await memory.append(id, 4, chunks(b"456789ab"), checksum=right)
        assert memory.files[done.file or ""][1] == hashlib.sha256(b"0123456789ab").hexdigest()

    run(body)


def test_a_client_that_goes_away_keeps_what_arrived_unless_it_sent_a_checksum() -> None:
    async def body(memory: Memory) -> None:
        id = await create(memory, 10)
        with pytest.raises(ConnectionResetError):
            await memory.append(id, 0, failing(b"012", 1))
        assert (await memory.upload(id)).offset == 3
        checksum = ("sha256", hashlib.sha256(b"3456").digest())
        with pytest.raises(ConnectionResetError):
            await memory.append(id, 3, failing(b"34", 1), checksum=checksum)
        assert (await memory.upload(id)).offset == 3
        done = await memory.append(id, 3, chunks(b"3456789"))
        assert memory.files[done.file or ""][1] == hashlib.sha256(b"0123456789").hexdigest()

    run(body)


def test_bytes_beyond_the_length_are_refused_before_and_after_the_end() -> None:
    async def body(memory: Memory) -> None:
        id = await create(memory, 4)
        with pytest.raises(TooLarge) as error:
            await memory.append(id, 0, chunks(b"01234", 1))
        assert error.value.limit == 4
        assert bytes(memory.bytes[id]) == b""
        done = await memory.append(id, 0, chunks(b"0123"))
        # Finished: an empty append at the end is answered, anything more refused.
        assert (await memory.append(id, 4, chunks(b""))).file == done.file
        with pytest.raises(TooLarge):
            await memory.append(id, 4, chunks(b"x"))
        with pytest.raises(OffsetMismatch):
            await memory.append(id, 2, chunks(b""))

    run(body)


def test_appends_push_the_expiry_and_an_expired_upload_is_gone() -> None:
    async def body(memory: Memory) -> None:
        id = await create(memory, 4, expires=60)
        memory.states[id]["expires"] = time.time() + 1  # nearly over
        await memory.append(id, 0, chunks(b"0"))
        assert (await memory.upload(id)).expires > time.time() + 50
        memory.states[id]["expires"] = time.time() - 1
        for attempt in (memory.upload(id), memory.append(id, 1, chunks(b"1")), memory.abort(id)):
            with pytest.raises(UploadNotFound):
                await attempt

    run(body)


def test_an_empty_upload_is_a_file_at_once_or_leaves_nothing() -> None:
    async def body(memory: Memory) -> None:
        upload = await memory.create_upload(
            length=0, name="e", type="x", metadata="", expires=time.time() + HOUR
        )
        assert memory.files[upload.file or ""] == (b"", hashlib.sha256().hexdigest())
        memory.fail_completion = True
        with pytest.raises(OSError, match="no room"):
            await create(memory, 0)
        assert list(memory.states) == [upload.id]

    run(body)


def test_abort_forgets_the_upload_and_malformed_ids_are_not_found() -> None:
    async def body(memory: Memory) -> None:
        id = await create(memory, 4)
        await memory.abort(id)
        assert memory.states == {} and memory.bytes == {}
        for malformed in ("", "../x", "A" * 22):
            with pytest.raises(UploadNotFound):
                await memory.append(malformed, 0, chunks(b""))
            with pytest.raises(UploadNotFound):
                await memory.upload(malformed)

    run(body)
