"""File transfers for `Client` and `AsyncClient`: upload, download, find.

Each transfer is written once, as a generator that yields the HTTP calls it
needs (`_Call`) and is sent their responses back ("sans-I/O"). `_run` and
`_arun` are the only code that touches the network, a dozen lines each, so
the sync and async clients cannot drift apart. Local files move 1 MiB at a
time, in a thread beside the network: an upload reads and hashes the next
block while this one is sent, a download hashes and writes one while the
next is received (the async client also takes each upload step in a thread,
off the event loop).

Uploads. A file smaller than `tus_threshold`, or one whose size cannot be
known (a pipe), goes up in one multipart `POST /files` (framed here: see
`multipart_head`). A larger one goes by
tus (`/uploads/`) in `chunk_size` PATCHes, and its upload URL is remembered
in an `UploadStore` under the file's fingerprint: the same upload run again,
after a crash or from another process, goes on from where the server got to.
We speak tus ourselves on httpx rather than use tuspy, which would bring in
requests and aiohttp for three request types.

Downloads write `<name>.part` and rename it only once its sha256 is the
file's; a `.part` left by an interrupted download is continued with `Range`
and `If-Range`, so a file that changed on the server is sent whole instead.

Both check the sha256 the server reports against the bytes on this side,
hashed as they pass; only the part a resumed transfer had moved before is
read again, to hash it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, TypeAlias, TypeVar
from urllib.parse import urljoin

import httpx

from ..storage import valid_id
from .exceptions import (
    ChecksumMismatch,
    HTTPStatusError,
    ProtocolError,
    TidewireError,
    raise_for_status,
    status_error,
    translate,
)

__all__ = [
    "Progress",
    "Source",
    "UploadStore",
    "adownload",
    "afind",
    "aupload",
    "default_store_path",
    "destination",
    "download",
    "find",
    "fingerprint",
    "safe_name",
    "tus_create_headers",
    "upload",
]

logger = logging.getLogger("tidewire")

Progress: TypeAlias = Callable[[int, int | None], None]
"""`progress(done, total)`: bytes moved so far, and the size when known."""

Source: TypeAlias = "str | os.PathLike[str] | IO[bytes]"

T = TypeVar("T")

TUS = {"Tus-Resumable": "1.0.0"}
OFFSET_STREAM = "application/offset+octet-stream"
FILE_HEADER = "tidewire-file"
#: Local reads and writes: large enough that per-chunk costs vanish, small
#: enough that memory stays flat.
IO_CHUNK = 1 << 20
#: Progress is reported about this often (and once at the end).
PROGRESS_STEP = 256 << 10
#: How much of each end of a file its fingerprint reads.
FINGERPRINT_SPAN = 64 << 10
#: 409s in a row (someone else moving the upload on) before giving up.
MAX_CONFLICTS = 3
#: Bytes per tus PATCH. Each PATCH waits for its answer before the next one
#: starts, so small ones cost round trips; the body is streamed 1 MiB at a
#: time, so a large one costs no memory, and the server keeps what arrived
#: of a PATCH that is cut off, so it costs nothing on resume either.
PATCH_SIZE = 32 << 20
#: Files of this size or more go up by tus, resumably; smaller ones in one POST.
TUS_THRESHOLD = 8 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# -- progress --------------------------------------------------------------


class _Ticker:
    """Calls `progress` about every `PROGRESS_STEP` bytes, and at the end with done == total."""

    def __init__(self, progress: Progress | None, total: int | None) -> None:
        self.progress = progress
        self.total = total
        self._last: int | None = None

    def __call__(self, done: int) -> None:
        last = self._last
        if self.progress is None or done == last:
            return
        if last is None or abs(done - last) >= PROGRESS_STEP or done == self.total:
            self._last = done
            self.progress(done, self.total)

    def end(self, done: int) -> None:
        # An unknown total is known at the end: the last call says so.
        unknown = self.total is None
        self.total = done
        if self.progress is not None and (self._last != done or unknown):
            self._last = done
            self.progress(done, self.total)


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


class _Source:
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
    def open(cls, source: Source, *, name: str | None, type: str | None) -> _Source:
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

    def __enter__(self) -> _Source:
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

    def chunks(self, offset: int, length: int | None, tick: _Ticker) -> Iterator[bytes]:
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

    def multipart(self, boundary: str, tick: _Ticker) -> Iterator[bytes]:
        """The whole file as a one-file multipart body (of a pipe: to its end)."""
        tick(0)
        yield multipart_head(boundary, self.name, self.type)
        yield from self.chunks(0, self.size, tick)
        yield multipart_tail(boundary)

    def multipart_headers(self, boundary: str) -> dict[str, str]:
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        if self.size is not None:
            head = multipart_head(boundary, self.name, self.type)
            length = len(head) + self.size + len(multipart_tail(boundary))
            headers["Content-Length"] = str(length)
        return headers

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


def multipart_head(boundary: str, name: str, type: str | None) -> bytes:
    """The start of a one-file `multipart/form-data` body, up to the file's first byte.

    We frame the body ourselves, rather than through httpx's `files=`, for
    two reasons: the name goes as a quoted-string with backslash escapes,
    where httpx writes a `"` as `%22` (the HTML5 way, which no server can tell
    from a name with "%22" in it); and a file's body has a Content-Length and
    goes in 1 MiB reads rather than chunked in 64 KiB ones.
    """
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
        f"Content-Type: {type or 'application/octet-stream'}\r\n\r\n"
    ).encode()


def multipart_tail(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode()


# -- tus (headers and answers; pure) ---------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def tus_create_headers(length: int, name: str, type: str | None) -> dict[str, str]:
    """The headers of a tus creation `POST` for a file of `length` bytes."""
    metadata = [f"filename {_b64(name)}"]
    if type:
        metadata.append(f"filetype {_b64(type)}")
    return {**TUS, "Upload-Length": str(length), "Upload-Metadata": ",".join(metadata)}


def tus_patch_headers(offset: int, length: int) -> dict[str, str]:
    """The headers of a `PATCH` of `length` bytes at `offset`.

    No `Upload-Checksum`: the whole file's sha256 is checked at the end
    anyway, and with a checksum the server must drop every byte of a PATCH
    that is cut off, where without one it keeps what arrived.
    """
    return {
        **TUS,
        "Content-Type": OFFSET_STREAM,
        "Upload-Offset": str(offset),
        "Content-Length": str(length),
    }


@dataclass(frozen=True, slots=True)
class TusState:
    """Where an upload is: `offset` bytes stored; `file` is its file's id once complete."""

    offset: int
    file: str | None = None
    length: int | None = None


