"""S3Storage beyond the contract: multipart, ranged reads, tails, keys, a missing bucket."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from botocore.exceptions import ClientError

from tests.s3_server import FAKE_AWS, S3Server, s3_bucket_fixture, s3_server_fixture  # noqa: F401
from tidewire.storage import FileInfo, StorageFull, from_url
from tidewire.storage.s3 import BucketNotFound, S3Storage

from .test_storage import chunks, read_all

T = TypeVar("T")
MIB = 1 << 20
HOUR = 3600.0


def run(storage: S3Storage, body: Callable[[S3Storage], Awaitable[T]]) -> T:
    async def main() -> T:
        try:
            async with asyncio.timeout(30):
                return await body(storage)
        finally:
            await storage.aclose()

    return asyncio.run(main())


def storage_for(server: S3Server, bucket: str, **options: Any) -> S3Storage:
    return S3Storage(bucket, "pre", endpoint_url=server.endpoint, part_size=5 * MIB, **options)


def spy(storage: S3Storage, operation: str) -> list[dict[str, Any]]:
    """Record the arguments of every `operation` call the storage's client makes."""
    calls: list[dict[str, Any]] = []
    client: Any = storage._s3_now()
    real = getattr(client, operation)

    async def recording(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return await real(**kwargs)

    setattr(client, operation, recording)
    return calls


def keys(server: S3Server, bucket: str) -> list[str]:
    listing = server.client().list_objects_v2(Bucket=bucket)
    return [entry["Key"] for entry in listing.get("Contents", [])]


def test_from_url_and_construction_contact_nothing() -> None:
    storage = from_url("s3://bucket/some/prefix/?endpoint=http://127.0.0.1:1&region=eu-west-1")
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix) == ("bucket", "some/prefix/")
    assert (storage.endpoint_url, storage.region) == ("http://127.0.0.1:1", "eu-west-1")
    assert S3Storage.from_url("s3://bucket").prefix == ""
    assert storage.path(FileInfo("a" * 22, "n", 1, "x", "0" * 64, 0.0)) is None
    asyncio.run(storage.aclose())  # nothing was opened: nothing to close
    with pytest.raises(ValueError):
        S3Storage.from_url("http://bucket")
    with pytest.raises(ValueError):
        S3Storage("bucket", part_size=1 * MIB)


def test_a_missing_bucket_is_named_clearly(s3_server: S3Server) -> None:
    storage = S3Storage("no-such-bucket", endpoint_url=s3_server.endpoint)

    async def body(storage: S3Storage) -> None:
        with pytest.raises(BucketNotFound, match="'no-such-bucket' does not exist"):
            await storage.list(limit=1)

    run(storage, body)


def test_keys_of_a_file(s3_server: S3Server, s3_bucket: str) -> None:
    async def body(storage: S3Storage) -> None:
        info = await storage.save(chunks(b"hi"), name="../a b.txt", type="text/plain")
        name_hash = hashlib.sha256(b"../a b.txt").hexdigest()
        assert sorted(keys(s3_server, s3_bucket)) == sorted(
            [f"pre/files/{info.id}", f"pre/meta/{info.id}.json", f"pre/names/{name_hash}/{info.id}"]
        )
        head = s3_server.client().head_object(Bucket=s3_bucket, Key=f"pre/files/{info.id}")
        assert head["ContentType"] == "text/plain"
        await storage.delete(info.id)
        assert keys(s3_server, s3_bucket) == []

    run(storage_for(s3_server, s3_bucket), body)


def test_a_marker_left_by_a_moved_expiry_does_not_sweep_its_file(
    s3_server: S3Server, s3_bucket: str
) -> None:
    now = time.time()

    async def body(storage: S3Storage) -> None:
        info = await storage.save(chunks(b"hi"), name="b.png", type="x", expires=now + HOUR)
        [old] = [k for k in keys(s3_server, s3_bucket) if "/expiring/" in k]
        await storage.set_expiry(info.id, now + 3 * HOUR)
        # As if the process died before it deleted the old marker.
        s3_server.client().put_object(Bucket=s3_bucket, Key=old, Body=b"")
        assert await storage.expire_files(now + 2 * HOUR) == 0
        assert await read_all(storage, info) == b"hi"
        assert old not in keys(s3_server, s3_bucket)  # the stale marker is gone
        assert await storage.expire_files(now + 4 * HOUR) == 1

    run(storage_for(s3_server, s3_bucket), body)


