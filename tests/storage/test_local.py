"""LocalStorage beyond the contract: layout, full disks, blocks, memory, sharing a folder."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
import pytest

from tests.conftest import wait_for
from tests.full_disk import fill, small_disk_fixture  # noqa: F401
from tidewire.storage import OffsetMismatch, StorageFull, StorageUnavailable, from_url, new_id
from tidewire.storage import local as local_module
from tidewire.storage.local import LocalStorage

from .test_storage import chunks, read_all

T = TypeVar("T")
HOUR = 3600.0
MIB = 1 << 20


def run(root: Path, body: Callable[[LocalStorage], Awaitable[T]]) -> T:
    async def main() -> T:
        storage = LocalStorage(root)
        try:
            async with asyncio.timeout(30):
                return await body(storage)
        finally:
            await storage.aclose()

    return asyncio.run(main())


def contents(root: Path) -> dict[str, list[str]]:
    return {d: sorted(p.name for p in (root / d).iterdir()) for d in ("files", "tmp", "uploads")}


def test_constructing_touches_nothing(tmp_path: Path) -> None:
    root = tmp_path / "data"
    storage = LocalStorage(root)
    asyncio.run(storage.aclose())
    assert not root.exists()
    assert isinstance(from_url(None, data_dir=root), LocalStorage)
    assert isinstance(from_url(f"file://{root}"), LocalStorage)
    assert not root.exists()


def test_layout_and_path(tmp_path: Path) -> None:
    async def body(storage: LocalStorage) -> None:
        info = await storage.save(chunks(b"hello"), name="../../etc/passwd", type="text/plain")
        path = storage.path(info)
        assert path == tmp_path / "files" / info.id
        assert path.read_bytes() == b"hello"

    run(tmp_path, body)
    assert contents(tmp_path) == {
        "files": [os.listdir(tmp_path / "files")[0]],
        "tmp": [],
        "uploads": [],
    }
    with sqlite3.connect(tmp_path / "index.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_chunks_are_written_in_blocks_of_a_mebibyte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    real = local_module._write_all

    def counting(fd: int, parts: list[bytes]) -> None:
        writes.append(sum(map(len, parts)))
        real(fd, parts)

    monkeypatch.setattr(local_module, "_write_all", counting)
    data = os.urandom((4 << 20) + 100)

    async def body(storage: LocalStorage) -> None:
        info = await storage.save(chunks(data, 64 << 10), name="x", type="x")
        assert await read_all(storage, info) == data

    run(tmp_path, body)
    # 65 chunks of 64 KiB make 5 writes, not 65.
    assert writes == [1 << 20] * 4 + [100]


def test_writeback_starts_while_a_file_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every WRITEBACK bytes the disk is told to start on them, not only at the fsync."""
    advised: list[tuple[int, int, int]] = []
    monkeypatch.setattr(local_module, "_ADVISE", lambda *args: advised.append(args[1:]))
    step = local_module.WRITEBACK
    data = os.urandom(2 * step + (3 << 20))

    async def body(storage: LocalStorage) -> None:
        info = await storage.save(chunks(data, 64 << 10), name="x", type="x")
        assert await read_all(storage, info) == data

    run(tmp_path, body)
    assert advised == [(0, step, os.POSIX_FADV_DONTNEED), (step, step, os.POSIX_FADV_DONTNEED)]


def test_a_block_of_more_chunks_than_one_writev_takes(tmp_path: Path) -> None:
    # 1-byte chunks: a block of 3,000 of them is over IOV_MAX (1,024).
    data = os.urandom(3000)

    async def body(storage: LocalStorage) -> None:
        info = await storage.save(chunks(data, 1), name="x", type="x")
        assert info.size == 3000
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert await read_all(storage, info) == data

    run(tmp_path, body)


