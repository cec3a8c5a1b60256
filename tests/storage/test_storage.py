"""The Storage contract, run against every backend: a local folder and S3 (moto)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from tests.s3_server import S3Server, s3_bucket_fixture, s3_server_fixture  # noqa: F401
from tidewire.storage import (
    BadChecksum,
    FileInfo,
    FileNotFound,
    OffsetMismatch,
    Storage,
    TooLarge,
    UploadNotFound,
    new_id,
)
from tidewire.storage.local import LocalStorage
from tidewire.storage.s3 import S3Storage

T = TypeVar("T")

MALFORMED = ["", "../x", "a" * 22 + "/", "A" * 22, "w" * 22, "../" + "a" * 19, "a" * 21, "a" * 23]
HOUR = 3600.0
META = "filename dXAuYmlu"  # tus Upload-Metadata


@dataclass
class Backend:
    """How to make a storage (again, on the same data) and what it holds underneath."""

    make: Callable[[], Storage]
    #: Everything stored: files, temporary data, unfinished multipart uploads.
    residue: Callable[[], set[str]]

    def run(self, body: Callable[[Storage], Awaitable[T]]) -> T:
        async def main() -> T:
            storage = self.make()
            try:
                async with asyncio.timeout(30):
                    return await body(storage)
            finally:
                await storage.aclose()

        return asyncio.run(main())


def local_backend(root: Path) -> Backend:
    def residue() -> set[str]:
        return {str(p.relative_to(root)) for p in root.glob("*/*")}

    return Backend(lambda: LocalStorage(root), residue)


def s3_backend(server: S3Server, bucket: str) -> Backend:
    client = server.client()

    def residue() -> set[str]:
        objects = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return {o["Key"] for o in objects} | {f"multipart:{u['Key']}" for u in uploads}

    # A small part size, so that multipart paths run with small bodies.
    return Backend(
        lambda: S3Storage(bucket, "pre/", endpoint_url=server.endpoint, part_size=5 << 20),
        residue,
    )


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return local_backend(tmp_path / "data")
    server: S3Server = request.getfixturevalue("s3_server")
    return s3_backend(server, request.getfixturevalue("s3_bucket"))


async def chunks(data: bytes, size: int = 64 << 10) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def failing(data: bytes, size: int = 64 << 10) -> AsyncIterator[bytes]:
    """`data`, then the client goes away."""
    async for chunk in chunks(data, size):
        yield chunk
    raise ConnectionResetError("client went away")


async def read_all(
    storage: Storage, info: FileInfo, start: int = 0, end: int | None = None
) -> bytes:
    return b"".join([chunk async for chunk in storage.read(info, start, end)])


def blob(n: int) -> bytes:
    return os.urandom(n)


async def save(storage: Storage, data: bytes, name: str = "f.bin") -> FileInfo:
    return await storage.save(chunks(data), name=name, type="application/octet-stream")


# -- whole files ---------------------------------------------------------


def test_save_then_info_and_read(backend: Backend) -> None:
    data = blob(3 << 20)

    async def body(storage: Storage) -> None:
        before = time.time()
        info = await storage.save(chunks(data), name="héllo wörld.bin", type="image/png")
        assert info.size == len(data)
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert (info.name, info.type) == ("héllo wörld.bin", "image/png")
        assert before - 1 <= info.created <= time.time() + 1
        assert info.json()["url"] == f"/files/{info.id}"
        assert await storage.info(info.id) == info
        assert await read_all(storage, info) == data

    backend.run(body)


def test_read_ranges(backend: Backend) -> None:
    data = blob((2 << 20) + 12345)

    async def body(storage: Storage) -> None:
        info = await save(storage, data)
        for start, end in [(0, 1), (10, 20), (1 << 20, (1 << 20) + 1), (5, None), (0, len(data))]:
            assert await read_all(storage, info, start, end) == data[start:end]
        assert await read_all(storage, info, len(data) - 3) == data[-3:]
        # Chunks are large, but bounded.
        sizes = [len(c) async for c in storage.read(info)]
        assert max(sizes) <= 8 << 20 and sum(sizes) == len(data)

    backend.run(body)


def test_empty_file(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        info = await save(storage, b"", "empty")
        assert info.size == 0
        assert info.sha256 == hashlib.sha256(b"").hexdigest()
        assert await read_all(storage, info) == b""

    backend.run(body)


def test_list_is_newest_first_and_pages(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        assert (await storage.list(limit=10)).files == []
        saved = [await save(storage, str(i).encode(), f"{i}.txt") for i in range(7)]
        newest_first = [f.id for f in reversed(saved)]
        page = await storage.list(limit=100)
        assert [f.id for f in page.files] == newest_first
        assert page.next is None
        assert page.files[0] == saved[-1]

        ids: list[str] = []
        cursor = None
        for _ in range(10):
            page = await storage.list(limit=3, cursor=cursor)
            assert len(page.files) <= 3
            ids += [f.id for f in page.files]
            cursor = page.next
            if cursor is None:
                break
        assert ids == newest_first
        # Only a page's cursor: nothing else is turned into a key or a query.
        for bad in ("../x", "zzz", "A" * 22):
            with pytest.raises(ValueError):
                await storage.list(limit=3, cursor=bad)

    backend.run(body)


def test_find_gives_the_newest_of_that_name(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        await save(storage, b"old", "report.csv")
        await save(storage, b"other", "report.csv.bak")
        newest = await save(storage, b"new", "report.csv")
        assert await storage.find("report.csv") == newest
        with pytest.raises(FileNotFound):
            await storage.find("report")
        with pytest.raises(FileNotFound):
            await storage.find("../report.csv")
        await storage.delete(newest.id)
        assert await read_all(storage, await storage.find("report.csv")) == b"old"

    backend.run(body)


def test_delete(backend: Backend) -> None:
    async def body(storage: Storage) -> str:
        keep = await save(storage, b"keep")
        gone = await save(storage, b"gone")
        await storage.delete(gone.id)
        with pytest.raises(FileNotFound):
            await storage.info(gone.id)
        with pytest.raises(FileNotFound):
            await storage.delete(gone.id)
        with pytest.raises(FileNotFound):
            await read_all(storage, gone)
        assert [f.id for f in (await storage.list(limit=10)).files] == [keep.id]
        assert await read_all(storage, keep) == b"keep"
        return gone.id

    gone = backend.run(body)
    # Bytes, metadata, name marker: nothing of it is left.
    assert not [key for key in backend.residue() if gone in key]


def test_over_the_limit_leaves_nothing(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        await save(storage, b"other")
        before = backend.residue()
        with pytest.raises(TooLarge) as caught:
            await storage.save(chunks(blob(12 << 20)), name="big", type="x", limit=11 << 20)
        assert caught.value.limit == 11 << 20
        assert backend.residue() == before
        # Exactly the limit is fine.
        assert (await storage.save(chunks(b"12345"), name="ok", type="x", limit=5)).size == 5

    backend.run(body)


@pytest.mark.parametrize("size", [1000, 12 << 20])
def test_a_failing_body_leaves_nothing(backend: Backend, size: int) -> None:
    async def body(storage: Storage) -> None:
        other = await save(storage, b"other")
        before = backend.residue()
        with pytest.raises(ConnectionResetError):
            await storage.save(failing(blob(size)), name="broken", type="x")
        assert backend.residue() == before
        assert [f.id for f in (await storage.list(limit=10)).files] == [other.id]
        assert await read_all(storage, other) == b"other"

    backend.run(body)


def test_malformed_ids_are_not_found(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        await save(storage, b"x")
        for bad in [*MALFORMED, new_id()]:
            with pytest.raises(FileNotFound):
                await storage.info(bad)
            with pytest.raises(FileNotFound):
                await storage.delete(bad)
            with pytest.raises(UploadNotFound):
                await storage.upload(bad)
            with pytest.raises(UploadNotFound):
                await storage.append(bad, 0, chunks(b"x"))
            with pytest.raises(UploadNotFound):
                await storage.abort(bad)

    backend.run(body)


def test_metadata_survives_a_restart(backend: Backend) -> None:
    data = blob(1000)

    async def first(storage: Storage) -> tuple[FileInfo, str]:
        info = await save(storage, data, "kept.bin")
        upload = await storage.create_upload(
            length=10, name="u", type="x", metadata="", expires=time.time() + HOUR
        )
        await storage.append(upload.id, 0, chunks(b"01234"))
        return info, upload.id

    info, upload_id = backend.run(first)

    async def second(storage: Storage) -> None:
        assert await storage.info(info.id) == info
        assert (await storage.list(limit=10)).files == [info]
        assert await storage.find("kept.bin") == info
        assert await read_all(storage, info) == data
        # The upload goes on where it was; its hash is made from the bytes.
        assert (await storage.upload(upload_id)).offset == 5
        done = await storage.append(upload_id, 5, chunks(b"56789"))
        assert done.file is not None
        file = await storage.info(done.file)
        assert file.sha256 == hashlib.sha256(b"0123456789").hexdigest()

    backend.run(second)


def test_files_saved_with_an_expiry_are_swept_after_a_restart(backend: Backend) -> None:
    now = time.time()

    async def first(storage: Storage) -> tuple[FileInfo, FileInfo, FileInfo]:
        soon = await storage.save(
            chunks(b"soon"), name="blob.png", type="image/png", expires=now + HOUR
        )
        later = await storage.save(
            chunks(b"later"), name="blob.png", type="image/png", expires=now + 3 * HOUR
        )
        # A user's upload, of the same name even: never swept.
        kept = await save(storage, b"mine", "blob.png")
        assert (soon.expires, kept.expires) == (now + HOUR, None)
        assert "expires" not in soon.json()  # not in the public metadata
        assert await storage.expire_files(now) == 0
        return soon, later, kept

    soon, later, kept = backend.run(first)
    before = backend.residue()

    # A new storage on the same data: the expiry was stored with the file.
    async def second(storage: Storage) -> None:
        assert await storage.info(soon.id) == soon
        assert await storage.expire_files(now + HOUR - 1) == 0
        assert await storage.expire_files(now + 2 * HOUR) == 1
        with pytest.raises(FileNotFound):
            await storage.info(soon.id)
        assert {f.id for f in (await storage.list(limit=10)).files} == {later.id, kept.id}
        assert await storage.expire_files(now + 100 * HOUR) == 1
        assert (await storage.list(limit=10)).files == [kept]
        assert await read_all(storage, kept) == b"mine"
        assert await storage.expire_files(now + 100 * HOUR) == 0

    backend.run(second)
    # Nothing of the swept files is left: bytes, metadata, markers.
    gone = before - backend.residue()
    assert {key for key in gone if soon.id in key or later.id in key} == gone
    assert not {key for key in backend.residue() if soon.id in key or later.id in key}


def test_an_expiry_moved_later_holds_after_a_restart_and_leaves_no_marker(
    backend: Backend,
) -> None:
    now = time.time()

    async def first(storage: Storage) -> tuple[FileInfo, FileInfo]:
        blob = await storage.save(chunks(b"blob"), name="b.png", type="x", expires=now + HOUR)
        mine = await save(storage, b"mine", "m.png")
        await storage.set_expiry(blob.id, now + 5 * HOUR)
        await storage.set_expiry(mine.id, now + HOUR)  # an upload: it keeps none
        with pytest.raises(FileNotFound):
            await storage.set_expiry(new_id(), now)
        with pytest.raises(FileNotFound):
            await storage.set_expiry("../x", now)
        return blob, mine

    blob, mine = backend.run(first)

    async def second(storage: Storage) -> None:
        assert (await storage.info(blob.id)).expires == now + 5 * HOUR
        assert (await storage.info(mine.id)).expires is None
        # Past the first expiry (and its marker, on S3): the file stays.
        assert await storage.expire_files(now + 2 * HOUR) == 0
        assert await read_all(storage, blob) == b"blob"
        assert await storage.expire_files(now + 6 * HOUR) == 1
        with pytest.raises(FileNotFound):
            await storage.info(blob.id)
        assert await read_all(storage, mine) == b"mine"

    backend.run(second)
    assert not {key for key in backend.residue() if blob.id in key or "expiring" in key}


def test_a_deleted_file_with_an_expiry_leaves_nothing(backend: Backend) -> None:
    async def body(storage: Storage) -> str:
        info = await storage.save(chunks(b"x"), name="b", type="x", expires=time.time())
        await storage.delete(info.id)
        assert await storage.expire_files(time.time() + HOUR) == 0
        return info.id

    id = backend.run(body)
    assert not {key for key in backend.residue() if id in key or "expiring" in key}


# -- resumable uploads ---------------------------------------------------


async def new_upload(storage: Storage, length: int, name: str = "up.bin") -> str:
    upload = await storage.create_upload(
        length=length,
        name=name,
        type="text/plain",
        metadata="filename dXAuYmlu",
        expires=time.time() + HOUR,
    )
    assert (upload.offset, upload.length, upload.file) == (0, length, None)
    assert valid(upload.id)
    return upload.id


def valid(id: str) -> bool:
    from tidewire.storage import valid_id

    return valid_id(id)


def pieces(data: bytes, cuts: Iterable[int]) -> list[tuple[int, bytes]]:
    """`data` cut at `cuts`: (offset, bytes) pairs."""
    edges = [0, *cuts, len(data)]
    return [(a, data[a:b]) for a, b in itertools.pairwise(edges)]


def test_an_upload_in_pieces_becomes_a_listed_file(backend: Backend) -> None:
    data = blob((13 << 20) + 7)

    async def body(storage: Storage) -> None:
        id = await new_upload(storage, len(data))
        assert (await storage.list(limit=10)).files == []
        # Pieces smaller and larger than an S3 part, and uneven.
        cuts = [100, (1 << 20) + 3, 3 << 20, (9 << 20) + 1, 13 << 20]
        for offset, piece in pieces(data, cuts):
            upload = await storage.append(id, offset, chunks(piece, 50_000))
            assert upload.offset == offset + len(piece)
            if upload.offset < len(data):
                assert upload.file is None
                assert (await storage.list(limit=10)).files == []
                assert (await storage.upload(id)).offset == upload.offset
        assert upload.file is not None
        info = await storage.info(upload.file)
        assert (info.name, info.type, info.size) == ("up.bin", "text/plain", len(data))
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert await read_all(storage, info) == data
        assert (await storage.list(limit=10)).files == [info]
        # The finished upload still answers, naming its file.
        again = await storage.upload(id)
        assert (again.offset, again.file, again.metadata) == (
            len(data),
            info.id,
            "filename dXAuYmlu",
        )

    backend.run(body)


def test_offset_mismatch(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        id = await new_upload(storage, 10)
        await storage.append(id, 0, chunks(b"abc"))
        for wrong in (0, 2, 4):
            with pytest.raises(OffsetMismatch) as caught:
                await storage.append(id, wrong, chunks(b"xyz"))
            assert caught.value.offset == 3
        assert (await storage.upload(id)).offset == 3
        done = await storage.append(id, 3, chunks(b"defghij"))
        assert done.file is not None
        with pytest.raises(OffsetMismatch):
            await storage.append(id, 3, chunks(b"x"))
        assert await read_all(storage, await storage.info(done.file)) == b"abcdefghij"

    backend.run(body)


def test_checksum(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        id = await new_upload(storage, 8)
        good = ("sha1", hashlib.sha1(b"abcd").digest())
        assert (await storage.append(id, 0, chunks(b"abcd"), checksum=good)).offset == 4
        bad = ("md5", hashlib.md5(b"efgh").digest())
        with pytest.raises(BadChecksum):
            await storage.append(id, 4, chunks(b"efgX"), checksum=bad)
        # The bad bytes are gone; the good ones go on from there.
        assert (await storage.upload(id)).offset == 4
        done = await storage.append(
            id, 4, chunks(b"efgh"), checksum=("sha256", hashlib.sha256(b"efgh").digest())
        )
        assert done.file is not None
        info = await storage.info(done.file)
        assert await read_all(storage, info) == b"abcdefgh"
        assert info.sha256 == hashlib.sha256(b"abcdefgh").hexdigest()

    backend.run(body)


def test_a_failed_append_keeps_what_arrived_and_resumes(backend: Backend) -> None:
    data = blob(3 << 20)

    async def body(storage: Storage) -> None:
        id = await new_upload(storage, len(data))
        with pytest.raises(ConnectionResetError):
            await storage.append(id, 0, failing(data[:1_500_000]))
        offset = (await storage.upload(id)).offset
        assert offset == 1_500_000
        done = await storage.append(id, offset, chunks(data[offset:]))
        info = await storage.info(done.file or "")
        assert await read_all(storage, info) == data
        assert info.sha256 == hashlib.sha256(data).hexdigest()

    backend.run(body)


def test_a_failed_append_with_a_checksum_keeps_nothing(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        id = await new_upload(storage, 100)
        await storage.append(id, 0, chunks(b"0123456789"))
        with pytest.raises(ConnectionResetError):
            await storage.append(id, 10, failing(b"x" * 50), checksum=("sha1", b"?" * 20))
        assert (await storage.upload(id)).offset == 10

    backend.run(body)


def test_bytes_beyond_the_length_are_refused(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        id = await new_upload(storage, 10)
        await storage.append(id, 0, chunks(b"0123"))
        with pytest.raises(TooLarge):
            await storage.append(id, 4, chunks(b"456789X"))
        assert (await storage.upload(id)).offset == 4
        assert (await storage.list(limit=10)).files == []
        done = await storage.append(id, 4, chunks(b"456789"))
        assert await read_all(storage, await storage.info(done.file or "")) == b"0123456789"

    backend.run(body)


def test_an_empty_upload_is_a_file_at_once(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        upload = await storage.create_upload(
            length=0, name="nothing", type="x", metadata="", expires=time.time() + HOUR
        )
        assert upload.file is not None
        assert (await storage.info(upload.file)).size == 0
        # An empty append at the end is harmless.
        assert (await storage.append(upload.id, 0, chunks(b""))).file == upload.file

    backend.run(body)


def test_concurrent_appends_do_not_interleave(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        id = await new_upload(storage, 2 << 20)
        results = await asyncio.gather(
            storage.append(id, 0, chunks(b"a" * (1 << 20), 4096)),
            storage.append(id, 0, chunks(b"b" * (1 << 20), 4096)),
            return_exceptions=True,
        )
        assert sum(isinstance(r, OffsetMismatch) for r in results) == 1
        assert (await storage.upload(id)).offset == 1 << 20
        done = await storage.append(id, 1 << 20, chunks(b"c" * (1 << 20)))
        content = await read_all(storage, await storage.info(done.file or ""))
        assert content[1 << 20 :] == b"c" * (1 << 20)
        assert content[: 1 << 20] in (b"a" * (1 << 20), b"b" * (1 << 20))

    backend.run(body)


def test_abort(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        before = backend.residue()
        id = await new_upload(storage, 20 << 20)
        await storage.append(id, 0, chunks(blob(6 << 20)))
        await storage.abort(id)
        with pytest.raises(UploadNotFound):
            await storage.upload(id)
        with pytest.raises(UploadNotFound):
            await storage.append(id, 6 << 20, chunks(b"x"))
        with pytest.raises(UploadNotFound):
            await storage.abort(id)
        assert backend.residue() == before

    backend.run(body)


def test_expire(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        now = time.time()
        old = await storage.create_upload(
            length=10, name="old", type="x", metadata="", expires=now + 60
        )
        await storage.append(old.id, 0, chunks(b"01234"))
        fresh = await storage.create_upload(
            length=10, name="fresh", type="x", metadata="", expires=now + HOUR
        )
        assert await storage.expire(now) == 0
        # An append pushes the expiry forward by the upload's own lifetime.
        assert (await storage.upload(old.id)).expires >= now + 60
        assert await storage.expire(now + 120) == 1
        with pytest.raises(UploadNotFound):
            await storage.upload(old.id)
        assert (await storage.upload(fresh.id)).offset == 0
        assert await storage.expire(now + 120) == 0

    backend.run(body)
    assert all("old" not in key for key in backend.residue())


def test_an_expired_upload_is_not_found_before_it_is_removed(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        await storage.list(limit=1)  # connected first: S3's client is slow to open under load
        upload = await storage.create_upload(
            length=10, name="x", type="x", metadata="", expires=time.time() + 2
        )
        appended = await storage.append(upload.id, 0, chunks(b"01"))
        assert appended.expires >= upload.expires
        while time.time() <= appended.expires:
            await asyncio.sleep(0.05)
        with pytest.raises(UploadNotFound):
            await storage.upload(upload.id)
        with pytest.raises(UploadNotFound):
            await storage.append(upload.id, 2, chunks(b"x"))

    backend.run(body)


# -- ids -----------------------------------------------------------------


def test_ids_sort_newest_first_even_within_a_millisecond() -> None:
    burst = [new_id() for _ in range(2000)]  # many share a millisecond
    assert burst == sorted(burst, reverse=True)
    assert len(set(burst)) == len(burst)
    assert all(valid(id) for id in burst)
    assert new_id(2_000_000_000) < new_id(1_000_000_000)


# -- owners ----------------------------------------------------------------


def test_owners_are_kept_and_filter_listings_and_lookups(backend: Backend) -> None:
    async def body(storage: Storage) -> None:
        mine = [
            await storage.save(chunks(b"a"), name=f"a{i}", type="text/plain", owner="alice")
            for i in range(3)
        ]
        theirs = await storage.save(chunks(b"b"), name="a1", type="text/plain", owner="bob")
        nobody = await save(storage, b"c", name="a1")
        assert (await storage.info(mine[0].id)).owner == "alice"
        assert nobody.owner is None and (await storage.info(nobody.id)).owner is None
        assert "owner" not in mine[0].json()

        everyone = await storage.list(limit=10)
        assert [f.id for f in everyone.files] == [nobody.id, theirs.id, *reversed(ids(mine))]
        # Pages of alice's files alone, however the others lie between them.
        first = await storage.list(limit=2, owner="alice")
        assert [f.id for f in first.files] == [mine[2].id, mine[1].id]
        assert first.next is not None
        rest = await storage.list(limit=2, cursor=first.next, owner="alice")
        assert [f.id for f in rest.files] == [mine[0].id] and rest.next is None
        assert (await storage.list(limit=5, owner="carol")).files == []

        assert (await storage.find("a1")).id == nobody.id
        assert (await storage.find("a1", owner="alice")).id == mine[1].id
        assert (await storage.find("a1", owner="bob")).id == theirs.id
        with pytest.raises(FileNotFound):
            await storage.find("a2", owner="bob")

        upload = await storage.create_upload(
            length=2,
            name="t",
            type="text/plain",
            metadata=META,
            expires=time.time() + HOUR,
            owner="bob",
        )
        assert (await storage.upload(upload.id)).owner == "bob"
        done = await storage.append(upload.id, 0, chunks(b"hi"))
        assert done.file is not None and (await storage.info(done.file)).owner == "bob"

    backend.run(body)


def ids(files: list[FileInfo]) -> list[str]:
    return [f.id for f in files]
