"""LocalStorage: files in a folder, their metadata in SQLite beside them.

    <root>/files/<id>           the bytes of complete files
    <root>/tmp/<name>           saves in progress; the same filesystem as files/,
                                so completing one is an atomic rename. The
                                process writing one holds it locked (flock)
    <root>/uploads/<id>         a resumable upload's bytes so far
    <root>/uploads/<id>.json    its state
    <root>/index.sqlite3        the metadata, in WAL mode, so that several
                                worker processes can share the folder

Bytes are written once, in ~1 MiB blocks, by a worker thread that hashes them
on the way; the event loop only gathers the request's chunks into blocks.

No space on the disk (ENOSPC, EDQUOT) or in the index (SQLITE_FULL) is
`StorageFull` on every operation, saying what was not done; an index that
cannot be written now (locked past the busy timeout, an I/O error) is
`StorageUnavailable`. What a process that died (kill -9) or a failed write
left behind is swept on first use and by `expire`: temporary files nobody
holds locked, upload bytes without a state, state files half written.

Durability: a file's bytes and its name in files/ are on disk (fsync of the
file, then of the folder) before its row is written, so a row never names a
file a power cut could lose or shorten. When the index is first opened (at
start-up) it is checked against files/: files without a row (a process
killed between the rename and the row) are removed, rows whose file is
missing or of another size are removed and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from . import (
    FileInfo,
    FileNotFound,
    Page,
    StorageFull,
    StorageUnavailable,
    UploadNotFound,
    new_id,
    valid_id,
)
from ._blocks import BLOCK, Pump, Sink, finish, too_large
from ._uploads import Hashers, KeyedLocks, State, Uploads, Writer, expired

__all__ = ["LocalStorage"]

logger = logging.getLogger("tidewire")

T = TypeVar("T")

#: A state file is written to `<id>.json.<pid>` and renamed at once; one
#: older than this was left by a process that died mid-write (or a full disk).
STALE_STATE = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    type TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    owner TEXT,
    expires REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_by_name ON files (name, id);
"""
#: Run once the table exists: indexes on columns that older index files gain
#: by migration (`_migrate`) must come after it.
_INDEXES = """
CREATE INDEX IF NOT EXISTS files_by_owner ON files (owner, id);
CREATE INDEX IF NOT EXISTS files_by_expiry ON files (expires) WHERE expires IS NOT NULL;
"""
_COLUMNS = "id, name, size, type, sha256, created, owner, expires"


#: Bytes of a file being written after which their writeback is started.
WRITEBACK = 8 << 20
_ADVISE = getattr(os, "posix_fadvise", None)  # not on macOS: writeback starts at the fsync

#: The most buffers one `writev` is given (IOV_MAX on Linux and macOS).
_MOST_PARTS = 1024


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Write all of `parts`, in order, at the file's position: the one place bytes reach the disk.

    One `writev` for them all, rather than a join (a copy of every byte) and a write.
    """
    if len(parts) > _MOST_PARTS:  # over what one writev takes: gathered first
        parts = [b"".join(parts)]
    left = sum(map(len, parts))
    written = os.writev(fd, parts)
    if written < left:  # a short write (rare on a file): the rest one by one
        rest = memoryview(b"".join(parts))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]


def _fsync_folder(folder: Path) -> None:
    """Make the names in `folder` durable (a rename or link into it survives a power cut)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_full(exc: BaseException) -> bool:
    """Whether an error means no space: on the disk, or in SQLite's index on it."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        # The primary code is the low byte of an extended one.
        return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL
    return False


@contextlib.contextmanager
def _space(undone: str) -> Iterator[None]:
    """Turn "no space" raised inside into `StorageFull`, saying what was `undone`."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        if _is_full(exc):
            raise StorageFull(undone) from exc
        raise


