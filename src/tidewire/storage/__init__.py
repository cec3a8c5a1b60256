"""Storage keeps files: their bytes and, beside them, their metadata.

Ids are made by the storage, never taken from a request; a name is only a
label. An id that is not of the storage's own shape is simply not found, so
no request can name a path on disk or a key outside the storage's prefix.

Files come in two ways. `save` streams a whole body (multipart, `PUT`) into
a new file in one go. A resumable upload (tus) is an `Upload` that grows by
`append` across requests, perhaps across processes, and becomes a file when
its last byte arrives. Either way, a file is listed only once it is
complete, and failed writes leave nothing behind.

    Storage
      LocalStorage   a folder: ./data by default            (storage/local.py)
      S3Storage      S3-compatible object storage           (storage/s3.py)

Both take their resumable uploads from one algorithm (storage/_uploads.py)
and write bodies in large blocks (storage/_blocks.py).

Errors, all `StorageError`:

    FileNotFound       no such file (or malformed id)       -> 404
    UploadNotFound     no such resumable upload             -> 404
    TooLarge           over the size limit or the declared  -> 413
                       length; the data is discarded
    OffsetMismatch     a resumable append at the wrong      -> 409
                       offset
    BadChecksum        an append's bytes do not match its   -> 460 (tus)
                       checksum; they are discarded
    StorageFull        out of space (on the disk, in the    -> 507
                       index, a quota); its message says
                       what was not done
    StorageUnavailable the index could not be written now   -> 503
                       (locked, an I/O error); nothing was
                       done: try the same request again
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "BadChecksum",
    "FileInfo",
    "FileNotFound",
    "OffsetMismatch",
    "Page",
    "Storage",
    "StorageError",
    "StorageFull",
    "StorageUnavailable",
    "TooLarge",
    "Upload",
    "UploadNotFound",
    "new_id",
    "valid_id",
]


class StorageError(Exception):
    """Something a client can act on went wrong in storage."""


class FileNotFound(StorageError):
    pass


class UploadNotFound(StorageError):
    pass


class TooLarge(StorageError):
    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class OffsetMismatch(StorageError):
    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset  # where the upload really is


class BadChecksum(StorageError):
    pass


class StorageFull(StorageError):
    pass


class StorageUnavailable(StorageError):
    """The storage could not do it now (its index locked or failing); nothing
    was done, and the same request may be made again. Its message says what."""


# Ids: 10 characters that sort newest first (a countdown of milliseconds),
# then 12 random ones; lower-case base32, so always safe in a path or a key,
# and listing by id is listing newest first. Within one process, an id made
# in the same millisecond as the last one takes that one's random part minus
# one (as monotonic ULIDs do), so it still sorts first.
_ALPHABET = "0123456789abcdefghijklmnopqrstuv"
_ID = re.compile(r"[0-9a-v]{22}\Z")
_COUNTDOWN = 1 << 50
_last = (-1, 0)  # the last id made here: (milliseconds, random part)
_last_lock = threading.Lock()


def new_id(now: float | None = None) -> str:
    """A fresh id: ids made later sort before ids made earlier."""
    global _last
    ms = int((time.time() if now is None else now) * 1000)
    with _last_lock:
        last_ms, last_random = _last
        same = ms == last_ms and last_random > 0
        random = last_random - 1 if same else secrets.randbits(60)
        _last = (ms, random)
    n = ((_COUNTDOWN - 1 - ms) << 60) | random
    return "".join(_ALPHABET[(n >> shift) & 31] for shift in range(105, -1, -5))


def valid_id(id: str) -> bool:
    """Whether `id` has the shape of an id this storage makes (files and uploads alike)."""
    return _ID.match(id) is not None


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A stored file's metadata, as `GET /files/{id}/meta` gives it."""

    id: str
    name: str
    size: int
    type: str
    sha256: str
    created: float  # seconds since the epoch
    #: The `sub` of the identity that uploaded it (None: access control was
    #: off). It decides `read:own` and `delete`; not in the public metadata,
    #: so that listing files does not list who else uses the server.
    owner: str | None = None
    #: When the storage's sweep (`expire_files`) deletes it, in seconds since
    #: the epoch (None: never). Blobs that events carry expire with the events
    #: (blobs.py); uploaded files never do. Not in the public metadata.
    expires: float | None = None

    @property
    def url(self) -> str:
        return f"/files/{self.id}"

    @property
    def etag(self) -> str:
        # The content's own hash: the same on every backend and every worker.
        return f'"{self.sha256}"'

    def json(self) -> dict[str, Any]:
        """The public metadata: `{"id","name","size","type","sha256","created","url"}`."""
        data = asdict(self)
        del data["owner"], data["expires"]
        return {**data, "url": self.url}


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing, newest first; `next` is the cursor of the following page."""

    files: list[FileInfo]
    next: str | None


@dataclass(frozen=True, slots=True)
class Upload:
    """A resumable upload: `length` bytes are expected, `offset` have arrived."""

    id: str
    length: int
    offset: int
    name: str
    type: str
    #: The tus `Upload-Metadata` header as the client sent it.
    metadata: str
    created: float
    expires: float
    #: The file's id, once the last byte has arrived.
    file: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    #: The `sub` of the identity that created it; the file it becomes is theirs.
    owner: str | None = None


class Storage(Protocol):
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
        """Stream `chunks` into a new file, uploaded by `owner`; sha256 is computed on the way.

        More than `limit` bytes raise `TooLarge`; no space raises
        `StorageFull`. Either way, or if `chunks` raises (the client went
        away), nothing of the file is left behind. With `expires` (seconds
        since the epoch), `expire_files` deletes the file once that time has
        passed; it is recorded with the file, so it holds across restarts.
        """
        ...

    async def info(self, id: str) -> FileInfo:
        """A file's metadata; `FileNotFound` for unknown or malformed ids."""
        ...

    async def find(self, name: str, *, owner: str | None = None) -> FileInfo:
        """The newest file named exactly `name` (of those `owner` uploaded, if
        given); `FileNotFound` if there is none.

        For clients that know files by name (the original service's
        `/downloadfile/`, `tidewire download NAME`); it must not scan every file.
        """
        ...

    async def list(
        self, *, limit: int, cursor: str | None = None, owner: str | None = None
    ) -> Page:
        """Files newest first, at most `limit`, after `cursor` (a `Page.next`);
        with `owner`, only the files that identity uploaded.

        A cursor that no page gave (not of an id's shape) raises `ValueError`.
        """
        ...

    async def delete(self, id: str) -> None:
        """Remove a file and its metadata; `FileNotFound` if there is none."""
        ...

    def read(self, file: FileInfo, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes `[start, end)` of a file (to its end by default), in chunks."""
        ...

    def path(self, file: FileInfo) -> Path | None:
        """The file on local disk, for zero-copy sending; None if it is remote."""
        ...

    # -- resumable uploads -----------------------------------------------

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
        """Begin a resumable upload of `length` bytes by `owner`; the file it becomes is theirs."""
        ...

    async def upload(self, id: str) -> Upload:
        """A resumable upload's state; `UploadNotFound` if unknown, malformed or expired."""
        ...

    async def append(
        self,
        id: str,
        offset: int,
        chunks: AsyncIterable[bytes],
        *,
        checksum: tuple[str, bytes] | None = None,
    ) -> Upload:
        """Add bytes at `offset`, which must be the upload's current offset.

        `checksum` is `(algorithm, digest)` of these bytes (hashlib names:
        "sha1", "sha256", "md5"): on a mismatch they are discarded and
        `BadChecksum` is raised. If `chunks` raises, the bytes that did
        arrive are kept (that is what makes the upload resumable) unless a
        checksum was given. Bytes beyond `length` raise `TooLarge`. When the
        last byte arrives, the upload becomes a file: `Upload.file` is its id.
        An algorithm hashlib does not know raises `ValueError`.

        Each append pushes `expires` forward by the lifetime the upload was
        created with, so an upload in progress does not expire midway.
        """
        ...

    async def abort(self, id: str) -> None:
        """Forget an unfinished upload and its bytes; `UploadNotFound` if there is none."""
        ...

    async def expire(self, now: float | None = None) -> int:
        """Remove uploads past their expiry; returns how many.

        Unfinished ones go with their bytes; of finished ones only the state
        goes (their file stays), after which `upload` no longer finds them.
        """
        ...

    async def set_expiry(self, id: str, expires: float) -> None:
        """Move the expiry of a file saved with one to `expires` (seconds since
        the epoch); `FileNotFound` if there is no such file. A file saved
        without an expiry (an upload) keeps none: only blobs expire.
        """
        ...

    async def expire_files(self, now: float | None = None) -> int:
        """Delete the files saved with an `expires` that is past; returns how many.

        It finds them by an index of expiry times (never by reading every
        file's metadata), so it is cheap to run often.
        """
        ...

    async def ping(self) -> None:
        """Return once the storage answers; raise if it cannot be reached
        (`/readyz` bounds the wait)."""
        ...

    async def aclose(self) -> None:
        """Release connections and other resources."""
        ...


def from_url(url: str | None, *, data_dir: str | os.PathLike[str] | None = None) -> Storage:
    """The storage a URL names: `s3://bucket[/prefix]?endpoint=URL&region=R`, or a folder.

    With no URL, a local folder: `data_dir`, else `./data`.
    """
    if url and url.startswith("s3://"):
        try:
            from .s3 import S3Storage
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                f"S3 storage needs {exc.name!r}: pip install 'tidewire[s3]'"
            ) from exc
        return S3Storage.from_url(url)
    from .local import LocalStorage

    if url:
        folder = url.removeprefix("file://")
        return LocalStorage(Path(folder))
    return LocalStorage(Path(data_dir) if data_dir is not None else Path("data"))
