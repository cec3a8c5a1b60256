"""tus 1.0.0 at /uploads/: header parsing, protocol conformance, and the real tuspy client."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterable, Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from tusclient import client as tus_client
from tusclient.storage.filestorage import FileStorage

from tests.conftest import QUICK, LiveServer, wait_for
from tests.s3_server import S3Server, s3_bucket, s3_server  # noqa: F401
from tidewire import Settings, Tidewire
from tidewire.server.headers import http_date, parse_size
from tidewire.server.uploads import (
    expire_uploads,
    file_name_and_type,
    parse_checksum,
    parse_metadata,
)
from tidewire.storage import FileInfo, Storage, StorageFull, Upload
from tidewire.storage.local import LocalStorage

TUS = {"Tus-Resumable": "1.0.0"}
PATCH = {**TUS, "Content-Type": "application/offset+octet-stream"}


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- headers (pure) --------------------------------------------------------


def test_parse_size() -> None:
    assert parse_size("0", "Upload-Length") == 0
    assert parse_size(" 1048576 ", "Upload-Offset") == 1 << 20
    for bad in ("-1", "1.5", "", "12abc", "0x10", "1e3", "٣"):
        with pytest.raises(ValueError, match="non-negative integer"):
            parse_size(bad, "Upload-Length")
    with pytest.raises(ValueError, match="Upload-Offset header is required"):
        parse_size(None, "Upload-Offset")


def test_parse_metadata() -> None:
    header = f"filename {b64('résumé.pdf')},is_confidential,filetype {b64('a/b')}"
    assert parse_metadata(header) == {
        "filename": "résumé.pdf".encode(),
        "is_confidential": b"",
        "filetype": b"a/b",
    }
    assert parse_metadata(None) == {} == parse_metadata("")
    assert parse_metadata("k YQ") == {"k": b"a"}  # padding left out
    for bad, why in (
        ("a YQ==,a Yg==", "given twice"),
        ("a !!!!", "not base64"),
        ("a YQ== Yg==", "more than one value"),
        ("a YQ==,", "empty pair"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_metadata(bad)


def test_file_name_and_type() -> None:
    assert file_name_and_type({"filename": b"a.txt", "filetype": b"text/x-a"}) == (
        "a.txt",
        "text/x-a",
    )
    assert file_name_and_type({"name": b"b.png"}) == ("b.png", "image/png")  # guessed
    # A browser sends an empty type for files it does not know.
    assert file_name_and_type({"filename": b"c.json", "filetype": b""}) == (
        "c.json",
        "application/json",
    )
    assert file_name_and_type({"contentType": b"text/plain; charset=utf-8"})[1] == (
        "text/plain; charset=utf-8"
    )
    assert file_name_and_type({}) == ("upload", "application/octet-stream")
    for bad, why in (
        ({"filename": b"\xff\xfe"}, "not UTF-8"),
        ({"filename": b"a\nb"}, "control characters"),
        ({"filetype": b"nonsense"}, "not a media type"),
        ({"type": b"text/html\r\nX-Evil: 1"}, "control characters"),
    ):
        with pytest.raises(ValueError, match=why):
            file_name_and_type(bad)


def test_parse_checksum() -> None:
    # The spec's own example: sha1 of "hello world".
    assert parse_checksum("sha1 Kq5sNclPz7QV2+lfQIuc6R7oRu0=") == (
        "sha1",
        hashlib.sha1(b"hello world").digest(),
    )
    with pytest.raises(ValueError, match="unsupported algorithm 'crc32'"):
        parse_checksum("crc32 DUoRhQ==")
    with pytest.raises(ValueError, match="not base64"):
        parse_checksum("sha256 ???")
    with pytest.raises(ValueError, match="32 bytes, not 20"):
        parse_checksum("sha256 " + b64(hashlib.sha1(b"").digest()))


def test_http_date() -> None:
    assert http_date(1403712000) == "Wed, 25 Jun 2014 16:00:00 GMT"


# -- a live server ---------------------------------------------------------


@dataclass
class Tus:
    server: LiveServer
    tw: Tidewire
    root: Path

    @property
    def url(self) -> str:
        return self.server.url + "/uploads/"

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, timeout=10)

    def create(self, length: int, metadata: str = "", **headers: str) -> str:
        with self.http() as http:
            r = http.post(
                "/uploads/",
                headers={
                    **TUS,
                    "Upload-Length": str(length),
                    "Upload-Metadata": metadata,
                    **headers,
                },
            )
        assert r.status_code == 201, r.text
        return r.headers["location"]

    def head(self, location: str) -> httpx.Response:
        with self.http() as http:
            return http.head(location, headers=TUS)

    def file(self, id: str) -> FileInfo:
        """A finished upload's file, by its metadata at /files/{id}/meta."""
        with self.http() as http:
            r = http.get(f"/files/{id}/meta")
        assert r.status_code == 200, r.text
        meta = r.json()
        assert meta.pop("url") == f"/files/{id}"
        return FileInfo(**meta)

    def stored(self, file: FileInfo) -> bytes:
        with self.http() as http:
            r = http.get(f"/files/{file.id}")
        assert r.status_code == 200
        return r.content