def test_a_large_body_goes_up_in_parts(s3_server: S3Server, s3_bucket: str) -> None:
    big = os.urandom(12 * MIB)

    async def body(storage: S3Storage) -> None:
        small = await storage.save(chunks(b"x" * MIB), name="small", type="x")
        large = await storage.save(chunks(big), name="large", type="x")
        client = s3_server.client()
        # One PUT for a body smaller than a part; 5 + 5 + 2 MiB parts otherwise.
        assert "-" not in client.head_object(Bucket=s3_bucket, Key=f"pre/files/{small.id}")["ETag"]
        etag = client.head_object(Bucket=s3_bucket, Key=f"pre/files/{large.id}")["ETag"]
        assert etag.strip('"').endswith("-3")
        assert large.sha256 == hashlib.sha256(big).hexdigest()
        assert await read_all(storage, large) == big

    run(storage_for(s3_server, s3_bucket), body)


def test_reads_are_ranged(s3_server: S3Server, s3_bucket: str) -> None:
    data = os.urandom(3 * MIB)

    async def body(storage: S3Storage) -> None:
        info = await storage.save(chunks(data), name="r", type="x")
        gets = spy(storage, "get_object")
        assert await read_all(storage, info, 1000, 2 * MIB) == data[1000 : 2 * MIB]
        assert await read_all(storage, info, 5) == data[5:]
        assert await read_all(storage, info, 10, 10) == b""
        assert [call.get("Range") for call in gets] == [
            f"bytes=1000-{2 * MIB - 1}",
            f"bytes=5-{3 * MIB - 1}",
        ]
        # Read in blocks of about a mebibyte, not in socket-sized pieces.
        sizes = [len(block) async for block in storage.read(info)]
        assert sizes == [MIB, MIB, MIB]

    run(storage_for(s3_server, s3_bucket), body)


def test_find_lists_one_folder(s3_server: S3Server, s3_bucket: str) -> None:
    async def body(storage: S3Storage) -> None:
        for i in range(5):
            await storage.save(chunks(b"%d" % i), name=f"f{i}", type="x")
        wanted = await storage.save(chunks(b"w"), name="f2", type="x")
        listings = spy(storage, "list_objects_v2")
        gets = spy(storage, "get_object")
        assert await storage.find("f2") == wanted
        assert len(listings) == 1 and len(gets) == 1

    run(storage_for(s3_server, s3_bucket), body)


def test_small_appends_gather_in_a_tail_until_a_part_is_full(
    s3_server: S3Server, s3_bucket: str
) -> None:
    data = os.urandom(11 * MIB + 5)
    client = s3_server.client()

    async def body(storage: S3Storage) -> None:
        upload = await storage.create_upload(
            length=len(data), name="t", type="x", metadata="", expires=time.time() + HOUR
        )
        tail = f"pre/uploads/{upload.id}.tail"
        offset = 0
        # 1.5 MiB appends, in 64 KiB chunks, as a tus client with a small chunk size sends.
        while offset < len(data):
            piece = data[offset : offset + 3 * MIB // 2]
            done = await storage.append(upload.id, offset, chunks(piece))
            offset += len(piece)
            assert done.offset == offset
            if offset < len(data):
                state = client.get_object(Bucket=s3_bucket, Key=f"pre/uploads/{upload.id}.json")
                assert state["ContentLength"] > 0
                stored = set(keys(s3_server, s3_bucket))
                multipart = client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]
                [target] = multipart
                parts = client.list_parts(
                    Bucket=s3_bucket, Key=target["Key"], UploadId=target["UploadId"]
                ).get("Parts", [])
                # Every part but the last is at least 5 MiB; the rest waits in the tail.
                assert all(p["Size"] >= 5 * MIB for p in parts)
                in_parts = sum(p["Size"] for p in parts)
                assert (tail in stored) == (in_parts < offset)
        assert done.file is not None
        assert tail not in keys(s3_server, s3_bucket)
        info = await storage.info(done.file)
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert await read_all(storage, info) == data
        etag = client.head_object(Bucket=s3_bucket, Key=f"pre/files/{info.id}")["ETag"]
        assert etag.strip('"').endswith("-3")  # 5 MiB, 5 MiB, then 1 MiB and 5 bytes

    run(storage_for(s3_server, s3_bucket), body)


def test_a_small_upload_in_tiny_appends(s3_server: S3Server, s3_bucket: str) -> None:
    data = b"the quick brown fox"

    async def body(storage: S3Storage) -> None:
        upload = await storage.create_upload(
            length=len(data), name="s", type="x", metadata="", expires=time.time() + HOUR
        )
        for offset in range(0, len(data), 4):
            done = await storage.append(upload.id, offset, chunks(data[offset : offset + 4], 1))
        assert await read_all(storage, await storage.info(done.file or "")) == data

    run(storage_for(s3_server, s3_bucket), body)


