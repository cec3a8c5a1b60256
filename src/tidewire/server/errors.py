"""Storage errors as HTTP errors: the one table of statuses and messages.

The storage raises `StorageError`s in its own terms (storage/__init__.py
lists them); a client needs a status and a sentence that says what to do.
The file routes and tus both answer through this table, so a full disk or an
oversized file reads the same whichever way the bytes came. Some errors only
one of them meets (460 for a tus checksum, 404 for a file id), but one table
keeps them from drifting apart. tus puts its own headers on every answer: it
passes them in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from fastapi import HTTPException

from ..storage import (
    ChecksumMismatch,
    FileNotFound,
    OffsetMismatch,
    StorageError,
    StorageFull,
    TooLarge,
    UploadNotFound,
)

__all__ = ["show", "storage_error", "storage_errors"]


def show(value: str, limit: int = 80) -> str:
    """A client's string, quoted and cut short, for an error message."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _answer(exc: StorageError) -> tuple[int, str]:
    """The status and message a storage error means (the table)."""
    match exc:
        case FileNotFound():
            return 404, f"no file {show(str(exc))}; GET /files lists them"
        case UploadNotFound():
            return 404, "no such upload (it may have expired or been terminated)"
        case TooLarge(limit=limit):
            return 413, f"the file is too large: at most {limit} bytes may be stored"
        case OffsetMismatch(offset=offset):
            return 409, f"Upload-Offset does not match: the upload is at {offset}"
        case ChecksumMismatch():
            return 460, f"checksum mismatch: {exc}; the bytes were discarded"
        case StorageFull():
            # The storage says what was not done (stored, deleted, created).
            undone = str(exc) or "nothing was stored"
            return 507, f"the storage is full: {undone}; free some space or try again later"
    return 400, str(exc) or type(exc).__name__  # a StorageError is the client's to act on


def storage_error(exc: StorageError, headers: Mapping[str, str] | None = None) -> HTTPException:
    """The HTTP error a storage error means, with `headers` besides."""
    status, detail = _answer(exc)
    extra = dict(headers or {})
    if status == 413:
        # The client may still be sending the body: rather than read it all
        # to reuse the connection, close it.
        extra["connection"] = "close"
    return HTTPException(status, detail, extra or None)


@contextmanager
def storage_errors(headers: Mapping[str, str] | None = None) -> Iterator[None]:
    """Turn a `StorageError` raised inside into the HTTP error it means."""
    try:
        yield
    except StorageError as exc:
        raise storage_error(exc, headers) from None