@pytest.fixture
def tus(serve: Callable[..., LiveServer], tmp_path: Path) -> Callable[..., Tus]:
    servers = itertools.count()

    def start(storage: Storage | None = None, **settings: Any) -> Tus:
        root = tmp_path / f"data{next(servers)}"
        tw = Tidewire(
            storage=storage or LocalStorage(root),
            settings=Settings(**{"heartbeat": QUICK.heartbeat, **settings}),
        )
        return Tus(serve(tw), tw, root)

    return start


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """Each backend in turn, for the tests that matter on both."""
    if request.param == "local":
        return LocalStorage(tmp_path / "local")
    from tidewire.storage.s3 import S3Storage

    server: S3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    return S3Storage(bucket, "uploads-test/", endpoint_url=server.endpoint)


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    data = os.urandom(3 * 1024 * 1024 + 12345)  # a few MiB, not a whole number of chunks
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    yield path, data


def test_options_advertises_what_is_supported(tus: Callable[..., Tus]) -> None:
    t = tus(max_file_size=1 << 30)
    with t.http() as http:
        for path in ("/uploads/", "/uploads/0123456789abcdefghijkl"):
            # No Tus-Resumable needed, and a wrong one is ignored.
            r = http.options(path, headers={"Tus-Resumable": "0.0.1"})
            assert r.status_code == 204
            assert r.headers["tus-version"] == "1.0.0"
            extensions = r.headers["tus-extension"].split(",")
            assert set(extensions) == {
                "creation",
                "creation-with-upload",
                "termination",
                "checksum",
                "expiration",
            }
            assert r.headers["tus-max-size"] == str(1 << 30)
            assert set(r.headers["tus-checksum-algorithm"].split(",")) == {"sha1", "sha256", "md5"}
            assert "Tidewire-File" in r.headers["access-control-expose-headers"]


def test_unsupported_version_is_412_and_not_processed(tus: Callable[..., Tus]) -> None:
    t = tus()
    location = t.create(10)
    with t.http() as http:
        for headers in ({"Tus-Resumable": "0.2.2"}, {}):
            r = http.post("/uploads/", headers={**headers, "Upload-Length": "5"})
            assert r.status_code == 412
            assert r.headers["tus-version"] == "1.0.0"
            assert r.headers["tus-resumable"] == "1.0.0"
            assert "1.0.0" in r.json()["detail"]
            r = http.patch(
                location,
                content=b"12345",
                headers={**headers, "Upload-Offset": "0", "Content-Type": PATCH["Content-Type"]},
            )
            assert r.status_code == 412
            assert http.head(location, headers=headers).status_code == 412
    assert t.head(location).headers["upload-offset"] == "0"  # the PATCH was not applied