class _FileSink(Sink):
    """Blocks written to a file descriptor; a full disk is `StorageFull`."""

    def __init__(self, fd: int, hashers: list[Any]) -> None:
        super().__init__(hashers)
        self.fd = fd
        self._dirty = 0  # bytes written since their writeback was last started

    def put(self, parts: list[bytes]) -> None:
        with _space("nothing was stored"):
            _write_all(self.fd, parts)
            self._dirty += sum(map(len, parts))
            if self._dirty >= WRITEBACK and _ADVISE is not None:
                # The disk starts on these bytes now, while the rest arrives,
                # rather than at the fsync after the last one (which waited
                # for the whole file: 0.4 s a GiB, bench W6). Only the start:
                # the pages are dirty, so DONTNEED neither waits nor drops them.
                end = os.lseek(self.fd, 0, os.SEEK_CUR)
                _ADVISE(self.fd, end - self._dirty, self._dirty, os.POSIX_FADV_DONTNEED)
                self._dirty = 0


class _UploadWriter:
    """An append's bytes, written in blocks at the end of the upload's file."""

    block = BLOCK
    head = b""

    def __init__(self, fd: int, offset: int, hashers: list[Any]) -> None:
        self._fd = fd
        self._offset = offset
        self._sink = _FileSink(fd, hashers)

    async def write(self, parts: list[bytes], last: bool) -> None:
        await self._sink.awrite(parts, last)

    async def rollback(self) -> None:
        await finish(self._sink.stop)  # no block lands after the truncation
        await finish(os.ftruncate, self._fd, self._offset)

    async def keep(self) -> int:
        await finish(self._sink.stop)
        # The offset the client is told is on disk: after a crash (or a
        # power cut) the upload resumes from there, not from bytes that were lost.
        with _space("the bytes were not stored"):
            await finish(os.fsync, self._fd)
        return os.fstat(self._fd).st_size