def tus_state(response: httpx.Response, *, default: int | None = None) -> TusState:
    """The state a tus answer reports (after `raise_for_status`)."""
    header = response.headers.get("upload-offset")
    if header is None and default is not None:
        offset = default
    else:
        try:
            offset = int(header or "")
        except ValueError:
            raise ProtocolError(
                f"{response.request.method} {response.request.url} answered"
                f" {response.status_code} without a valid Upload-Offset ({header!r})"
            ) from None
    length = response.headers.get("upload-length", "")
    return TusState(
        offset,
        response.headers.get(FILE_HEADER) or None,
        int(length) if length.isascii() and length.isdigit() else None,
    )


def tus_location(response: httpx.Response) -> str:
    """The absolute URL of the upload a creation `POST` made."""
    location = response.headers.get("location")
    if response.status_code != 201 or not location:
        raise ProtocolError(
            f"POST {response.request.url} answered {response.status_code}"
            " without the new upload's Location: is this a tus server?"
        )
    # Relative to the request (the server may be mounted under a prefix).
    return str(urljoin(str(response.request.url), location))


# -- where a download goes (pure) ------------------------------------------

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


class _Sink(Protocol):
    def write(self, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class _Wanted:
    """The file a download is after, from its metadata."""

    id: str
    name: str
    size: int
    sha256: str

    @classmethod
    def of(cls, meta: dict[str, Any]) -> _Wanted:
        try:
            wanted = cls(str(meta["id"]), str(meta["name"]), int(meta["size"]), meta["sha256"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"not a file's metadata: {meta!r:.200}") from None
        if not valid_id(wanted.id):  # the sha256 is checked by _file_meta
            raise ProtocolError(f"not a file's metadata: {meta!r:.200}")
        return wanted


class _Part:
    """`<target>.part`: the bytes so far, hashed; renamed to `target` once complete and right.

    With `resume`, an existing `.part` is kept and hashed (it is asked to be
    continued with `Range`); a server that sends the whole file instead gets
    it written from the start. An error leaves the `.part` for next time,
    except a checksum mismatch, which leaves nothing.
    """

    def __init__(self, target: Path, wanted: _Wanted, *, resume: bool, tick: _Ticker) -> None:
        self.target = target
        self.path = target.with_name(target.name + ".part")
        self.wanted = wanted
        self.tick = tick
        self.accepted = False
        self._sha = hashlib.sha256()
        self.done = 0
        self.file: IO[bytes]
        # Hashing and writing go to a thread, a block at a time with one
        # block in flight: they run while this thread receives the next block.
        # Done inline, they took turns with receiving.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tidewire-download")
        self._writing: Future[None] | None = None
        self._block: list[bytes] = []
        self._block_size = 0
        if resume and self.path.is_file():
            self.file = self.path.open("r+b")
            while data := self.file.read(IO_CHUNK):
                self._sha.update(data)
                self.done += len(data)
            if self.done > wanted.size:  # not a part of this file
                self._restart()
        else:
            self.file = self.path.open("wb")
        tick(self.done)

    def __enter__(self) -> _Part:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._drain()  # what was received is kept for a resume, even after an error
        finally:
            self._writer.shutdown()
            self.file.close()

    def request_headers(self) -> dict[str, str]:
        # Ranges of an encoded body would be ranges of the encoding.
        headers = {"Accept-Encoding": "identity"}
        if self.done:
            headers["Range"] = f"bytes={self.done}-"
            # The ETag is the sha256: if the file changed, a 200 sends it whole.
            headers["If-Range"] = f'"{self.wanted.sha256}"'
        return headers

    def accept(self, response: httpx.Response) -> _Sink | None:
        """Whether the answer's body is to be written here (else it is an error)."""
        if response.status_code == 206 and self.done:
            if _range_start(response) != self.done:
                raise ProtocolError(
                    f"asked for bytes {self.done}- of {self.wanted.id}, got"
                    f" {response.headers.get('content-range')!r}"
                )
        elif response.status_code == 200:
            self._restart()
        else:
            return None
        self.accepted = True
        return self

    def write(self, data: bytes) -> None:
        if self.done + len(data) > self.wanted.size:
            raise ProtocolError(
                f"the server sent more than the {self.wanted.size} bytes of {self.wanted.id}"
            )
        self.done += len(data)
        self._block.append(data)
        self._block_size += len(data)
        if self._block_size >= IO_CHUNK:
            self._flush()
        self.tick(self.done)

    def _flush(self) -> None:
        self._wait()  # one block in flight: memory stays flat
        block, self._block, self._block_size = self._block, [], 0
        self._writing = self._writer.submit(self._keep, block)

    def _keep(self, pieces: list[bytes]) -> None:
        # In the writer thread, in order. One hash and one write per block:
        # each lets go of the GIL once, where sixteen 64 KiB pieces had to win
        # it back sixteen times from the thread that parses the response.
        block = b"".join(pieces)
        self._sha.update(block)
        self.file.write(block)

    def _wait(self) -> None:
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def _drain(self) -> None:
        if self._block:
            self._flush()
        self._wait()

    def finish(self) -> Path:
        self._drain()
        self.file.close()
        if self.done != self.wanted.size:
            raise ProtocolError(
                f"got {self.done} of the {self.wanted.size} bytes of {self.wanted.id};"
                " download again to continue"
            )
        actual = self._sha.hexdigest()
        if actual != self.wanted.sha256:
            self.path.unlink(missing_ok=True)
            raise ChecksumMismatch(str(self.target), self.wanted.sha256, actual)
        os.replace(self.path, self.target)
        self.tick.end(self.done)
        return self.target

    def _restart(self) -> None:
        self._drain()
        if self.done:
            # Only when there is something to drop: ext4 flushes a file that
            # was truncated to nothing to disk when it is closed (auto_da_alloc),
            # which cost a fresh 1 GiB download a third of a second.
            self.file.seek(0)
            self.file.truncate()
        self._sha = hashlib.sha256()
        self.done = 0


def _range_start(response: httpx.Response) -> int | None:
    header = response.headers.get("content-range", "")
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", header)
    return int(match.group(1)) if match else None


# -- the flows (no network I/O) --------------------------------------------


@dataclass(frozen=True, slots=True)
class _Call:
    """One HTTP request a flow needs made."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] | None = None
    content: bytes | Iterator[bytes] | None = None
    #: Streams the answer: called with it (body unread), says where the body
    #: goes; None (or no `into`) reads it whole.
    into: Callable[[httpx.Response], _Sink | None] | None = None


Flow: TypeAlias = Generator[_Call, httpx.Response, T]


def _json(response: httpx.Response) -> Any:
    raise_for_status(response)
    try:
        return response.json()
    except ValueError:
        raise ProtocolError(
            f"{response.request.method} {response.request.url} did not answer JSON"
        ) from None


def _file_meta(value: Any, response: httpx.Response) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("sha256"), str):
        raise ProtocolError(
            f"{response.request.method} {response.request.url} did not answer a file's metadata"
        )
    return value


def _upload_flow(
    source: _Source,
    *,
    server: str,
    progress: Progress | None,
    tus_threshold: int,
    chunk_size: int,
    store: UploadStore | None,
) -> Flow[dict[str, Any]]:
    if chunk_size < 1 or tus_threshold < 0:
        raise ValueError("chunk_size must be positive and tus_threshold not negative")
    tick = _Ticker(progress, source.size)
    if source.size is None or source.size < tus_threshold:
        boundary = secrets.token_hex(16)
        response = yield _Call(
            "POST",
            "/files",
            headers=source.multipart_headers(boundary),
            content=source.multipart(boundary, tick),
        )
        answer = _json(response)
        if not isinstance(answer, list) or len(answer) != 1:
            raise ProtocolError(f"POST {response.request.url} did not answer [metadata]")
        meta = _file_meta(answer[0], response)
    else:
        key = f"{server.rstrip('/')} {source.fingerprint()}"
        file_id = yield from _tus_flow(source, key, store or UploadStore(), chunk_size, tick)
        response = yield _Call("GET", f"/files/{file_id}/meta")
        meta = _file_meta(_json(response), response)
    expected = source.sha256()
    if meta["sha256"] != expected or meta.get("size") != source.hashed:
        where = f"{source.label} as stored on the server (file {meta.get('id')})"
        raise ChecksumMismatch(where, expected, meta["sha256"])
    tick.end(source.hashed)
    return meta


def _tus_flow(
    source: _Source, key: str, store: UploadStore, chunk_size: int, tick: _Ticker
) -> Flow[str]:
    """Upload `source` by tus, resuming a remembered upload; the new file's id."""
    size = source.size
    assert size is not None
    state: TusState | None = None
    url = store.get(key)
    if url is not None:
        state = yield from _tus_head(url)
        if state is None or state.length not in (None, size):
            # Expired, or finished and forgotten, or (a fingerprint that
            # collided) not an upload of this size: start anew.
            state = None
            store.remove(key)
    if state is None or url is None:
        response = yield _Call(
            "POST", "/uploads/", headers=tus_create_headers(size, source.name, source.type)
        )
        raise_for_status(response)
        url = tus_location(response)
        store.put(key, url)
        state = tus_state(response, default=0)
    conflicts = 0
    while state.file is None:
        if state.offset >= size:
            raise ProtocolError(f"{url} has all {size} bytes but names no file ({FILE_HEADER})")
        tick(state.offset)
        length = min(chunk_size, size - state.offset)
        response = yield _Call(
            "PATCH",
            url,
            headers=tus_patch_headers(state.offset, length),
            content=source.chunks(state.offset, length, tick),
        )
        if response.status_code == 409 and conflicts < MAX_CONFLICTS:
            # Not where we thought: another process resuming the same file,
            # or a PATCH whose answer was lost. Ask where it is, and go on.
            conflicts += 1
            state = yield from _tus_head(url)
            if state is None:
                raise status_error(response)
            continue
        if response.status_code in (404, 410):
            store.remove(key)  # gone: the next try starts anew
        raise_for_status(response)
        state = tus_state(response)
        conflicts = 0
    store.remove(key)
    return state.file


def _tus_head(url: str) -> Flow[TusState | None]:
    """Where the upload at `url` is; None if the server no longer has it."""
    response = yield _Call("HEAD", url, headers=dict(TUS))
    if response.status_code in (404, 410):
        return None
    raise_for_status(response)
    return tus_state(response)


def _find_flow(id_or_name: str) -> Flow[dict[str, Any]]:
    """A file's metadata: by id, else the newest file of that name."""
    if not isinstance(id_or_name, str) or not id_or_name:
        raise ValueError("name the file: its id or its name")
    missing: HTTPStatusError | None = None
    if valid_id(id_or_name):
        response = yield _Call("GET", f"/files/{id_or_name}/meta")
        if response.status_code != 404:
            return _file_meta(_json(response), response)
        missing = status_error(response)  # perhaps a name that looks like an id
    response = yield _Call("GET", "/files", params={"name": id_or_name})
    answer = _json(response)
    # Compared here too: a server without `?name=` answers the whole list.
    named = [
        meta
        for meta in (answer if isinstance(answer, list) else [])
        if isinstance(meta, dict) and meta.get("name") == id_or_name
    ]
    if named:
        return _file_meta(named[0], response)
    if missing is not None:
        raise missing
    raise HTTPStatusError(
        404,
        f"no file has the id or name {id_or_name!r}; files() lists them",
        method="GET",
        url=str(response.request.url),
    )


def _download_flow(
    id_or_name: str,
    dest: str | os.PathLike[str] | None,
    *,
    resume: bool,
    progress: Progress | None,
) -> Flow[Path]:
    wanted = _Wanted.of((yield from _find_flow(id_or_name)))
    target = destination(dest, wanted.name)
    with _Part(target, wanted, resume=resume, tick=_Ticker(progress, wanted.size)) as part:
        if part.done < wanted.size:
            response = yield _Call(
                "GET", f"/files/{wanted.id}", headers=part.request_headers(), into=part.accept
            )
            if not part.accepted:
                raise_for_status(response)
                raise ProtocolError(
                    f"GET {response.request.url} answered {response.status_code}, not the file"
                )
        return part.finish()


# -- the I/O loops ---------------------------------------------------------


def _run(http: httpx.Client, flow: Flow[T]) -> T:
    try:
        call = next(flow)
        while True:
            call = flow.send(_send(http, call))
    except StopIteration as stop:
        result: T = stop.value
        return result
    finally:
        flow.close()


def _send(http: httpx.Client, call: _Call) -> httpx.Response:
    with translate():
        request = http.build_request(
            call.method,
            call.url,
            headers=call.headers,
            params=call.params,
            content=call.content,
        )
        response = http.send(request, stream=call.into is not None)
        if call.into is not None:
            try:
                sink = call.into(response)
                if sink is None:
                    response.read()
                else:
                    for data in response.iter_bytes():
                        sink.write(data)
            finally:
                response.close()
        return response


async def _arun(http: httpx.AsyncClient, flow: Flow[T]) -> T:
    try:
        call = next(flow)
        while True:
            call = flow.send(await _asend(http, call))
    except StopIteration as stop:
        result: T = stop.value
        return result
    finally:
        flow.close()


async def _asend(http: httpx.AsyncClient, call: _Call) -> httpx.Response:
    with translate():
        content = call.content
        request = http.build_request(
            call.method,
            call.url,
            headers=call.headers,
            params=call.params,
            # httpx takes only async iterators as an async client's body.
            content=_aiter(content) if isinstance(content, Iterator) else content,
        )
        response = await http.send(request, stream=call.into is not None)
        if call.into is not None:
            try:
                sink = call.into(response)
                if sink is None:
                    await response.aread()
                else:
                    async for data in response.aiter_bytes():
                        sink.write(data)
            finally:
                await response.aclose()
        return response


async def _aiter(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    # Each step reads the file (and may wait for the read ahead): in a
    # thread, so that the event loop goes on meanwhile.
    try:
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


# -- the public twins ------------------------------------------------------


def upload(
    http: httpx.Client,
    source: Source,
    *,
    name: str | None = None,
    type: str | None = None,
    progress: Progress | None = None,
    tus_threshold: int = TUS_THRESHOLD,
    chunk_size: int = PATCH_SIZE,
    resume_store: UploadStore | None = None,
) -> dict[str, Any]:
    """Upload a file (a path, or a file object opened with 'rb'); its metadata.

    Files of `tus_threshold` bytes or more go by tus, resumably: run the same
    upload again after an interruption, even from another process, and it
    goes on from where the server got to. The sha256 the server reports is
    checked against the bytes read here (`ChecksumMismatch`).
    """
    with _Source.open(source, name=name, type=type) as src:
        return _run(
            http,
            _upload_flow(
                src,
                server=str(http.base_url),
                progress=progress,
                tus_threshold=tus_threshold,
                chunk_size=chunk_size,
                store=resume_store,
            ),
        )


async def aupload(
    http: httpx.AsyncClient,
    source: Source,
    *,
    name: str | None = None,
    type: str | None = None,
    progress: Progress | None = None,
    tus_threshold: int = TUS_THRESHOLD,
    chunk_size: int = PATCH_SIZE,
    resume_store: UploadStore | None = None,
) -> dict[str, Any]:
    """`upload`, for an async client."""
    with _Source.open(source, name=name, type=type) as src:
        return await _arun(
            http,
            _upload_flow(
                src,
                server=str(http.base_url),
                progress=progress,
                tus_threshold=tus_threshold,
                chunk_size=chunk_size,
                store=resume_store,
            ),
        )


def download(
    http: httpx.Client,
    id_or_name: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    resume: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Download a file, by id or (the newest of that) name; the path written.

    `dest`: a folder (the file keeps a safe form of its name), or a file's
    path; by default the current folder. The bytes go to `<path>.part`, which
    becomes `<path>` once its sha256 is right (else `ChecksumMismatch`, and
    the `.part` is removed). With `resume`, a `.part` left by an interrupted
    download is continued rather than started again.
    """
    return _run(http, _download_flow(id_or_name, dest, resume=resume, progress=progress))


async def adownload(
    http: httpx.AsyncClient,
    id_or_name: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    resume: bool = True,
    progress: Progress | None = None,
) -> Path:
    """`download`, for an async client."""
    return await _arun(http, _download_flow(id_or_name, dest, resume=resume, progress=progress))


def find(http: httpx.Client, id_or_name: str) -> dict[str, Any]:
    """A file's metadata, by id or (the newest of that) name; `HTTPStatusError` 404 if none."""
    return _run(http, _find_flow(id_or_name))


async def afind(http: httpx.AsyncClient, id_or_name: str) -> dict[str, Any]:
    """`find`, for an async client."""
    return await _arun(http, _find_flow(id_or_name))
