"""Storage errors as HTTP errors: the one table of statuses and messages.

The storage raises `StorageError`s in its own terms (storage/__init__.py
lists them); a client needs a status and a sentence that says what to do.
The file routes and tus both answer through this table, so a full disk or an
oversized file reads the same whichever way the bytes came. Some errors only
one of them meets (460 for a tus checksum, 404 for a file id), but one table
keeps them from drifting apart. tus puts its own headers on every answer: it
passes them in.

Below the table: the error models the routes declare in OpenAPI.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel

from ..storage import (
    BadChecksum,
    FileNotFound,
    OffsetMismatch,
    StorageError,
    StorageFull,
    StorageUnavailable,
    TooLarge,
    UploadNotFound,
)

__all__ = [
    "ACCESS",
    "FieldError",
    "Invalid",
    "Problem",
    "error_responses",
    "show",
    "storage_error",
    "storage_errors",
]


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
        case BadChecksum():
            return 460, f"checksum mismatch: {exc}; the bytes were discarded"
        case StorageFull():
            # The storage says what was not done (stored, deleted, created).
            undone = str(exc) or "nothing was stored"
            return 507, f"the storage is full: {undone}; free some space or try again later"
        case StorageUnavailable():
            return 503, f"the storage is unavailable for now: {exc}; try again"
    return 400, str(exc) or type(exc).__name__  # a StorageError is the client's to act on


def storage_error(exc: StorageError, headers: Mapping[str, str] | None = None) -> HTTPException:
    """The HTTP error a storage error means, with `headers` besides."""
    status, detail = _answer(exc)
    extra = dict(headers or {})
    if status == 503:
        extra.setdefault("retry-after", "1")
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


# -- errors in the OpenAPI document ----------------------------------------
#
# What a route may answer besides success, declared with `responses=` so that
# the spec says what the server does: a `detail` that is a sentence (every
# HTTPException here) or, for a 422, FastAPI's list of fields at fault.


class FieldError(BaseModel):
    """One field at fault, as FastAPI (and a stream's parameters) report it."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An error: `{"detail": "<what to fix>"}`, FastAPI's convention."""

    detail: str


class Invalid(BaseModel):
    """A 422: a sentence, or the list of fields at fault."""

    detail: str | list[FieldError]


#: What each error status means, for the OpenAPI page.
ERROR_STATUSES: dict[int, str] = {
    400: "Malformed request (body, header or position); `detail` says what to fix",
    401: (
        "Access control is on and the request has no token, or one that does not verify "
        "(bad signature, expired, wrong audience or issuer); "
        '`WWW-Authenticate: Bearer realm="tidewire"` '
        '(with `error="invalid_token"` when one was sent)'
    ),
    403: (
        "The token does not grant this (`detail` names the permission missing), the request's "
        "`Origin` is not allowed, or a signed link is not valid or has expired"
    ),
    404: "Not found",
    405: "Method not allowed; `Allow` lists the methods that are",
    409: "Conflict with the resource's state",
    410: "Gone (an upload that expired)",
    412: "Precondition failed",
    413: "Too large",
    415: "Unsupported Content-Type",
    416: "The range is outside the file",
    422: "Invalid value; `detail` names it",
    429: (
        "Over a per-client limit (connections, runs, publish rate, open uploads); "
        "`Retry-After` says when to try again"
    ),
    460: "Checksum mismatch (tus)",
    503: "Unavailable for now (the broker is unreachable, or too many runs); see Retry-After",
    507: "The storage is full",
}


#: What every route behind access control may answer: `error_responses(*ACCESS, ...)`,
#: 429 included: each request counts against its client's connections.
#: (A route whose only refusal is 401, as one that lists or shows only what
#: the caller owns, declares 401 and 429.)
ACCESS = (401, 403, 429)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for the error statuses a route answers, each with its model."""
    return {
        status: {
            "description": ERROR_STATUSES[status],
            "model": Invalid if status == 422 else Problem,
        }
        for status in statuses
    }