class LocalStorage(Uploads):
    """Files in a folder (`./data` by default); nothing is touched until first use."""

    def __init__(self, root: str | os.PathLike[str] = "data") -> None:
        super().__init__()
        self.root = Path(root)
        self._files = self.root / "files"
        self._tmp = self.root / "tmp"
        self._uploads = self.root / "uploads"
        self._ready = False
        # SQLite is used from one thread of our own, so the loop never waits
        # on it and the connection never crosses threads.
        self._db_thread: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._locks = KeyedLocks()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    # -- whole files -----------------------------------------------------

    async def save(
        self,
        chunks: AsyncIterable[bytes],
        *,
        name: str,
        type: str,
        limit: int | None = None,
        owner: str | None = None,
        expires: float | None = None,
    ) -> FileInfo:
        with _space("nothing was stored"):
            await self._prepare()
            tmp = self._tmp / new_id()
            # Locked until it has its final name: the sweep leaves it alone.
            fd = await asyncio.to_thread(self._create_locked, tmp)
        sha = hashlib.sha256()
        sink = _FileSink(fd, [sha])
        try:
            with _space("nothing was stored"):
                try:
                    size = await Pump(sink.awrite, limit=limit, over=too_large(limit)).run(chunks)
                finally:
                    await finish(sink.stop)
                # On disk before it is named and listed (see the module's docstring).
                await finish(os.fsync, fd)
                # The id is made now, so that listing order is completion order.
                info = FileInfo(
                    id=new_id(),
                    name=name,
                    size=size,
                    type=type,
                    sha256=sha.hexdigest(),
                    created=time.time(),
                    owner=owner,
                    expires=expires,
                )
                await asyncio.to_thread(os.replace, tmp, self._files / info.id)
                tmp = self._files / info.id
                await finish(_fsync_folder, self._files)
                await self._db(lambda db: _insert(db, info), "nothing was stored")
        except BaseException:
            await finish(tmp.unlink, True)
            raise
        finally:
            await finish(os.close, fd)  # and with it the lock
        return info

    async def info(self, id: str) -> FileInfo:
        if not valid_id(id):
            raise FileNotFound(id)
        row = await self._db(
            lambda db: db.execute(f"SELECT {_COLUMNS} FROM files WHERE id = ?", (id,)).fetchone()
        )
        if row is None:
            raise FileNotFound(id)
        return FileInfo(*row)

    async def find(self, name: str, *, owner: str | None = None) -> FileInfo:
        # Ids sort newest first, so the smallest id with that name is the newest.
        mine, args = ("AND owner = ?", (name, owner)) if owner is not None else ("", (name,))
        row = await self._db(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM files WHERE name = ? {mine} ORDER BY id LIMIT 1", args
            ).fetchone()
        )
        if row is None:
            raise FileNotFound(name)
        return FileInfo(*row)

    async def list(
        self, *, limit: int, cursor: str | None = None, owner: str | None = None
    ) -> Page:
        if cursor is not None and not valid_id(cursor):
            raise ValueError("not a cursor of this storage")
        limit = max(limit, 1)
        mine, args = ("AND owner = ?", (owner,)) if owner is not None else ("", ())
        rows = await self._db(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM files WHERE id > ? {mine} ORDER BY id LIMIT ?",
                (cursor or "", *args, limit + 1),
            ).fetchall()
        )
        files = [FileInfo(*row) for row in rows[:limit]]
        return Page(files, files[-1].id if len(rows) > limit else None)

    async def delete(self, id: str) -> None:
        if not valid_id(id):
            raise FileNotFound(id)
        # The row goes first: once it is gone the file is no longer listed,
        # and a crash before the unlink leaves only unlisted bytes.
        deleted = await self._db(
            lambda db: db.execute("DELETE FROM files WHERE id = ?", (id,)).rowcount,
            "the file was not deleted",
        )
        if not deleted:
            raise FileNotFound(id)
        await asyncio.to_thread((self._files / id).unlink, missing_ok=True)

    async def read(
        self, file: FileInfo, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        path = self.path(file)
        try:
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFound(file.id) from None
        try:
            end = file.size if end is None else min(end, file.size)
            while start < end:
                data = await asyncio.to_thread(os.pread, fd, min(BLOCK, end - start), start)
                if not data:
                    break
                start += len(data)
                yield data
        finally:
            os.close(fd)

    def path(self, file: FileInfo) -> Path:
        if not valid_id(file.id):
            raise FileNotFound(file.id)
        return self._files / file.id

    # -- resumable uploads: create_upload, upload, append, abort are Uploads' --

    async def expire(self, now: float | None = None) -> int:
        if not self.root.exists():
            return 0
        # Leftovers of processes that died go too (see _sweep).
        removed = await asyncio.to_thread(self._expire, time.time() if now is None else now)
        for id in removed:
            self.forget_upload(id)
        return len(removed)

    async def set_expiry(self, id: str, expires: float) -> None:
        if not valid_id(id):
            raise FileNotFound(id)

        def move(db: sqlite3.Connection) -> bool:
            """Whether the file is there (an upload, without an expiry, keeps none)."""
            moved = db.execute(
                "UPDATE files SET expires = ? WHERE id = ? AND expires IS NOT NULL", (expires, id)
            )
            if moved.rowcount:
                return True
            return db.execute("SELECT 1 FROM files WHERE id = ?", (id,)).fetchone() is not None

        if not await self._db(move, "the file's expiry was not moved"):
            raise FileNotFound(id)

    async def expire_files(self, now: float | None = None) -> int:
        if not (self.root / "index.sqlite3").exists():
            return 0
        now = time.time() if now is None else now
        ids = await self._db(
            lambda db: [
                row[0]
                for row in db.execute(
                    "SELECT id FROM files WHERE expires IS NOT NULL AND expires <= ?", (now,)
                )
            ]
        )
        removed = 0
        for id in ids:
            # Another process sweeping the same folder may have been first.
            with contextlib.suppress(FileNotFound):
                await self.delete(id)
                removed += 1
        return removed

    async def ping(self) -> None:
        """A local folder is there as long as the process is."""

    async def aclose(self) -> None:
        if self._db_thread is not None:
            await asyncio.get_running_loop().run_in_executor(self._db_thread, self._disconnect)
            self._db_thread.shutdown()
            self._db_thread = None

    # -- the folder ------------------------------------------------------

    async def _prepare(self) -> None:
        if not self._ready:
            await asyncio.to_thread(self._make_folders)
            # At start-up: what a process that died here left behind goes now,
            # not at the first `expire`.
            await asyncio.to_thread(self._sweep, time.time())
            self._ready = True

    def _create(self, path: Path) -> int:
        """Open a new file for writing; folders removed under a running server come back."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return os.open(path, flags, 0o644)
        except FileNotFoundError:
            self._make_folders()
            return os.open(path, flags, 0o644)

    def _create_locked(self, path: Path) -> int:
        """`_create`, holding the new file locked (flock) until the descriptor is closed.

        A sweep (another process's, perhaps) may lock and remove the file in
        the instant between its creation and our lock: then it is made again.
        """
        while True:
            fd = self._create(path)
            # Blocking: a sweep holds the lock only while it removes the file.
            fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            os.close(fd)

    def _make_folders(self) -> None:
        for folder in (self._files, self._tmp, self._uploads):
            folder.mkdir(parents=True, exist_ok=True)

    async def _db(
        self,
        query: Callable[[sqlite3.Connection], T],
        undone: str = "the index could not be opened",
    ) -> T:
        """Run `query` in one transaction; a full disk or index is `StorageFull(undone)`."""
        if self._db_thread is None:
            self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="tidewire-sqlite")
        loop = asyncio.get_running_loop()
        with _space(undone):
            try:
                return await loop.run_in_executor(self._db_thread, self._in_db, query)
            except sqlite3.OperationalError as exc:
                if _is_full(exc):
                    raise
                # Locked past the busy timeout, an I/O error: not the
                # client's fault, and not done; the same request may work later.
                raise StorageUnavailable(f"{undone} (the index: {exc})") from exc

    def _in_db(self, query: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self.root.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.root / "index.sqlite3", check_same_thread=False)
            try:
                # Other processes may be writing: wait for their locks, not fail.
                conn.execute("PRAGMA busy_timeout = 10000")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.executescript(_SCHEMA)
                _migrate(conn)
                conn.executescript(_INDEXES)
                self._sweep_index(conn)
            except BaseException:
                conn.close()  # a full disk, say: the next call tries again
                raise
            self._conn = conn
        with self._conn:  # one transaction
            return query(self._conn)

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- uploads: the backend of _uploads.Uploads -------------------------

    @contextlib.asynccontextmanager
    async def lock_upload(self, id: str) -> AsyncIterator[None]:
        """Held within this process, and against other processes by a flock on its bytes."""
        async with self._locks.hold(id):
            try:
                fd = await asyncio.to_thread(os.open, self._uploads / id, os.O_WRONLY)
            except FileNotFoundError:
                yield  # finished, or not there: nothing to write to, nothing to lock
                return
            try:
                # Worker processes sharing the folder take turns by flock. Poll
                # rather than block: a blocked thread would be lost to the pool
                # for as long as the other append lasts.
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(0.02)
                yield
            finally:
                os.close(fd)  # and with it the lock

    async def load_upload(self, id: str) -> tuple[State, int]:
        state = await asyncio.to_thread(self._read_state, id)
        completing = state.get("completing")
        if state["file"] is None and completing is not None:
            # A completion cut short after the file's row was written, before
            # the state said so (see complete_upload): the row decides.
            listed = await self._db(
                lambda db: db.execute("SELECT 1 FROM files WHERE id = ?", (completing,)).fetchone()
            )
            if listed:
                state["file"] = completing
        if state["file"] is not None:
            return state, state["length"]
        try:
            # The bytes' file is the offset: the state only says how long
            # the upload is, until when it lives and what it became.
            offset = (await asyncio.to_thread(os.stat, self._uploads / id)).st_size
        except FileNotFoundError:
            raise UploadNotFound(id) from None
        return state, offset

    async def start_upload(self, state: State) -> None:
        await self._prepare()
        with _space("the upload was not created"):
            await asyncio.to_thread(self._start_upload, state)

    @contextlib.asynccontextmanager
    async def write_upload(
        self, state: State, offset: int, hashers: Hashers
    ) -> AsyncIterator[Writer]:
        fd = await asyncio.to_thread(os.open, self._uploads / state["id"], os.O_WRONLY)
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            yield _UploadWriter(fd, offset, hashers)
        finally:
            await finish(os.close, fd)

    async def save_upload(self, state: State) -> None:
        try:
            with _space("the state was not saved"):
                await asyncio.to_thread(self._write_state, state["id"], state)
        except StorageFull:
            # The bytes are stored (and the file made, if they were the
            # last): that is what the client asked for. Only the pushed-back
            # expiry is lost, which the next append writes again; a
            # finished upload's state keeps saying unfinished, but names
            # the file it became (`completing`), which load_upload finds.
            pass
        if state["file"] is not None:
            # Finished: the bytes are the file's now, under its own name.
            await finish((self._uploads / state["id"]).unlink, True)

    async def complete_upload(self, state: State, sha256: str | None) -> str:
        source = self._uploads / state["id"]
        if sha256 is None:
            sha256 = await asyncio.to_thread(_sha256_of, source)
        info = FileInfo(
            id=new_id(),
            name=state["name"],
            size=state["length"],
            type=state["type"],
            sha256=sha256,
            created=time.time(),
            owner=state.get("owner"),
        )
        target = self._files / info.id
        # The file's id is in the state before its row is written: a process
        # killed after the row but before the state says finished must not
        # make a second file of the same bytes at the next PATCH (load_upload).
        state["completing"] = info.id
        with _space("the last bytes arrived, but no file was made"):
            await asyncio.to_thread(self._write_state, state["id"], state)
            # A second name for the bytes, not a move: until the row is written
            # the upload keeps them, so a failure here (or a kill -9) leaves it
            # as it was, and at most a file without a row, which goes at start-up.
            await asyncio.to_thread(os.link, source, target)
        try:
            await finish(_fsync_folder, self._files)
            await self._db(
                lambda db: _insert(db, info), "the last bytes arrived, but no file was made"
            )
        except BaseException:
            # Not listed, and the upload is whole: an empty PATCH at its end
            # completes it once the index can be written.
            await finish(target.unlink, True)
            raise
        return info.id

    async def remove_upload(self, state: State) -> None:
        await finish(self._remove_upload, state["id"])

    def _start_upload(self, state: State) -> None:
        # The state first, then the bytes' file: bytes without a state are
        # then always a leftover, which a sweep may remove at once.
        try:
            self._write_state(state["id"], state)
            os.close(self._create(self._uploads / state["id"]))
        except BaseException:
            self._remove_upload(state["id"])  # a full disk, say: nothing stays behind
            raise

    def _read_state(self, id: str) -> State:
        try:
            state: State = json.loads((self._uploads / f"{id}.json").read_bytes())
        except (FileNotFoundError, ValueError):
            raise UploadNotFound(id) from None
        return state

    def _write_state(self, id: str, state: State) -> None:
        # Write then rename: a reader sees the old state or the new, never half.
        tmp = self._uploads / f"{id}.json.{os.getpid()}"
        try:
            with tmp.open("wb") as f:
                f.write(json.dumps(state).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._uploads / f"{id}.json")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _remove_upload(self, id: str) -> None:
        (self._uploads / id).unlink(missing_ok=True)
        (self._uploads / f"{id}.json").unlink(missing_ok=True)

    def _sweep_index(self, db: sqlite3.Connection) -> None:
        """Check the index against files/ when it is first opened (at start-up).

        A file without a row was left by a process killed between naming it
        and listing it: it goes, unless a process holds it locked (a save or
        a tus completion under way: they hold it from before its name until
        after its row). A row whose file is missing or of another size (a
        power cut before this version made files durable) names bytes
        nobody can have: it goes, and is logged.
        """
        sizes: dict[str, int] = {}
        for entry in _scan(self._files):
            if valid_id(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    sizes[entry.name] = entry.stat().st_size
        rows: dict[str, int] = dict(db.execute("SELECT id, size FROM files").fetchall())
        for id, size in rows.items():
            if sizes.get(id) == size:
                continue
            path = self._files / id
            try:
                found: int | None = os.stat(path).st_size
            except FileNotFoundError:
                found = None
            if found == size:
                continue  # it came meanwhile
            with db:
                db.execute("DELETE FROM files WHERE id = ?", (id,))
            path.unlink(missing_ok=True)
            logger.warning(
                "storage: file %s was listed with %d bytes but %s; its row is removed",
                id,
                size,
                "is missing" if found is None else f"has {found}",
            )

        def listed(id: str) -> Callable[[], bool]:
            # Asked again once the file is locked here: its row may have come meanwhile.
            return lambda: (
                db.execute("SELECT 1 FROM files WHERE id = ?", (id,)).fetchone() is not None
            )

        unlisted = 0
        for id in sizes.keys() - rows.keys():
            unlisted += _remove_unlocked(self._files / id, unless=listed(id))
        if unlisted:
            logger.warning("storage: removed %d files that had no row (a process died)", unlisted)

    def _expire(self, now: float) -> set[str]:
        removed = set()
        for entry in _scan(self._uploads):
            id = entry.name.removesuffix(".json")
            if entry.name == id or not valid_id(id):
                continue
            with contextlib.suppress(UploadNotFound):  # unreadable: a leftover
                if not expired(self._read_state(id), now):
                    continue
            # An append in progress holds the lock (and will push `expires`
            # forward): leave that upload alone.
            try:
                fd = os.open(self._uploads / id, os.O_WRONLY)
            except FileNotFoundError:
                fd = None
            try:
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                self._remove_upload(id)
                removed.add(id)
            finally:
                if fd is not None:
                    os.close(fd)
        self._sweep(now)
        return removed

    def _sweep(self, now: float) -> None:
        """Remove what processes that died (or writes that failed) left behind.

        Several worker processes may share the folder, so nothing in use may
        go. A save's temporary file is locked (flock) by the process writing
        it until it is renamed: one nobody holds locked is a leftover,
        however new (the kernel drops a dead process's locks, kill -9 too),
        and one being written is left alone however old (a slow client). An
        upload's state is written before its bytes' file is made, so bytes
        without a state are a leftover too, unless an append holds them
        locked. A state being written has no lock but lives for milliseconds:
        one older than `STALE_STATE` is a leftover.
        """
        for entry in _scan(self._tmp):
            _remove_unlocked(Path(entry.path))
        for entry in _scan(self._uploads):
            name = entry.name
            if valid_id(name):
                if not (self._uploads / f"{name}.json").exists():
                    _remove_unlocked(Path(entry.path))
            elif ".json." in name:
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < now - STALE_STATE:
                        os.unlink(entry.path)


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an index file made by an older version up to `_SCHEMA`.

    Files stored before uploads had owners keep none (NULL): with access
    control on, only `read` and admin reach them.
    """
    columns = {row[1] for row in db.execute("PRAGMA table_info(files)")}
    # Files stored before blobs expired never expire (NULL).
    for column, kind in (("owner", "TEXT"), ("expires", "REAL")):
        if column in columns:
            continue
        # Several processes may open the same old index at once: the one that
        # loses the race finds the column there already.
        try:
            db.execute(f"ALTER TABLE files ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise


def _insert(db: sqlite3.Connection, info: FileInfo) -> None:
    db.execute(
        f"INSERT INTO files ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            info.id,
            info.name,
            info.size,
            info.type,
            info.sha256,
            info.created,
            info.owner,
            info.expires,
        ),
    )


def _remove_unlocked(path: Path, unless: Callable[[], bool] | None = None) -> bool:
    """Remove a file unless a process holds it locked (flock), or `unless()` says
    (asked while it is locked here); whether it was removed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # in use
        if unless is not None and unless():
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    finally:
        os.close(fd)


def _sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _scan(folder: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            yield from entries
    except FileNotFoundError:
        return
