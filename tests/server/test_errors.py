"""The one table from storage errors to HTTP errors, shared by /files and tus."""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from tidewire.server.errors import show, storage_error, storage_errors
from tidewire.storage import (
    ChecksumMismatch,
    FileNotFound,
    OffsetMismatch,
    StorageError,
    StorageFull,
    TooLarge,
    UploadNotFound,
)


@pytest.mark.parametrize(
    ("error", "status", "says"),
    [
        (FileNotFound("abc"), 404, "no file 'abc'; GET /files lists them"),
        (UploadNotFound("abc"), 404, "no such upload"),
        (TooLarge("more than 10 bytes", 10), 413, "at most 10 bytes may be stored"),
        (OffsetMismatch("the upload is at offset 7", 7), 409, "the upload is at 7"),
        (ChecksumMismatch("the sha1 differs"), 460, "checksum mismatch: the sha1 differs"),
        (StorageFull("no space"), 507, "the storage is full"),
        (StorageError("the cursor is stale"), 400, "the cursor is stale"),
        (StorageError(), 400, "StorageError"),  # never an empty detail
    ],
)
def test_each_storage_error_has_one_answer(error: StorageError, status: int, says: str) -> None:
    exc = storage_error(error)
    assert exc.status_code == status
    assert says in exc.detail


def test_a_subclass_is_answered_as_its_parent() -> None:
    class DiskQuota(StorageFull):
        pass

    assert storage_error(DiskQuota("quota")).status_code == 507


def test_headers_are_kept_and_413_closes_the_connection() -> None:
    tus = {"Tus-Resumable": "1.0.0"}
    assert storage_error(UploadNotFound("x"), tus).headers == tus
    assert storage_error(TooLarge("", 5), tus).headers == {**tus, "connection": "close"}
    assert storage_error(TooLarge("", 5)).headers == {"connection": "close"}
    assert storage_error(FileNotFound("x")).headers is None


def test_storage_errors_turns_them_into_http_errors() -> None:
    with pytest.raises(HTTPException) as raised, storage_errors({"A": "b"}):
        raise StorageFull("no space")
    assert (raised.value.status_code, raised.value.headers) == (507, {"A": "b"})
    with pytest.raises(ValueError), storage_errors():
        raise ValueError("not a storage error: left alone")


def test_show_quotes_and_cuts() -> None:
    assert show("a'b") == repr("a'b")
    assert show("x" * 100) == repr("x" * 80 + "…")