def test_a_short_writev_is_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writev that writes only part of a block (a signal, a full disk): the rest follows."""
    real = os.writev

    def short(fd: int, parts: list[bytes]) -> int:
        return real(fd, [parts[0][:1000]])

    monkeypatch.setattr(local_module.os, "writev", short)
    data = os.urandom((2 << 20) + 5)

    async def body(storage: LocalStorage) -> None:
        info = await storage.save(chunks(data, 64 << 10), name="x", type="x")
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert await read_all(storage, info) == data

    run(tmp_path, body)


def full_after(blocks: int) -> Callable[[int, list[bytes]], None]:
    """A `_write_all` that writes `blocks` blocks and then finds the disk full."""
    real = local_module._write_all
    left = [blocks]

    def write(fd: int, parts: list[bytes]) -> None:
        if left[0] == 0:
            os.write(fd, parts[0][:1000])  # a partial write, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        left[0] -= 1
        real(fd, parts)

    return write


def test_a_full_disk_during_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(storage: LocalStorage) -> None:
        other = await storage.save(chunks(b"other"), name="other", type="x")
        before = contents(tmp_path)
        monkeypatch.setattr(local_module, "_write_all", full_after(2))
        with pytest.raises(StorageFull):
            await storage.save(chunks(os.urandom(5 << 20)), name="big", type="x")
        assert contents(tmp_path) == before
        assert (await storage.list(limit=10)).files == [other]
        assert await read_all(storage, other) == b"other"

    run(tmp_path, body)


def test_a_full_disk_during_append_rolls_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(6 << 20)

    async def body(storage: LocalStorage) -> None:
        upload = await storage.create_upload(
            length=len(data), name="u", type="x", metadata="", expires=time.time() + HOUR
        )
        await storage.append(upload.id, 0, chunks(data[: 1 << 20]))
        with monkeypatch.context() as patch:
            patch.setattr(local_module, "_write_all", full_after(1))
            with pytest.raises(StorageFull):
                await storage.append(upload.id, 1 << 20, chunks(data[1 << 20 :]))
        assert (await storage.upload(upload.id)).offset == 1 << 20
        assert (tmp_path / "uploads" / upload.id).stat().st_size == 1 << 20
        # Space is back: the upload goes on, and its running hash is right.
        done = await storage.append(upload.id, 1 << 20, chunks(data[1 << 20 :]))
        info = await storage.info(done.file or "")
        assert info.sha256 == hashlib.sha256(data).hexdigest()

    run(tmp_path, body)


def test_a_cancelled_save_leaves_nothing(tmp_path: Path) -> None:
    async def body(storage: LocalStorage) -> None:
        started = asyncio.Event()

        async def endless() -> AsyncIterator[bytes]:
            while True:
                yield b"x" * (256 << 10)
                started.set()

        task = asyncio.create_task(storage.save(endless(), name="x", type="x"))
        await started.wait()
        while not any((tmp_path / "tmp").iterdir()):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert contents(tmp_path) == {"files": [], "tmp": [], "uploads": []}

    run(tmp_path, body)


def test_memory_stays_flat(tmp_path: Path) -> None:
    process = psutil.Process()
    piece = os.urandom(64 << 10)
    size = 512 << 20
    peak = [0]

    async def body(storage: LocalStorage) -> None:
        async def body_chunks() -> AsyncIterator[bytes]:
            for i in range(size // len(piece)):
                if i % 256 == 0:
                    peak[0] = max(peak[0], process.memory_info().rss)
                yield piece

        info = await storage.save(body_chunks(), name="big", type="x")
        assert info.size == size
        async for _ in storage.read(info):
            peak[0] = max(peak[0], process.memory_info().rss)

    base = process.memory_info().rss
    run(tmp_path, body)
    assert peak[0] - base < 32 << 20


def test_the_running_hash_is_used_when_offsets_line_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_rereading(path: Path) -> str:
        raise AssertionError("the bytes were read again")

    monkeypatch.setattr(local_module, "_sha256_of", no_rereading)

    async def body(storage: LocalStorage) -> None:
        upload = await storage.create_upload(
            length=6, name="u", type="x", metadata="", expires=time.time() + HOUR
        )
        for offset in range(6):
            done = await storage.append(upload.id, offset, chunks(b"abcdef"[offset : offset + 1]))
        info = await storage.info(done.file or "")
        assert info.sha256 == hashlib.sha256(b"abcdef").hexdigest()

    run(tmp_path, body)


def test_two_storages_on_one_folder_take_turns(tmp_path: Path) -> None:
    """As two worker processes would: the flock keeps their appends apart."""

    async def body(first: LocalStorage) -> None:
        second = LocalStorage(tmp_path)
        try:
            upload = await first.create_upload(
                length=MIB + 10, name="u", type="x", metadata="", expires=time.time() + HOUR
            )
            go_on = asyncio.Event()

            async def slow() -> AsyncIterator[bytes]:
                yield b"0" * MIB  # a whole block: written at once
                await go_on.wait()

            one = asyncio.create_task(first.append(upload.id, 0, slow()))
            while (await second.upload(upload.id)).offset < MIB:
                await asyncio.sleep(0.01)
            other = asyncio.create_task(second.append(upload.id, 0, chunks(b"x" * 10)))
            await asyncio.sleep(0.2)
            assert not other.done(), "the second append must wait for the first"
            go_on.set()
            assert (await one).offset == MIB
            with pytest.raises(OffsetMismatch):
                await other
            # The second storage finishes it; the hash comes from the bytes.
            done = await second.append(upload.id, MIB, chunks(b"abcdefghij"))
            info = await first.info(done.file or "")
            assert info.sha256 == hashlib.sha256(b"0" * MIB + b"abcdefghij").hexdigest()
        finally:
            await second.aclose()

    run(tmp_path, body)


def test_expire_removes_bytes_finished_states_and_stale_temporary_files(tmp_path: Path) -> None:
    async def body(storage: LocalStorage) -> None:
        now = time.time()
        unfinished = await storage.create_upload(
            length=10, name="u", type="x", metadata="", expires=now + 60
        )
        await storage.append(unfinished.id, 0, chunks(b"01234"))
        finished = await storage.create_upload(
            length=2, name="f", type="x", metadata="", expires=now + 60
        )
        done = await storage.append(finished.id, 0, chunks(b"ok"))
        stale = tmp_path / "tmp" / "leftover"
        stale.write_bytes(b"from a process that died")
        os.utime(stale, (now - 2 * HOUR, now - 2 * HOUR))
        assert await storage.expire(now + 120) == 2
        assert contents(tmp_path) == {"files": [done.file], "tmp": [], "uploads": []}
        # The file itself stays.
        assert await read_all(storage, await storage.info(done.file or "")) == b"ok"

    run(tmp_path, body)


def test_folders_removed_under_a_running_server_come_back(tmp_path: Path) -> None:
    async def body(storage: LocalStorage) -> None:
        await storage.save(chunks(b"first"), name="a", type="text/plain")
        shutil.rmtree(tmp_path / "tmp")
        shutil.rmtree(tmp_path / "uploads")
        again = await storage.save(chunks(b"second"), name="b", type="text/plain")
        assert await read_all(storage, again) == b"second"
        upload = await storage.create_upload(
            length=1, name="c", type="text/plain", metadata="", expires=time.time() + HOUR
        )
        assert (await storage.upload(upload.id)).offset == 0

    run(tmp_path, body)


# ---------------------------------------------------------------- a real full disk


def test_a_full_disk_is_storage_full_on_every_write_and_nothing_stays(small_disk: Path) -> None:
    root = small_disk / "data"

    async def body(storage: LocalStorage) -> None:
        kept = await storage.save(chunks(b"kept"), name="kept", type="x")
        rest = os.urandom(64 << 10)  # more than the slack in the last page of the bytes
        upload = await storage.create_upload(
            length=5 + len(rest), name="u", type="x", metadata="", expires=time.time() + HOUR
        )
        await storage.append(upload.id, 0, chunks(b"01234"))
        before = contents(root)
        filler = fill(small_disk)

        # An empty file needs no bytes, only its row in the index: SQLITE_FULL.
        with pytest.raises(StorageFull, match="nothing was stored"):
            await storage.save(chunks(b""), name="empty", type="x")
        with pytest.raises(StorageFull, match="nothing was stored"):
            await storage.save(chunks(os.urandom(64 << 10)), name="bytes", type="x")
        with pytest.raises(StorageFull, match="the file was not deleted"):
            await storage.delete(kept.id)
        with pytest.raises(StorageFull, match="the upload was not created"):
            await storage.create_upload(
                length=10, name="v", type="x", metadata="", expires=time.time() + HOUR
            )
        with pytest.raises(StorageFull, match=r"the upload was not created|nothing was stored"):
            await storage.create_upload(
                length=0, name="w", type="x", metadata="", expires=time.time() + HOUR
            )
        with pytest.raises(StorageFull, match="nothing was stored"):
            await storage.append(upload.id, 5, chunks(rest))
        # Nothing was half done, nothing stays behind.
        assert contents(root) == before
        assert (await storage.list(limit=10)).files == [kept]
        assert (await storage.upload(upload.id)).offset == 5

        filler.unlink()  # space is back: everything works again
        done = await storage.append(upload.id, 5, chunks(rest))
        assert await read_all(storage, await storage.info(done.file or "")) == b"01234" + rest
        await storage.delete(kept.id)
        empty = await storage.save(chunks(b""), name="empty", type="x")
        assert (await storage.info(empty.id)).size == 0

    run(root, body)


def test_full_index_is_storage_full_and_an_upload_completes_once_it_has_room(
    tmp_path: Path,
) -> None:
    # SQLite's page limit makes the index full while the disk is not: the
    # last append's bytes are kept, and an empty append at the end finishes.
    async def body(storage: LocalStorage) -> None:
        await storage.save(chunks(b"first"), name="first", type="x")
        upload = await storage.create_upload(
            length=4, name="u", type="x", metadata="", expires=time.time() + HOUR
        )
        pages = await storage._db(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
        await storage._db(lambda db: db.execute(f"PRAGMA max_page_count = {pages}"))
        # Rows until a page more is needed.
        with pytest.raises(StorageFull, match="nothing was stored"):
            for i in range(10_000):
                await storage.save(chunks(b""), name=f"n{i:05}" * 20, type="x")
        with pytest.raises(StorageFull, match="no file was made"):
            await storage.append(upload.id, 0, chunks(b"data"))
        assert (await storage.upload(upload.id)).offset == 4
        assert contents(tmp_path)["uploads"] == sorted([upload.id, f"{upload.id}.json"])

        await storage._db(lambda db: db.execute("PRAGMA max_page_count = 1000000"))
        done = await storage.append(upload.id, 4, chunks(b""))
        assert await read_all(storage, await storage.info(done.file or "")) == b"data"

    run(tmp_path, body)


def test_leftovers_of_dead_processes_are_swept_at_start_up(tmp_path: Path) -> None:
    for folder in ("files", "tmp", "uploads"):
        (tmp_path / folder).mkdir()
    # A save killed midway, however recent; and one still being written (locked).
    (tmp_path / "tmp" / "0000000000000000000000").write_bytes(b"partial")
    busy = tmp_path / "tmp" / "1111111111111111111111"
    busy.write_bytes(b"being written")
    holder = os.open(busy, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    # An upload whose state was never written, and a state half written long ago.
    orphan = "2222222222222222222222"
    (tmp_path / "uploads" / orphan).write_bytes(b"")
    stale = tmp_path / "uploads" / f"{orphan}.json.4242"
    stale.write_bytes(b"{")
    old = time.time() - HOUR  # well past any state write in progress
    os.utime(stale, (old, old))
    fresh = tmp_path / "uploads" / "3333333333333333333333.json.4343"
    fresh.write_bytes(b"{")  # being written right now, perhaps

    async def body(storage: LocalStorage) -> str:
        upload = await storage.create_upload(
            length=3, name="u", type="x", metadata="", expires=time.time() + HOUR
        )
        return upload.id

    try:
        live = run(tmp_path, body)
        assert contents(tmp_path) == {
            "files": [],
            "tmp": [busy.name],
            "uploads": sorted([live, f"{live}.json", fresh.name]),
        }
    finally:
        os.close(holder)


def test_a_save_killed_midway_is_swept_when_the_server_starts_again(tmp_path: Path) -> None:
    data = tmp_path / "data"

    def serve() -> tuple[subprocess.Popen[bytes], int]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "tidewire", "serve", "--data-dir", str(data)]
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 20, "no server")
        return proc, port

    proc, port = serve()
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"PUT /files/big.bin HTTP/1.1\r\nHost: x\r\n"
                + f"Content-Length: {10 * MIB}\r\n\r\n".encode()
            )
            sock.sendall(b"x" * (2 * MIB))
            # The first blocks are on disk, in a temporary file: kill the server there.
            wait_for(lambda: any(p.stat().st_size for p in _files_in(data / "tmp")), 10)
            proc.kill()
            proc.wait(10)
        [partial] = (data / "tmp").iterdir()
        assert partial.stat().st_size > 0
    finally:
        proc.kill()
        proc.wait(10)

    proc, port = serve()
    try:
        wait_for(lambda: not _files_in(data / "tmp"), 10, "the partial file stayed")
        assert httpx.get(f"http://127.0.0.1:{port}/files").json() == []
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _files_in(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.exists() else []


def test_an_index_made_before_owners_is_migrated(tmp_path: Path) -> None:
    # The schema as it was: no owner column.
    (tmp_path / "files").mkdir()
    with sqlite3.connect(tmp_path / "index.sqlite3") as db:
        db.executescript(
            "CREATE TABLE files (id TEXT PRIMARY KEY, name TEXT NOT NULL, size INTEGER NOT NULL,"
            " type TEXT NOT NULL, sha256 TEXT NOT NULL, created REAL NOT NULL) WITHOUT ROWID;"
        )
        old = new_id()
        db.execute(
            "INSERT INTO files VALUES (?, 'old.txt', 2, 'text/plain', ?, 1.0)",
            (old, hashlib.sha256(b"hi").hexdigest()),
        )
    (tmp_path / "files" / old).write_bytes(b"hi")

    async def main() -> None:
        storage = LocalStorage(tmp_path)
        try:
            assert (await storage.info(old)).owner is None
            # Nor any expiry (the column came later too): never swept.
            assert (await storage.info(old)).expires is None
            assert await storage.expire_files(10.0**12) == 0
            new = await storage.save(_once(b"x"), name="new.txt", type="text/plain", owner="al")
            assert [f.id for f in (await storage.list(limit=5)).files] == [new.id, old]
            assert [f.id for f in (await storage.list(limit=5, owner="al")).files] == [new.id]
        finally:
            await storage.aclose()
        # Opened again (another process, a restart): the column is there already.
        again = LocalStorage(tmp_path)
        try:
            assert (await again.info(new.id)).owner == "al"
        finally:
            await again.aclose()

    asyncio.run(main())


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


# -- durability ----------------------------------------------------------------


def _record_order(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int | str]]:
    """What is fsynced (by inode: renames and links keep it) and which rows are
    inserted, in order."""
    done: list[tuple[str, int | str]] = []
    fsync, insert = os.fsync, local_module._insert

    def recording_fsync(fd: int) -> None:
        fsync(fd)
        done.append(("fsync", os.fstat(fd).st_ino))

    def recording_insert(db: sqlite3.Connection, info: local_module.FileInfo) -> None:
        done.append(("row", info.id))
        insert(db, info)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(local_module, "_insert", recording_insert)
    return done


def test_a_file_and_its_name_are_on_disk_before_its_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = _record_order(monkeypatch)

    async def body(storage: LocalStorage) -> list[str]:
        saved = await storage.save(chunks(b"whole"), name="a", type="x")
        upload = await storage.create_upload(
            length=4, name="u", type="x", metadata="", expires=time.time() + HOUR
        )
        await storage.append(upload.id, 0, chunks(b"da"))
        finished = await storage.append(upload.id, 2, chunks(b"ta"))
        return [saved.id, finished.file or ""]

    ids = run(tmp_path, body)
    folder = (tmp_path / "files").stat().st_ino
    for id in ids:
        before = done[: done.index(("row", id))]
        # The bytes, then the folder's entry for them (after the last fsync of the bytes).
        file = ("fsync", (tmp_path / "files" / id).stat().st_ino)
        assert file in before, done
        last_bytes = len(before) - before[::-1].index(file)
        assert ("fsync", folder) in before[last_bytes:], done


def test_a_completion_that_fails_at_the_index_is_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(db: sqlite3.Connection, info: local_module.FileInfo) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async def body(storage: LocalStorage) -> None:
        upload = await storage.create_upload(
            length=4, name="u", type="x", metadata="", expires=time.time() + HOUR
        )
        with monkeypatch.context() as patched:
            patched.setattr(local_module, "_insert", broken)
            with pytest.raises(StorageUnavailable, match=r"no file was made.*disk I/O error"):
                await storage.append(upload.id, 0, chunks(b"data"))
        # Nothing listed, nothing left in files/, and the upload is whole.
        assert (await storage.list(limit=10)).files == []
        assert contents(tmp_path)["files"] == []
        state = await storage.upload(upload.id)
        assert (state.offset, state.file) == (4, None)
        # An empty PATCH at its end completes it.
        done = await storage.append(upload.id, 4, chunks(b""))
        [listed] = (await storage.list(limit=10)).files
        assert listed.id == done.file
        assert listed.sha256 == hashlib.sha256(b"data").hexdigest()
        assert await read_all(storage, listed) == b"data"
        assert contents(tmp_path)["uploads"] == [f"{upload.id}.json"]

    run(tmp_path, body)


def test_a_completion_cut_short_after_its_row_makes_no_second_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Killed after the file's row was written, before the state said so.
    async def first(storage: LocalStorage) -> str:
        upload = await storage.create_upload(
            length=4, name="u", type="x", metadata="", expires=time.time() + HOUR
        )

        async def killed(state: object) -> None:
            pass

        monkeypatch.setattr(storage, "save_upload", killed)
        await storage.append(upload.id, 0, chunks(b"data"))
        return upload.id

    id = run(tmp_path, first)

    async def again(storage: LocalStorage) -> None:
        [listed] = (await storage.list(limit=10)).files
        state = await storage.upload(id)
        assert (state.offset, state.file) == (4, listed.id)
        await storage.append(id, 4, chunks(b""))  # the client's retry
        assert [f.id for f in (await storage.list(limit=10)).files] == [listed.id]
        assert await read_all(storage, listed) == b"data"

    run(tmp_path, again)


def test_the_index_is_checked_against_the_files_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def save_three(storage: LocalStorage) -> list[str]:
        return [
            (await storage.save(chunks(b"%d" % i * 10), name=f"f{i}", type="x")).id
            for i in range(3)
        ]

    kept, gone, short = run(tmp_path, save_three)
    files = tmp_path / "files"
    (files / gone).unlink()  # a row without its file
    (files / short).write_bytes(b"cut")  # a row whose file lost bytes
    unlisted = new_id()
    (files / unlisted).write_bytes(b"renamed, then killed before its row")
    busy = new_id()
    (files / busy).write_bytes(b"being completed by another process")
    holder = os.open(files / busy, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)

    async def listing(storage: LocalStorage) -> list[str]:
        return [f.id for f in (await storage.list(limit=10)).files]

    try:
        with caplog.at_level("WARNING", logger="tidewire"):
            assert run(tmp_path, listing) == [kept]
        assert sorted(os.listdir(files)) == sorted([kept, busy])
    finally:
        os.close(holder)
    assert f"file {gone} was listed with 10 bytes but is missing" in caplog.text
    assert f"file {short} was listed with 10 bytes but has 3" in caplog.text
    assert "removed 1 files that had no row" in caplog.text


def _serve(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tidewire", "serve", "--data-dir", str(data)]
    proc = subprocess.Popen(
        [*command, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(f"{url}/healthz"), 20, "no server")
    return proc, url


def test_a_tus_upload_killed_midway_resumes_after_a_restart(tmp_path: Path) -> None:
    from tusclient import client as tus_client

    data_dir = tmp_path / "data"
    data = os.urandom(6 * MIB)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    proc, url = _serve(data_dir)
    try:
        created = httpx.post(
            f"{url}/uploads/",
            headers={"Tus-Resumable": "1.0.0", "Upload-Length": str(len(data))},
        )
        assert created.status_code == 201, created.text
        location = httpx.URL(url).join(created.headers["location"])
        port = location.port
        assert port is not None
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                f"PATCH {location.raw_path.decode()} HTTP/1.1\r\nHost: x\r\n"
                "Tus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\n"
                f"Upload-Offset: 0\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            )
            sock.sendall(data[: 3 * MIB])
            # The first blocks are in the upload's file: kill the server mid-PATCH.
            uploads = data_dir / "uploads"
            wait_for(
                lambda: any(
                    p.stat().st_size for p in _files_in(uploads) if not p.name.endswith(".json")
                ),
                10,
            )
            proc.kill()
            proc.wait(10)
    finally:
        proc.kill()
        proc.wait(10)

    proc, url = _serve(data_dir)
    try:
        assert httpx.get(f"{url}/files").json() == []  # nothing half-written is listed
        location = httpx.URL(url).join(location.raw_path.decode())  # the new server's port
        uploader = tus_client.TusClient(f"{url}/uploads/").uploader(
            str(source), url=str(location), chunk_size=MIB
        )
        assert 0 < uploader.offset < len(data)  # it resumes, not from the start
        uploader.upload()
        head = httpx.head(str(location), headers={"Tus-Resumable": "1.0.0"})
        info = httpx.get(f"{url}/files/{head.headers['tidewire-file']}/meta").json()
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        assert [f["id"] for f in httpx.get(f"{url}/files").json()] == [info["id"]]
        assert httpx.get(f"{url}/files/{info['id']}").content == data
    finally:
        proc.terminate()
        proc.wait(10)
