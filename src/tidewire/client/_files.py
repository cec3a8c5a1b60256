"""The local side of file transfers: everything that touches the disk or a thread.

`SourceFile` reads (and hashes) the bytes an upload sends, `UploadStore`
remembers unfinished tus uploads, `PartFile` hashes and writes a download
into `<name>.part`, and `safe_name` / `destination` say where a download may
go. Local files move 1 MiB at a time, in a thread beside the network: an
upload reads and hashes the next block while this one is sent, a download
hashes and writes one while the next is received.

Nothing here speaks HTTP: `_transfers` does. With `AsyncClient` it calls all
of this from a thread, off the event loop, but for `PartFile.write`, which
only hands blocks to the writer thread and says when to wait for it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeAlias

from .exceptions import ChecksumMismatch, ProtocolError, TidewireError

__all__ = [
    "IO_CHUNK",
    "PartFile",
    "Source",
    "SourceFile",
    "UploadStore",
    "default_store_path",
    "destination",
    "fingerprint",
    "safe_name",
]

logger = logging.getLogger("tidewire")

Source: TypeAlias = "str | os.PathLike[str] | IO[bytes]"
"""What `upload` takes: a path, or a file opened with 'rb'."""

#: Local reads and writes: large enough that per-chunk costs vanish, small
#: enough that memory stays flat.
IO_CHUNK = 1 << 20
#: A download's blocks go to the disk in write(2)s of this size: on Linux 6.x
#: (ext4, page cache) writes of 1 MiB cost 3 to 6 times the kernel time per
#: GiB of writes of 64 KiB (0.9-1.9 s against 0.3 s; curl writes 16 KiB),
#: far more than the GIL hand-backs of 16 writes a block cost.
WRITE_SIZE = 64 << 10
#: How much of each end of a file its fingerprint reads.
FINGERPRINT_SPAN = 64 << 10
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# -- the resume store ------------------------------------------------------


def default_store_path() -> Path:
    """`$XDG_CACHE_HOME/tidewire/uploads.json`, else `~/.cache/tidewire/uploads.json`."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative path is to be ignored.
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return base / "tidewire" / "uploads.json"