def test_expire_aborts_forgotten_multipart_uploads(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    forgotten = client.create_multipart_upload(Bucket=s3_bucket, Key="pre/files/orphan")
    elsewhere = client.create_multipart_upload(Bucket=s3_bucket, Key="other/files/x")

    async def body(storage: S3Storage) -> None:
        upload = await storage.create_upload(
            length=10, name="u", type="x", metadata="", expires=time.time() + 24 * HOUR
        )
        assert await storage.expire(time.time() + 2 * HOUR) == 0
        live = {m["UploadId"] for m in client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]}
        assert forgotten["UploadId"] not in live
        assert elsewhere["UploadId"] in live  # outside the prefix: not ours
        assert (await storage.upload(upload.id)).offset == 0
        assert len(live) == 2  # the live upload's and the other prefix's

    run(storage_for(s3_server, s3_bucket), body)


def test_expire_spares_an_upload_created_while_it_lists(
    s3_server: S3Server, s3_bucket: str
) -> None:
    # The sweep lists multipart uploads, then states, then aborts the
    # multipart uploads no state names. An upload whose multipart upload makes
    # the first listing but whose state comes only after the second is one
    # being created, even if its creation is over by the time the sweep
    # decides; moto dates every multipart upload 2010, so its age is no
    # guard. The app's first sweep runs just as its first uploads are created.
    client = s3_server.client()
    data = b"0123456789"

    async def body(storage: S3Storage) -> None:
        s3: Any = await storage._s3()
        put_object, list_objects = s3.put_object, s3.list_objects_v2
        stating = asyncio.Event()  # the upload is about to put its state
        listed = asyncio.Event()  # the sweep has listed the states
        created = asyncio.Event()  # the upload's creation is over

        async def put_state_late(**kwargs: Any) -> Any:
            if kwargs["Key"].startswith("pre/uploads/"):
                stating.set()
                await listed.wait()
            return await put_object(**kwargs)

        async def list_then_let_creation_end(**kwargs: Any) -> Any:
            listing = await list_objects(**kwargs)
            if kwargs["Prefix"] == "pre/uploads/":
                listed.set()
                await created.wait()
            return listing

        s3.put_object, s3.list_objects_v2 = put_state_late, list_then_let_creation_end
        creating = asyncio.ensure_future(
            storage.create_upload(
                length=len(data), name="u", type="x", metadata="", expires=time.time() + HOUR
            )
        )
        creating.add_done_callback(lambda _: created.set())
        await stating.wait()  # its multipart upload exists, its state not yet
        assert await storage.expire() == 0
        upload = await creating
        s3.put_object, s3.list_objects_v2 = put_object, list_objects

        assert len(client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])) == 1
        done = await storage.append(upload.id, 0, chunks(data))
        assert await read_all(storage, await storage.info(done.file or "")) == data

    run(storage_for(s3_server, s3_bucket), body)


@contextlib.asynccontextmanager
async def refusing_s3(status: int, code: str) -> AsyncIterator[str]:
    """An S3 endpoint that has every bucket but answers every write `status`, S3 error `code`.

    moto cannot say "full"; MinIO, Ceph and the like do, so this plays them.
    """

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        fields = dict(
            line.split(":", 1) for line in head.decode().lower().splitlines()[1:] if ":" in line
        )
        if fields.get("expect", "").strip() != "100-continue":
            await reader.readexactly(int(fields.get("content-length", 0)))
        if head.startswith((b"HEAD ", b"GET ")):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        else:
            body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>no</Message></Error>"
            writer.write(
                f"HTTP/1.1 {status} Refused\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode()
            )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (507, "XMinioStorageFull"),  # MinIO: a drive below its free-space threshold
        (400, "XMinioAdminBucketQuotaExceeded"),  # MinIO: a bucket quota
        (403, "QuotaExceeded"),  # Ceph RGW: a user or bucket quota
        (507, "InsufficientStorage"),  # any other store's 507
    ],
)
def test_a_full_store_is_storage_full(
    status: int, code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in FAKE_AWS.items():
        monkeypatch.setenv(name, value)

    async def main() -> None:
        async with refusing_s3(status, code) as endpoint:
            storage = S3Storage("bucket", endpoint_url=endpoint)
            try:
                with pytest.raises(StorageFull, match="nothing was stored"):
                    await storage.save(chunks(b"data"), name="f", type="x")
                with pytest.raises(StorageFull, match="the upload was not created"):
                    await storage.create_upload(
                        length=4, name="u", type="x", metadata="", expires=time.time() + HOUR
                    )
            finally:
                await storage.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_refusal_that_is_not_about_space_stays_what_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in FAKE_AWS.items():
        monkeypatch.setenv(name, value)

    async def main() -> None:
        async with refusing_s3(403, "AccessDenied") as endpoint:
            storage = S3Storage("bucket", endpoint_url=endpoint)
            try:
                with pytest.raises(ClientError, match="AccessDenied"):
                    await storage.save(chunks(b"data"), name="f", type="x")
            finally:
                await storage.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))