def test_create_resume_finish(tus: Callable[..., Tus]) -> None:
    t = tus(upload_expiry=600)
    data = os.urandom(100_000)
    metadata = f"filename {b64('naïve notes.txt')},filetype {b64('text/plain')},extra"
    before = time.time()
    with t.http() as http:
        r = http.post(
            "/uploads/",
            headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": metadata},
        )
        assert r.status_code == 201
        location = r.headers["location"]
        # Relative to the server: tuspy (urljoin) and tus-js-client (new URL) resolve it.
        assert location.startswith("/uploads/") and not urlsplit(location).netloc
        assert r.headers["tus-resumable"] == "1.0.0"
        assert r.headers["upload-offset"] == "0"
        expires = parsedate_to_datetime(r.headers["upload-expires"]).timestamp()
        assert before + 599 <= expires <= time.time() + 601

        r = http.head(location, headers=TUS)
        assert r.status_code == 200
        assert r.headers["upload-offset"] == "0"
        assert r.headers["upload-length"] == str(len(data))
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["upload-metadata"] == metadata
        assert "tidewire-file" not in r.headers

        r = http.patch(location, content=data[:60_000], headers={**PATCH, "Upload-Offset": "0"})
        assert r.status_code == 204, r.text
        assert r.headers["upload-offset"] == "60000"
        assert "upload-expires" in r.headers
        assert "tidewire-file" not in r.headers
        assert http.head(location, headers=TUS).headers["upload-offset"] == "60000"

        r = http.patch(location, content=data[60_000:], headers={**PATCH, "Upload-Offset": "60000"})
        assert r.status_code == 204
        assert r.headers["upload-offset"] == str(len(data))
        file_id = r.headers["tidewire-file"]

        r = http.head(location, headers=TUS)
        assert r.headers["tidewire-file"] == file_id
        assert r.headers["upload-offset"] == r.headers["upload-length"] == str(len(data))
    info = t.file(file_id)
    assert (info.name, info.type, info.size) == ("naïve notes.txt", "text/plain", len(data))
    assert info.sha256 == sha256(data) == sha256(t.stored(info))


