"""The one table from storage errors to HTTP errors, shared by /files and tus."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi import HTTPException

from tests.conftest import QUICK, LiveServer
from tests.full_disk import fill, small_disk_fixture  # noqa: F401
from tidewire import Tidewire
from tidewire.server.errors import show, storage_error, storage_errors
from tidewire.storage import (
    BadChecksum,
    FileNotFound,
    OffsetMismatch,
    StorageError,
    StorageFull,
    StorageUnavailable,
    TooLarge,
    UploadNotFound,
)
from tidewire.storage.local import LocalStorage


@pytest.mark.parametrize(
    ("error", "status", "says"),
    [
        (FileNotFound("abc"), 404, "no file 'abc'; GET /files lists them"),
        (UploadNotFound("abc"), 404, "no such upload"),
        (TooLarge("more than 10 bytes", 10), 413, "at most 10 bytes may be stored"),
        (OffsetMismatch("the upload is at offset 7", 7), 409, "the upload is at 7"),
        (BadChecksum("the sha1 differs"), 460, "checksum mismatch: the sha1 differs"),
        (StorageFull("no space"), 507, "the storage is full"),
        (StorageUnavailable("no file was made (the index: disk I/O error)"), 503, "try again"),
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
    assert storage_error(StorageUnavailable("x")).headers == {"retry-after": "1"}


def test_storage_errors_turns_them_into_http_errors() -> None:
    with pytest.raises(HTTPException) as raised, storage_errors({"A": "b"}):
        raise StorageFull("no space")
    assert (raised.value.status_code, raised.value.headers) == (507, {"A": "b"})
    with pytest.raises(ValueError), storage_errors():
        raise ValueError("not a storage error: left alone")


def test_show_quotes_and_cuts() -> None:
    assert show("a'b") == repr("a'b")
    assert show("x" * 100) == repr("x" * 80 + "…")


# ---------------------------------------------------------------- a real full disk, over HTTP


def test_a_full_disk_answers_507_on_every_storage_path(
    small_disk: Path, serve: Callable[..., LiveServer]
) -> None:
    root = small_disk / "data"
    live = serve(Tidewire(storage=LocalStorage(root), settings=QUICK))
    client = httpx.Client(base_url=live.url, timeout=10)
    tus = {"Tus-Resumable": "1.0.0"}
    kept = client.put("/files/kept.txt", content=b"kept").json()
    begun = client.post("/uploads/", headers={**tus, "Upload-Length": str(1 << 20)})
    assert begun.status_code == 201
    upload = begun.headers["location"]
    before = {d: sorted(os.listdir(root / d)) for d in ("files", "tmp", "uploads")}
    fill(small_disk)

    body = os.urandom(64 << 10)  # more than any page left with room
    octets = {**tus, "Content-Type": "application/offset+octet-stream"}
    answers = {
        "empty PUT": client.put("/files/empty.txt", content=b""),
        "multipart POST": client.post("/files", files={"file": ("a.bin", body)}),
        "DELETE": client.delete(f"/files/{kept['id']}"),
        "tus create": client.post("/uploads/", headers={**tus, "Upload-Length": "10"}),
        "tus create with upload": client.post(
            "/uploads/", content=body, headers={**octets, "Upload-Length": str(len(body))}
        ),
        "tus PATCH": client.patch(upload, content=body, headers={**octets, "Upload-Offset": "0"}),
    }
    for what, response in answers.items():
        assert response.status_code == 507, (what, response.text)
        detail = response.json()["detail"]
        assert detail.startswith("the storage is full: "), (what, detail)
        assert detail.endswith("free some space or try again later"), (what, detail)
        if what.startswith("tus"):
            assert response.headers["tus-resumable"] == "1.0.0", what
    assert "the file was not deleted" in answers["DELETE"].json()["detail"]
    # Nothing was half done, nothing stays behind.
    assert {d: sorted(os.listdir(root / d)) for d in ("files", "tmp", "uploads")} == before
    assert [f["id"] for f in client.get("/files").json()] == [kept["id"]]
    assert client.head(upload, headers=tus).headers["upload-offset"] == "0"
    client.close()