class UploadStore:
    """Where unfinished tus uploads are remembered: a small JSON file.

    `{key: {"url": <upload URL>, "time": <Unix seconds>}}`, the key naming the
    server and the file's fingerprint. An entry goes when its upload
    completes; entries older than `max_age` are dropped on the next write
    (the server forgets unfinished uploads after a day by default).

    The store is only a help: a missing, unreadable or corrupt file reads as
    empty, and a write that fails is logged and forgotten, so the upload
    goes on (it just cannot be resumed). Writes replace the file whole
    (temporary file + `os.replace`), so a crash never leaves half of one.
    Two processes writing at once may lose one of their entries; that costs
    a resume, never a wrong file (the final sha256 check would catch it).
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, max_age: float = 7 * 86400
    ) -> None:
        self.path = Path(path) if path is not None else default_store_path()
        self.max_age = max_age

    def __repr__(self) -> str:
        return f"UploadStore({str(self.path)!r})"

    def get(self, key: str) -> str | None:
        entry = self._load().get(key)
        url = entry.get("url") if isinstance(entry, dict) else None
        return url if isinstance(url, str) else None

    def put(self, key: str, url: str) -> None:
        now = time.time()
        entries = {
            k: v
            for k, v in self._load().items()
            if isinstance(v, dict) and _number(v.get("time")) > now - self.max_age
        }
        entries[key] = {"url": url, "time": now}
        self._save(entries)

    def remove(self, key: str) -> None:
        entries = self._load()
        if entries.pop(key, None) is not None:
            self._save(entries)

    def _load(self) -> dict[str, Any]:
        try:
            entries = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def _save(self, entries: dict[str, Any]) -> None:
        tmp: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".uploads-", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(entries, out)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning(
                "cannot write %s (%s): this upload will not be resumable", self.path, exc
            )
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


# -- the file being uploaded -----------------------------------------------


def fingerprint(
    file: IO[bytes], *, start: int, size: int, name: str, mtime_ns: int | None = None
) -> str:
    """What identifies a file for resuming its upload: a hex digest.

    Its size, name and modification time, and the first and last 64 KiB of
    its bytes (from `start`): cheap for any size, and a file edited since
    gets a new fingerprint, hence a new upload rather than a spliced one.
    The file's position is left where it was.
    """
    digest = hashlib.sha256(json.dumps([size, name, mtime_ns]).encode())
    position = file.tell()
    try:
        for offset in sorted({0, max(size - FINGERPRINT_SPAN, 0)}):
            file.seek(start + offset)
            digest.update(file.read(min(FINGERPRINT_SPAN, size - offset)))
    finally:
        file.seek(position)
    return digest.hexdigest()


def _seekable(file: IO[bytes]) -> bool:
    try:
        return bool(file.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _default_name(file: IO[bytes]) -> str:
    # A file object's name may be a path, a descriptor number, or "<stdin>".
    name = getattr(file, "name", None)
    if isinstance(name, str) and not (name.startswith("<") and name.endswith(">")):
        return os.path.basename(name) or "upload"
    return "upload"


class SourceFile:
    """The bytes being uploaded (from the file's position on), hashed as they are read.

    Reads may go back (a tus upload resumed at an earlier offset); each byte
    is hashed once, the first time it is read, and `sha256()` reads whatever
    was never read (the part a resumed upload had sent before).
    """

    def __init__(
        self, file: IO[bytes], *, name: str, type: str | None, owned: bool, label: str
    ) -> None:
        if isinstance(file, io.TextIOBase):
            raise TypeError(f"{label} is open in text mode: open it with 'rb'")
        # They go into headers: a line break would end one (and the server refuses them).
        for what, value in (("name", name), ("type", type)):
            if value is not None and (not value.strip() or _CONTROL.search(value)):
                raise ValueError(
                    f"{label}: the file {what} {value!r} is empty or has control characters;"
                    f" pass {what}=... to upload it under another"
                )
        self.file = file
        self.name = name
        self.type = type
        self.label = label
        self._owned = owned
        seekable = _seekable(file)
        self.start = file.tell() if seekable else 0
        self.size: int | None = None
        self.mtime_ns: int | None = None
        if seekable:
            self.size = file.seek(0, os.SEEK_END) - self.start
            file.seek(self.start)
            try:
                stat = os.fstat(file.fileno())
                self.mtime_ns = stat.st_mtime_ns
            except (AttributeError, OSError, ValueError):
                pass  # a BytesIO, say: no time to go by
        self._pos = 0
        self._hashed = 0
        self._sha = hashlib.sha256()
        # The next block is read and hashed in a thread while this one is
        # sent: done in turn, reading, hashing and sending left the server
        # waiting for about half the time.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="tidewire-upload")
        self._ahead: Future[bytes] | None = None

    @classmethod
    def open(cls, source: Source, *, name: str | None, type: str | None) -> SourceFile:
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            if path.is_dir():
                raise IsADirectoryError(f"{path} is a folder: upload its files one by one")
            file = path.open("rb")
            try:
                return cls(file, name=name or path.name, type=type, owned=True, label=str(path))
            except BaseException:
                file.close()
                raise
        if not hasattr(source, "read"):
            raise TypeError(
                f"upload takes a path or a file opened with 'rb', not {source.__class__.__name__}"
            )
        label = name or _default_name(source)
        return cls(source, name=label, type=type, owned=False, label=label)

    def __enter__(self) -> SourceFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._settle()
        self._reader.shutdown()
        if self._owned:
            self.file.close()

    def fingerprint(self) -> str:
        assert self.size is not None
        return fingerprint(
            self.file, start=self.start, size=self.size, name=self.name, mtime_ns=self.mtime_ns
        )

    def read(self, offset: int, n: int) -> bytes:
        """Up to `n` bytes at `offset` (fewer only at the end)."""
        if offset != self._pos:
            self.file.seek(self.start + offset)
        data = self.file.read(n)
        while data and len(data) < n:  # a pipe or socket gives what it has
            more = self.file.read(n - len(data))
            if not more:
                break
            data += more
        if not isinstance(data, bytes):
            raise TypeError(f"{self.label} gives {data.__class__.__name__}: open it with 'rb'")
        self._pos = offset + len(data)
        if self._pos > self._hashed:
            self._sha.update(memoryview(data)[self._hashed - offset :])
            self._hashed = self._pos
        return data

    def chunks(
        self, offset: int, length: int | None, tick: Callable[[int], None]
    ) -> Iterator[bytes]:
        """Exactly `length` bytes from `offset` (`None`: to the end), as a request body."""
        self._settle()  # a body given up on may still have a read in flight
        self._catch_up(offset)
        end = None if length is None else offset + length
        try:
            self._read_ahead(offset, end)
            while self._ahead is not None:
                data = self._ahead.result()
                self._ahead = None
                if not data:
                    if end is None:
                        return
                    raise TidewireError(f"{self.label} got shorter while it was being uploaded")
                offset += len(data)
                self._read_ahead(offset, end)
                tick(offset)
                yield data
        finally:
            self._settle()

    def _read_ahead(self, offset: int, end: int | None) -> None:
        if end is None or offset < end:
            n = IO_CHUNK if end is None else min(IO_CHUNK, end - offset)
            self._ahead = self._reader.submit(self.read, offset, n)

    def _settle(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.exception()  # wait; what it read stays read and hashed

    def sha256(self) -> str:
        """The hex sha256 of all the bytes (reading those never read here)."""
        if self.size is not None:
            self._catch_up(self.size)
        return self._sha.hexdigest()

    @property
    def hashed(self) -> int:
        return self._hashed

    def _catch_up(self, offset: int) -> None:
        while self._hashed < offset:
            if not self.read(self._hashed, min(IO_CHUNK, offset - self._hashed)):
                raise TidewireError(f"{self.label} got shorter while it was being uploaded")


# -- where a download goes ------------------------------------------------

_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f<>:"|?*]')
_SEPARATORS = re.compile(r"[/\\]")
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{d}{i}" for d in ("com", "lpt") for i in range(10)}
#: Bytes of a name on disk: 255 is the usual limit, minus room for ".part".
MAX_LOCAL_NAME = 240


def safe_name(name: str, default: str = "download") -> str:
    """A file name that is safe to create in a folder, from a server's label.

    The label is anything up to 255 characters: `../../etc/passwd` is a fine
    name on the server. Here it keeps only its last path component, loses
    control characters and those Windows refuses, and leading dots (no
    `..`, no surprise dotfiles such as `.bashrc`) and trailing dots and
    spaces; Windows' device names get a `_` in front; a long name is cut
    (keeping its extension). Nothing left gives `default`.
    """
    base = _SEPARATORS.split(name)[-1]
    base = _UNSAFE.sub("_", base).strip(" .").lstrip(".")
    if not base:
        return default
    if base.split(".")[0].lower() in _RESERVED:
        base = "_" + base
    if len(base.encode()) > MAX_LOCAL_NAME:
        stem, dot, suffix = base.rpartition(".")
        if not dot or len(suffix.encode()) > 16:
            stem, suffix = base, ""
        room = MAX_LOCAL_NAME - len(suffix.encode()) - (1 if suffix else 0)
        stem = stem.encode()[:room].decode(errors="ignore").rstrip(" .")
        base = f"{stem}.{suffix}" if suffix else stem
    return base


def destination(dest: str | os.PathLike[str] | None, name: str) -> Path:
    """Where a download of a file labelled `name` is written.

    No `dest`: the current folder; an existing folder: in it, under
    `safe_name(name)`; anything else is the path of the file to write.
    """
    if dest is None:
        return Path.cwd() / safe_name(name)
    path = Path(dest)
    if path.is_dir():
        return path / safe_name(name)
    return path


# -- downloading into a .part file -----------------------------------------


class PartFile:
    """`<target>.part`: the bytes so far, hashed; renamed to `target` once complete and right.

    With `resume`, an existing `.part` is kept and hashed, to be continued
    (`done` bytes are there); `restart` drops them. An error leaves the
    `.part` for next time, except a checksum mismatch, which leaves nothing.
    """

    def __init__(
        self,
        target: Path,
        *,
        size: int,
        sha256: str,
        label: str,
        resume: bool,
        tick: Callable[[int], None],
    ) -> None:
        self.target = target
        self.path = target.with_name(target.name + ".part")
        self.size = size
        self.expected = sha256
        self.label = label
        self.tick = tick
        self._sha = hashlib.sha256()
        self.done = 0
        self.file: IO[bytes]
        # Hashing and writing go to a thread, a block at a time, while the
        # next block is received (done inline, they took turns with
        # receiving). The receiver waits for each block to be written before
        # it receives past the next one (see `write`): memory stays flat.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tidewire-download")
        self._writing: Future[None] | None = None
        self._block: list[bytes] = []
        self._block_size = 0
        if resume and self.path.is_file():
            self.file = self.path.open("r+b")
            while data := self.file.read(IO_CHUNK):
                self._sha.update(data)
                self.done += len(data)
            if self.done > size:  # not a part of this file
                self.restart()
        else:
            self.file = self.path.open("wb")

    def __enter__(self) -> PartFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._drain()  # what was received is kept for a resume, even after an error
        finally:
            self._writer.shutdown()
            self.file.close()

    def write(self, data: bytes) -> Future[None] | None:
        """Keep `data`. Returns the write still in flight, if any: wait for it before the next.

        The caller waits, not this method, so that `AsyncClient` can await it
        rather than hold up the event loop.
        """
        if self.done + len(data) > self.size:
            raise ProtocolError(f"the server sent more than the {self.size} bytes of {self.label}")
        self.done += len(data)
        self._block.append(data)
        self._block_size += len(data)
        backlog = self._flush() if self._block_size >= IO_CHUNK else None
        self.tick(self.done)
        return backlog

    def _flush(self) -> Future[None] | None:
        """Hand the block to the writer; the one before it, if that is still being written."""
        block, self._block, self._block_size = self._block, [], 0
        previous = self._writing
        self._writing = self._writer.submit(self._keep, previous, block)
        return previous if previous is not None and not previous.done() else None

    def _keep(self, previous: Future[None] | None, pieces: list[bytes]) -> None:
        # In the writer thread, in order, so `previous` is done: if it failed,
        # so does this block, rather than being written after a hole.
        if previous is not None:
            previous.result()
        # One hash per block: it lets go of the GIL once, where sixteen
        # 64 KiB pieces had to win it back sixteen times from the thread that
        # parses the response. (A block of one piece is not copied by join.)
        block = b"".join(pieces)
        self._sha.update(block)
        view = memoryview(block)
        for start in range(0, len(view), WRITE_SIZE):
            self.file.write(view[start : start + WRITE_SIZE])

    def _drain(self) -> None:
        if self._block:
            self._flush()
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def finish(self) -> Path:
        """Check the bytes and rename the `.part` to the target; the target."""
        self._drain()
        self.file.close()
        if self.done != self.size:
            raise ProtocolError(
                f"got {self.done} of the {self.size} bytes of {self.label};"
                " download again to continue"
            )
        actual = self._sha.hexdigest()
        if actual != self.expected:
            self.path.unlink(missing_ok=True)
            raise ChecksumMismatch(str(self.target), self.expected, actual)
        os.replace(self.path, self.target)
        return self.target

    def restart(self) -> None:
        """Drop what the `.part` has: the whole file is coming."""
        self._drain()
        if self.done:
            # Only when there is something to drop: ext4 flushes a file that
            # was truncated to nothing to disk when it is closed (auto_da_alloc),
            # which cost a fresh 1 GiB download a third of a second.
            self.file.seek(0)
            self.file.truncate()
        self._sha = hashlib.sha256()
        self.done = 0