def test_patch_errors(tus: Callable[..., Tus]) -> None:
    t = tus()
    location = t.create(10)
    with t.http() as http:
        r = http.patch(
            location,
            content=b"12345",
            headers={**TUS, "Upload-Offset": "0", "Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 415
        assert "application/offset+octet-stream" in r.json()["detail"]

        r = http.patch(location, content=b"12345", headers={**PATCH, "Upload-Offset": "3"})
        assert r.status_code == 409
        assert "at 0" in r.json()["detail"]

        r = http.patch(location, content=b"1", headers={**PATCH, "Upload-Offset": "-1"})
        assert r.status_code == 400
        assert "Upload-Offset must be a non-negative integer" in r.json()["detail"]
        r = http.patch(location, content=b"1", headers=PATCH)
        assert r.status_code == 400
        assert "Upload-Offset header is required" in r.json()["detail"]

        r = http.patch(location, content=b"x" * 11, headers={**PATCH, "Upload-Offset": "0"})
        assert r.status_code == 413
        assert r.headers["tus-resumable"] == "1.0.0"

        assert t.head(location).headers["upload-offset"] == "0"  # nothing was applied
        for unknown in ("/uploads/0123456789abcdefghijkl", "/uploads/not-an-id"):
            assert http.head(unknown, headers=TUS).status_code == 404
            r = http.patch(unknown, content=b"1", headers={**PATCH, "Upload-Offset": "0"})
            assert r.status_code == 404
            assert r.headers["tus-resumable"] == "1.0.0"
            assert "upload-offset" not in r.headers
        assert http.head("/uploads/..%2f..%2fetc", headers=TUS).status_code == 404


def test_checksums(tus: Callable[..., Tus]) -> None:
    t = tus()
    location = t.create(11)
    with t.http() as http:
        wrong = "sha1 " + b64(hashlib.sha1(b"hello there").digest())
        r = http.patch(
            location,
            content=b"hello world",
            headers={**PATCH, "Upload-Offset": "0", "Upload-Checksum": wrong},
        )
        assert r.status_code == 460
        assert "checksum" in r.json()["detail"]
        assert t.head(location).headers["upload-offset"] == "0"  # discarded

        r = http.patch(
            location,
            content=b"hello world",
            headers={**PATCH, "Upload-Offset": "0", "Upload-Checksum": "crc32 DUoRhQ=="},
        )
        assert r.status_code == 400
        assert "unsupported algorithm" in r.json()["detail"]

        for algorithm in ("md5", "sha256"):
            digest = hashlib.new(algorithm, b"hello").digest()
            piece = t.create(5)
            r = http.patch(
                piece,
                content=b"hello",
                headers={
                    **PATCH,
                    "Upload-Offset": "0",
                    "Upload-Checksum": f"{algorithm} {b64(digest)}",
                },
            )
            assert r.status_code == 204, r.text
            assert t.file(r.headers["tidewire-file"]).sha256 == sha256(b"hello")

        r = http.patch(
            location,
            content=b"hello world",
            headers={
                **PATCH,
                "Upload-Offset": "0",
                "Upload-Checksum": "sha1 Kq5sNclPz7QV2+lfQIuc6R7oRu0=",
            },
        )
        assert r.status_code == 204
        assert "tidewire-file" in r.headers


def test_creation_errors(tus: Callable[..., Tus]) -> None:
    t = tus(max_file_size=1000)
    with t.http() as http:

        def post(**headers: str) -> httpx.Response:
            return http.post("/uploads/", headers={**TUS, **headers})

        r = post(**{"Upload-Length": "1001"})
        assert r.status_code == 413
        assert "1000" in r.json()["detail"]
        assert post(**{"Upload-Length": "1000"}).status_code == 201

        r = post()
        assert r.status_code == 400
        assert "Upload-Length header is required" in r.json()["detail"]
        r = post(**{"Upload-Length": "ten"})
        assert r.status_code == 400
        assert "non-negative integer" in r.json()["detail"]
        r = post(**{"Upload-Defer-Length": "1"})
        assert r.status_code == 400
        assert "not supported" in r.json()["detail"]
        r = post(**{"Upload-Length": "5", "Upload-Metadata": "filename %%%"})
        assert r.status_code == 400
        assert "'filename' is not base64" in r.json()["detail"]

        r = http.post(
            "/uploads/",
            content=b"hello",
            headers={**TUS, "Upload-Length": "5", "Content-Type": "text/plain"},
        )
        assert r.status_code == 415


def test_creation_with_upload(tus: Callable[..., Tus]) -> None:
    t = tus()
    with t.http() as http:
        # The whole file in one request.
        r = http.post(
            "/uploads/",
            content=b"hello",
            headers={**PATCH, "Upload-Length": "5", "Upload-Metadata": f"filename {b64('h.txt')}"},
        )
        assert r.status_code == 201
        assert r.headers["upload-offset"] == "5"
        info = t.file(r.headers["tidewire-file"])
        assert (info.name, info.type, info.sha256) == ("h.txt", "text/plain", sha256(b"hello"))
        assert t.head(r.headers["location"]).headers["tidewire-file"] == info.id

        # A first part, then the rest by PATCH.
        r = http.post("/uploads/", content=b"hello", headers={**PATCH, "Upload-Length": "11"})
        assert r.status_code == 201
        assert r.headers["upload-offset"] == "5"
        assert "tidewire-file" not in r.headers
        r = http.patch(
            r.headers["location"], content=b" world", headers={**PATCH, "Upload-Offset": "5"}
        )
        assert r.status_code == 204
        assert t.stored(t.file(r.headers["tidewire-file"])) == b"hello world"

        # More than Upload-Length, or a bad checksum: refused, nothing left behind.
        r = http.post("/uploads/", content=b"hello!", headers={**PATCH, "Upload-Length": "5"})
        assert r.status_code == 413
        r = http.post(
            "/uploads/",
            content=b"hello",
            headers={**PATCH, "Upload-Length": "5", "Upload-Checksum": "md5 " + b64(bytes(16))},
        )
        assert r.status_code == 460
    # The refused ones left nothing behind: what remains is the state of finished uploads.
    assert all(_finished(t.root / "uploads", name) for name in os.listdir(t.root / "uploads"))


def _finished(folder: Path, name: str) -> bool:
    return name.endswith(".json") and json.loads((folder / name).read_text())["file"] is not None


def test_empty_file(tus: Callable[..., Tus]) -> None:
    t = tus()
    with t.http() as http:
        r = http.post("/uploads/", headers={**TUS, "Upload-Length": "0"})
        assert r.status_code == 201
        assert r.headers["upload-offset"] == "0"
        assert t.file(r.headers["tidewire-file"]).size == 0


def test_termination(tus: Callable[..., Tus]) -> None:
    t = tus()
    location = t.create(10)
    with t.http() as http:
        assert (
            http.patch(
                location, content=b"12345", headers={**PATCH, "Upload-Offset": "0"}
            ).status_code
            == 204
        )
        r = http.delete(location, headers=TUS)
        assert r.status_code == 204
        assert r.headers["tus-resumable"] == "1.0.0"
        assert http.head(location, headers=TUS).status_code == 404
        r = http.patch(location, content=b"67890", headers={**PATCH, "Upload-Offset": "5"})
        assert r.status_code == 404
        assert http.delete(location, headers=TUS).status_code == 404
    assert os.listdir(t.root / "uploads") == []


def test_method_override(tus: Callable[..., Tus]) -> None:
    t = tus()
    location = t.create(5)
    with t.http() as http:
        r = http.post(
            location,
            content=b"hello",
            headers={**PATCH, "Upload-Offset": "0", "X-HTTP-Method-Override": "PATCH"},
        )
        assert r.status_code == 204
        assert "tidewire-file" in r.headers
        other = t.create(5)
        r = http.post(other, headers={**TUS, "X-HTTP-Method-Override": "DELETE"})
        assert r.status_code == 204
        assert t.head(other).status_code == 404
        # Without an override a POST is not a method of an upload.
        r = http.post(location, headers=TUS)
        assert r.status_code == 405
        assert "PATCH" in r.headers["allow"]


def test_disconnect_mid_patch_keeps_what_arrived(tus: Callable[..., Tus]) -> None:
    t = tus()
    data = os.urandom(400_000)
    location = t.create(len(data))
    sent = _patch_and_hang_up(t.server, location, 0, data, send=150_000)
    wait_for(
        lambda: t.head(location).headers["upload-offset"] == str(sent),
        message="the bytes sent before the disconnect were not kept",
    )
    with t.http() as http:
        r = http.patch(location, content=data[sent:], headers={**PATCH, "Upload-Offset": str(sent)})
        assert r.status_code == 204
    assert t.file(r.headers["tidewire-file"]).sha256 == sha256(data)


def _patch_and_hang_up(
    server: LiveServer, location: str, offset: int, data: bytes, send: int
) -> int:
    """PATCH all of `data` from `offset`, but send only `send` bytes of it and close."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        head = (
            f"PATCH {location} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
            f"Content-Length: {len(data) - offset}\r\n\r\n"
        )
        sock.sendall(head.encode() + data[offset : offset + send])
    return offset + send


def test_patch_streams_into_storage(tus: Callable[..., Tus]) -> None:
    # Bytes reach the storage while the body is still arriving: nothing
    # buffers the whole body, which is what keeps memory flat for big files.
    t = tus()
    data = os.urandom(8 << 20)
    location = t.create(len(data))
    with socket.create_connection(("127.0.0.1", t.server.port)) as sock:
        sock.sendall(
            f"PATCH {location} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
        )
        sock.sendall(data[: 4 << 20])
        wait_for(
            lambda: int(t.head(location).headers["upload-offset"]) >= 2 << 20,
            message="nothing was stored before the whole body arrived",
        )
        sock.sendall(data[4 << 20 :])
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 204")
    assert f"upload-offset: {len(data)}".encode() in reply.lower()


def test_expiry(tus: Callable[..., Tus]) -> None:
    t = tus(upload_expiry=0.5)
    stale = t.create(10)
    with t.http() as http:
        r = http.patch(stale, content=b"12345", headers={**PATCH, "Upload-Offset": "0"})
        expires = parsedate_to_datetime(r.headers["upload-expires"]).timestamp()
        assert expires <= time.time() + 1.5
        wait_for(
            lambda: t.head(stale).status_code in (404, 410), message="the upload never expired"
        )
        r = http.patch(stale, content=b"67890", headers={**PATCH, "Upload-Offset": "5"})
        assert r.status_code in (404, 410)
    # Its bytes and state stay until a cleanup: the app's own (it sweeps every
    # second with this upload_expiry) or this one, whichever comes first.
    left = len(os.listdir(t.root / "uploads"))
    assert left in (0, 2)
    assert asyncio.run(t.tw.storage.expire()) == left // 2
    assert os.listdir(t.root / "uploads") == []


class FullStorage(LocalStorage):
    """Its disk fills up in the middle of every append."""

    async def append(
        self,
        id: str,
        offset: int,
        chunks: AsyncIterable[bytes],
        *,
        checksum: tuple[str, bytes] | None = None,
    ) -> Upload:
        async for _ in chunks:
            raise StorageFull("no space left")
        raise AssertionError("no body")


class LateStorage(LocalStorage):
    """Hands back uploads past their expiry, as a storage may before its cleanup runs."""

    async def upload(self, id: str) -> Upload:
        return dataclasses.replace(await super().upload(id), expires=time.time() - 1)


def test_full_storage_is_507_and_expired_is_410(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    tw = Tidewire(storage=FullStorage(tmp_path / "a"))
    full = Tus(serve(tw), tw, tmp_path / "a")
    location = full.create(10)
    with full.http() as http:
        r = http.patch(location, content=b"12345", headers={**PATCH, "Upload-Offset": "0"})
        assert r.status_code == 507
        assert "full" in r.json()["detail"]
        r = http.post("/uploads/", content=b"12345", headers={**PATCH, "Upload-Length": "5"})
        assert r.status_code == 507

    tw = Tidewire(storage=LateStorage(tmp_path / "b"))
    late = Tus(serve(tw), tw, tmp_path / "b")
    location = late.create(10)
    assert late.head(location).status_code == 410
    with late.http() as http:
        r = http.patch(location, content=b"12345", headers={**PATCH, "Upload-Offset": "0"})
    assert r.status_code == 410
    assert "expired" in r.json()["detail"]


def test_location_under_a_mount_prefix(serve: Callable[..., LiveServer], tmp_path: Path) -> None:
    tw = Tidewire(storage=LocalStorage(tmp_path))
    app = FastAPI()
    app.include_router(tw.router, prefix="/api")
    server = serve(app)
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/api/uploads/", headers={**TUS, "Upload-Length": "2"})
        assert r.status_code == 201
        assert r.headers["location"].startswith("/api/uploads/")
        r = http.patch(
            r.headers["location"], content=b"hi", headers={**PATCH, "Upload-Offset": "0"}
        )
        assert r.status_code == 204
        assert http.get(f"/api/files/{r.headers['tidewire-file']}").content == b"hi"


class FlakyStorage:
    """A storage whose first sweep fails."""

    def __init__(self) -> None:
        self.sweeps = 0

    async def expire(self, now: float | None = None) -> int:
        self.sweeps += 1
        if self.sweeps == 1:
            raise OSError("disk on fire")
        return 3


def test_expire_uploads_survives_failures(caplog: pytest.LogCaptureFixture) -> None:
    storage = FlakyStorage()
    tw = Tidewire(storage=storage, settings=Settings(upload_expiry=1.0))  # type: ignore[arg-type]

    async def main() -> None:
        task = asyncio.create_task(expire_uploads(tw))
        deadline = time.monotonic() + 5
        while storage.sweeps < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.INFO, logger="tidewire"):
        asyncio.run(main())
    assert storage.sweeps >= 2
    assert "removing expired uploads failed" in caplog.text
    assert "removed 3 expired uploads" in caplog.text


# -- the real tuspy client -------------------------------------------------


def test_tuspy_uploads_a_file(
    tus: Callable[..., Tus], storage: Storage, source: tuple[Path, bytes]
) -> None:
    path, data = source
    t = tus(storage)
    uploader = tus_client.TusClient(t.url).uploader(
        str(path), chunk_size=1 << 20, metadata={"filename": "source.bin"}, upload_checksum=True
    )
    uploader.upload()
    r = t.head(uploader.url)
    assert r.headers["upload-offset"] == str(len(data))
    info = t.file(r.headers["tidewire-file"])
    assert info.name == "source.bin"
    assert info.sha256 == sha256(data) == sha256(t.stored(info))


def test_tuspy_resumes_an_interrupted_upload(
    tus: Callable[..., Tus], storage: Storage, source: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, data = source
    t = tus(storage)
    urls = FileStorage(str(tmp_path / "tus-urls.json"))
    first = tus_client.TusClient(t.url).uploader(
        str(path), chunk_size=1 << 20, store_url=True, url_storage=urls
    )
    first.upload(stop_at=1 << 20)  # one chunk, then "the laptop closes"
    assert first.offset == 1 << 20
    # Then the connection drops in the middle of the next PATCH.
    offset = _patch_and_hang_up(t.server, urlsplit(first.url).path, first.offset, data, 700_000)
    wait_for(lambda: t.head(first.url).headers["upload-offset"] == str(offset))

    # A new uploader finds the URL by the file's fingerprint and goes on from the server's offset.
    second = tus_client.TusClient(t.url).uploader(
        str(path), chunk_size=1 << 20, store_url=True, url_storage=urls
    )
    assert second.url == first.url
    assert second.offset == offset
    second.upload()
    info = t.file(t.head(second.url).headers["tidewire-file"])
    assert info.sha256 == sha256(data) == sha256(t.stored(info))
