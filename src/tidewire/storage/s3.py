"""S3Storage: files in an S3-compatible bucket, through aiobotocore.

    <prefix>files/<id>                  the bytes
    <prefix>meta/<id>.json              the metadata; ids sort newest first, so
                                        listing meta/ lists files newest first
    <prefix>names/<sha256(name)>/<id>   empty markers: `find` lists one small
                                        folder instead of reading every file's
    <prefix>expiring/<time>/<id>        empty markers of files saved with an expiry
                                        (`<time>`: its epoch second, 12 digits, so
                                        listing them lists the soonest first):
                                        `expire_files` lists only those past
    <prefix>uploads/<id>.json           a resumable upload's state, with the parts
                                        of its S3 multipart upload
    <prefix>uploads/<id>.tail           its last bytes while they are too few for
                                        a part

A file is listed once its metadata exists, and that is written last (after
the bytes and the name marker) and deleted first. Its bytes go straight to
their final key, so its id is made when the save (or the upload) begins.

Bodies go up in parts of `part_size` (8 MiB) as a multipart upload, one part
sent while the next gathers, or in one PUT when smaller than a part. Appends
to one upload are serialised within a process; S3 has no locks, so, as with
tusd's s3store without a locker, two processes appending to the same upload
at once are not guarded against.

A store that answers "full" (HTTP 507, or a quota's error code) raises
`StorageFull`, saying what was not done.

Credentials come from botocore's usual chain: `AWS_ACCESS_KEY_ID` and
`AWS_SECRET_ACCESS_KEY`, a profile, an instance role...
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from . import (
    FileInfo,
    FileNotFound,
    Page,
    StorageFull,
    UploadNotFound,
    new_id,
    valid_id,
)
from ._blocks import BLOCK, Pump, too_large, uninterrupted
from ._uploads import Hashers, KeyedLocks, State, Uploads, Writer

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

__all__ = ["BucketNotFound", "S3Storage"]

T = TypeVar("T")

#: S3's smallest part, except for an object's last one.
MIN_PART = 5 << 20
MAX_PART = 5 << 30
#: A multipart upload of a save older than this was left by a process that
#: died; `expire` aborts it, so its parts stop costing storage.
STALE_MULTIPART = 3600.0
#: Requests a listing makes at once to fetch its metadata.
FETCHES = 16

_MISSING = {"NoSuchKey", "404", "NotFound"}
#: Error codes that mean no space, whatever the status: MinIO's full drives
#: (507) and bucket quota (400), Ceph RGW's quotas (403). Any 507 counts too.
_FULL = {"XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "QuotaExceeded"}


class BucketNotFound(RuntimeError):
    """The configured bucket does not exist: a deployment error, not a client's."""


class S3Storage(Uploads):
    """Files in an S3 bucket, under `prefix`; nothing is contacted until first use."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        part_size: int = 8 << 20,
    ) -> None:
        if not MIN_PART <= part_size <= MAX_PART:
            raise ValueError(f"part_size must be between {MIN_PART} and {MAX_PART} bytes")
        super().__init__()
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.region = region
        self.part_size = part_size
        self._client: S3Client | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._opening: asyncio.Lock | None = None
        self._locks = KeyedLocks()
        # Keys this process is writing now (saves, uploads being created):
        # `expire` never aborts their multipart uploads, however long a save
        # takes, and whatever date a store reports for them (moto's is fixed).
        self._writing: set[str] = set()

    @classmethod
    def from_url(cls, url: str) -> S3Storage:
        """`s3://bucket[/prefix][?endpoint=URL&region=R]`."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"not an S3 URL (s3://bucket/prefix): {url!r}")
        query = parse_qs(parts.query)

        def option(name: str) -> str | None:
            return query[name][-1] if name in query else None

        return cls(
            parts.netloc, parts.path, endpoint_url=option("endpoint"), region=option("region")
        )

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Storage('s3://{self.bucket}/{self.prefix}'{where})"

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
        s3 = await self._s3()
        id = new_id()
        sha = hashlib.sha256()
        target = _Object(s3, self.bucket, self._file(id), type, [sha])
        published: FileInfo | None = None
        self._writing.add(self._file(id))
        try:
            with _space("nothing was stored"):
                try:
                    pump = Pump(
                        target.write, block=self.part_size, limit=limit, over=too_large(limit)
                    )
                    size = await pump.run(chunks)
                    await target.finish()
                    info = FileInfo(
                        id=id,
                        name=name,
                        size=size,
                        type=type,
                        sha256=sha.hexdigest(),
                        created=time.time(),
                        owner=owner,
                        expires=expires,
                    )
                    published = info
                    await self._publish(info)
                except BaseException:
                    await _whatever(self._discard(target, published))
                    raise
        finally:
            self._writing.discard(self._file(id))
        return info

    async def info(self, id: str) -> FileInfo:
        if not valid_id(id):
            raise FileNotFound(id)
        meta = await self._get_json(self._meta(id))
        if meta is None:
            raise FileNotFound(id)
        return _file_info(meta)

    async def find(self, name: str, *, owner: str | None = None) -> FileInfo:
        s3 = await self._s3()
        folder = f"{self.prefix}names/{_name_hash(name)}/"
        token: str | None = None
        while True:
            listing = await s3.list_objects_v2(
                Bucket=self.bucket,
                Prefix=folder,
                **({"ContinuationToken": token} if token else {}),  # type: ignore[arg-type]
            )
            # Newest first; a marker may outlive its file for a moment (a
            # save that failed, a delete under way), so check the metadata.
            for entry in listing.get("Contents", []):
                id = entry["Key"].removeprefix(folder)
                meta = await self._get_json(self._meta(id)) if valid_id(id) else None
                mine = meta is not None and (owner is None or meta.get("owner") == owner)
                if meta is not None and mine and meta["name"] == name:
                    return _file_info(meta)
            token = listing.get("NextContinuationToken")
            if not listing.get("IsTruncated") or not token:
                raise FileNotFound(name)

    async def list(
        self, *, limit: int, cursor: str | None = None, owner: str | None = None
    ) -> Page:
        if cursor is not None and not valid_id(cursor):
            raise ValueError("not a cursor of this storage")
        s3 = await self._s3()
        folder = f"{self.prefix}meta/"
        limit = min(max(limit, 1), 1000)
        files: list[FileInfo] = []
        # With `owner`, the metadata is filtered as it is read (S3 has no index
        # by owner): pages of keys are read until `limit` files are found.
        while True:
            listing = await s3.list_objects_v2(
                Bucket=self.bucket,
                Prefix=folder,
                MaxKeys=limit,
                StartAfter=f"{folder}{cursor}.json" if cursor else "",
            )
            keys = [entry["Key"] for entry in listing.get("Contents", [])]
            metas = await _gather_bounded((self._get_json(key) for key in keys), FETCHES)
            more = bool(listing.get("IsTruncated"))
            for key, meta in zip(keys, metas, strict=True):
                cursor = key.removeprefix(folder).removesuffix(".json")
                if meta is not None and (owner is None or meta.get("owner") == owner):
                    files.append(_file_info(meta))
                    if len(files) == limit:
                        return Page(files, cursor if more or key != keys[-1] else None)
            if not more or not keys:
                return Page(files, None)

    async def delete(self, id: str) -> None:
        info = await self.info(id)
        await self._unpublish(info)

    async def read(
        self, file: FileInfo, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        if not valid_id(file.id):
            raise FileNotFound(file.id)
        end = file.size if end is None else min(end, file.size)
        if start >= end:
            return
        async for block in self._read(self._file(file.id), start, end, whole=file.size):
            yield block

    def path(self, file: FileInfo) -> None:
        return None

    # -- resumable uploads: create_upload, upload, append, abort are Uploads' --

    async def expire(self, now: float | None = None) -> int:
        s3 = await self._s3()
        now = time.time() if now is None else now
        folder = f"{self.prefix}uploads/"
        # Multipart uploads first, states second, so no live upload is taken
        # for an orphan: one created after the first listing is not in it, and
        # one in it either has its state by the second listing or was still
        # being created when the first ended, its key in `_writing` then.
        multiparts = [
            multipart
            async for page in s3.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}files/"
            )
            for multipart in page.get("Uploads", [])
        ]
        # Then, not when judging: by that time its creation may be over, its
        # state put too late for the listing and its key gone from `_writing`.
        writing = set(self._writing)
        ids = [
            key.removeprefix(folder).removesuffix(".json")
            async for key in self._keys(folder)
            if key.endswith(".json")
        ]
        live: set[str] = set()

        async def one(id: str) -> bool:
            async with self._locks.hold(id):
                state = await self._get_json(self._state_key(id)) if valid_id(id) else None
                if state is None:
                    return False
                if state["expires"] > now:
                    live.add(state["multipart"])
                    return False
                await self.remove_upload(state)
                self.forget_upload(id)
                return True

        removed = sum(await _gather_bounded((one(id) for id in ids), FETCHES))
        # Saves whose process died leave multipart uploads no state names.
        for multipart in multiparts:
            if (
                multipart["UploadId"] not in live
                and multipart["Key"] not in writing
                and multipart["Initiated"].timestamp() < now - STALE_MULTIPART
            ):
                with contextlib.suppress(ClientError):
                    await s3.abort_multipart_upload(
                        Bucket=self.bucket, Key=multipart["Key"], UploadId=multipart["UploadId"]
                    )
        return removed

    async def set_expiry(self, id: str, expires: float) -> None:
        info = await self.info(id)
        if info.expires is None:
            return
        moved = dataclasses.replace(info, expires=expires)
        s3 = await self._s3()
        # The new marker, then the metadata; the old marker last. One left
        # behind (a crash between) is harmless: `expire_files` checks the
        # metadata's expiry before it deletes a file.
        await s3.put_object(Bucket=self.bucket, Key=self._expiring(moved), Body=b"")
        await self._put_json(self._meta(id), _meta_json(moved))
        if self._expiring(moved) != self._expiring(info):
            await s3.delete_object(Bucket=self.bucket, Key=self._expiring(info))

    async def expire_files(self, now: float | None = None) -> int:
        s3 = await self._s3()
        now = time.time() if now is None else now
        folder = f"{self.prefix}expiring/"
        removed = 0
        async for key in self._keys(folder):
            when, _, id = key.removeprefix(folder).partition("/")
            if not when.isdigit() or int(when) > now:
                break  # soonest first: the rest are not due either
            if valid_id(id):
                try:
                    info = await self.info(id)
                    # A marker its file's expiry has moved on from (`set_expiry`).
                    if info.expires is None or info.expires <= now:
                        await self._unpublish(info)
                        removed += 1
                except FileNotFound:
                    # Deleted already, or its save died before the metadata
                    # was written: its bytes may be there still.
                    await s3.delete_object(Bucket=self.bucket, Key=self._file(id))
            await s3.delete_object(Bucket=self.bucket, Key=key)
        return removed

    async def ping(self) -> None:
        s3 = await self._s3()
        await s3.head_bucket(Bucket=self.bucket)

    async def aclose(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._client = self._stack, None, None
            await stack.aclose()

    # -- keys ------------------------------------------------------------

    def _file(self, id: str) -> str:
        return f"{self.prefix}files/{id}"

    def _meta(self, id: str) -> str:
        return f"{self.prefix}meta/{id}.json"

    def _name(self, name: str, id: str) -> str:
        return f"{self.prefix}names/{_name_hash(name)}/{id}"

    def _expiring(self, info: FileInfo) -> str:
        assert info.expires is not None
        # Rounded up, so that a marker is never due before its file.
        return f"{self.prefix}expiring/{math.ceil(info.expires):012d}/{info.id}"

    def _state_key(self, id: str) -> str:
        return f"{self.prefix}uploads/{id}.json"

    def _tail(self, id: str) -> str:
        return f"{self.prefix}uploads/{id}.tail"

    # -- the client ------------------------------------------------------

    async def _s3(self) -> S3Client:
        if self._client is None:
            if self._opening is None:
                self._opening = asyncio.Lock()
            async with self._opening:
                if self._client is None:
                    await self._open()
        assert self._client is not None
        return self._client

    def _s3_now(self) -> S3Client:
        assert self._client is not None, "the client is made by the first call"
        return self._client

    async def _open(self) -> None:
        stack = contextlib.AsyncExitStack()
        config = AioConfig(
            max_pool_connections=32,
            retries={"max_attempts": 3, "mode": "standard"},
            # No CRC of every part on the event loop, and no checksum headers
            # that some S3-compatible stores refuse; parts are whole or the
            # upload fails, and the file's sha256 is ours anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = await stack.enter_async_context(
            get_session().create_client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
            )
        )
        try:
            await client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            await stack.aclose()
            if _code(exc) in ("404", "NoSuchBucket"):
                where = self.endpoint_url or "AWS"
                raise BucketNotFound(
                    f"the S3 bucket {self.bucket!r} does not exist at {where}: create it,"
                    " or name another in the storage URL"
                ) from None
            raise
        except BaseException:
            await stack.aclose()
            raise
        self._client, self._stack = client, stack

    # -- objects ---------------------------------------------------------

    async def _get_bytes(self, key: str) -> bytes:
        response = await self._s3_now().get_object(Bucket=self.bucket, Key=key)
        async with response["Body"] as body:
            return await body.read()

    async def _get_json(self, key: str) -> dict[str, Any] | None:
        s3 = await self._s3()
        try:
            response = await s3.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as body:
                data = await body.read()
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        value: dict[str, Any] = json.loads(data)
        return value

    async def _put_json(self, key: str, value: dict[str, Any]) -> None:
        await self._s3_now().put_object(
            Bucket=self.bucket,
            Key=key,
            Body=json.dumps(value).encode(),
            ContentType="application/json",
        )

    async def _keys(self, folder: str) -> AsyncIterator[str]:
        pages = self._s3_now().get_paginator("list_objects_v2")
        async for page in pages.paginate(Bucket=self.bucket, Prefix=folder):
            for entry in page.get("Contents", []):
                yield entry["Key"]

    async def _read(
        self, key: str, start: int, end: int, whole: int | None = None
    ) -> AsyncIterator[bytes]:
        """The bytes [start, end) of an object, by a ranged GET, in blocks of about BLOCK."""
        s3 = await self._s3()
        ranged = {} if (start, end) == (0, whole) else {"Range": f"bytes={start}-{end - 1}"}
        try:
            response = await s3.get_object(Bucket=self.bucket, Key=key, **ranged)  # type: ignore[arg-type]
        except ClientError as exc:
            if _code(exc) in (*_MISSING, "InvalidRange"):
                raise FileNotFound(key.rsplit("/", 1)[-1]) from None
            raise
        async with response["Body"] as body:
            gathered: list[bytes] = []
            size = 0
            while chunk := await body.read(BLOCK - size):
                gathered.append(chunk)
                size += len(chunk)
                if size >= BLOCK:
                    yield b"".join(gathered)
                    gathered, size = [], 0
            if gathered:
                yield b"".join(gathered)

    async def _publish(self, info: FileInfo) -> None:
        s3 = self._s3_now()
        await s3.put_object(Bucket=self.bucket, Key=self._name(info.name, info.id), Body=b"")
        if info.expires is not None:
            # Before the metadata: a listed file that expires is always swept.
            await s3.put_object(Bucket=self.bucket, Key=self._expiring(info), Body=b"")
        # Last: from now on the file is listed.
        await self._put_json(self._meta(info.id), _meta_json(info))

    async def _unpublish(self, info: FileInfo) -> None:
        s3 = self._s3_now()
        # First: from now on the file is not listed.
        await s3.delete_object(Bucket=self.bucket, Key=self._meta(info.id))
        keys = [self._name(info.name, info.id), self._file(info.id)]
        if info.expires is not None:
            keys.append(self._expiring(info))
        await s3.delete_objects(
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
        )

    async def _discard(self, target: _Object, info: FileInfo | None) -> None:
        await target.discard()
        if info is not None:
            await self._unpublish(info)

    async def _sha256_of(self, key: str, size: int) -> str:
        sha = hashlib.sha256()
        if size:
            async for block in self._read(key, 0, size, whole=size):
                await asyncio.to_thread(sha.update, block)
        return sha.hexdigest()

    # -- uploads: the backend of _uploads.Uploads -------------------------

    def lock_upload(self, id: str) -> AbstractAsyncContextManager[None]:
        # Within this process only: see the module's docstring.
        return self._locks.hold(id)

    async def load_upload(self, id: str) -> tuple[State, int]:
        state = await self._get_json(self._state_key(id)) if valid_id(id) else None
        if state is None:
            raise UploadNotFound(id)
        return state, _offset(state)

    async def start_upload(self, state: State) -> None:
        s3 = await self._s3()
        # The file's id is made now: its bytes go straight to their final key.
        target = new_id(state["created"])
        self._writing.add(self._file(target))  # until its state names it
        try:
            with _space("the upload was not created"):
                created = await s3.create_multipart_upload(
                    Bucket=self.bucket, Key=self._file(target), ContentType=state["type"]
                )
                state.update(target=target, multipart=created["UploadId"], parts=[], tail=0)
                try:
                    await self._put_state(state)
                except BaseException:
                    await _whatever(self._abort_multipart(state))
                    raise
        finally:
            self._writing.discard(self._file(target))

    @contextlib.asynccontextmanager
    async def write_upload(
        self, state: State, offset: int, hashers: Hashers
    ) -> AsyncIterator[Writer]:
        # Bytes that were too few for a part go first, like tusd's s3store
        # does with its ".part" object.
        tail = b""
        if state["tail"]:
            tail = await self._get_bytes(self._tail(state["id"]))
            if len(tail) != state["tail"]:
                raise RuntimeError(f"the stored tail of upload {state['id']} is damaged")
        yield _UploadWriter(self, state, tail, hashers)

    async def save_upload(self, state: State) -> None:
        # The state is what holds the parts, so the bytes are kept only once it is saved.
        with _space("the upload's state was not saved"):
            await self._put_state(state)

    async def complete_upload(self, state: State, sha256: str | None) -> str:
        s3 = self._s3_now()
        key = self._file(state["target"])
        with _space("the last bytes arrived, but no file was made"):
            if state["parts"]:
                await s3.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=state["multipart"],
                    MultipartUpload={"Parts": _completed(state["parts"])},
                )
            else:
                # An empty file: S3 will not complete a multipart upload of no parts.
                await self._abort_multipart(state)
                await s3.put_object(
                    Bucket=self.bucket, Key=key, Body=b"", ContentType=state["type"]
                )
            if sha256 is None:
                sha256 = await self._sha256_of(key, state["length"])
            info = FileInfo(
                id=state["target"],
                name=state["name"],
                size=state["length"],
                type=state["type"],
                sha256=sha256,
                created=time.time(),
                owner=state.get("owner"),
            )
            await self._publish(info)
        return info.id

    async def remove_upload(self, state: State) -> None:
        s3 = self._s3_now()
        if state["file"] is None:
            await self._abort_multipart(state)
            await s3.delete_object(Bucket=self.bucket, Key=self._tail(state["id"]))
        await s3.delete_object(Bucket=self.bucket, Key=self._state_key(state["id"]))

    async def _put_state(self, state: State) -> None:
        await self._put_json(self._state_key(state["id"]), state)

    async def _abort_multipart(self, state: State) -> None:
        with contextlib.suppress(ClientError):  # already gone
            await self._s3_now().abort_multipart_upload(
                Bucket=self.bucket, Key=self._file(state["target"]), UploadId=state["multipart"]
            )


class _UploadWriter:
    """An append's bytes, sent as parts of the upload's multipart upload.

    Its last bytes, when too few for a part and not the file's end, wait in
    the `.tail` object; the next append sends them first.
    """

    def __init__(self, storage: S3Storage, state: State, tail: bytes, hashers: Hashers) -> None:
        self.block = storage.part_size
        self.head = tail
        self._storage = storage
        self._state = state
        self._object = _Object(
            storage._s3_now(),
            storage.bucket,
            storage._file(state["target"]),
            state["type"],
            hashers,
            multipart=state["multipart"],
            parts=state["parts"],
            skip=len(tail),
            length=state["length"],
        )

    async def write(self, parts: list[bytes], last: bool) -> None:
        with _space("nothing was stored"):
            await self._object.write(parts, last)

    async def rollback(self) -> None:
        # Nothing to undo: parts sent meanwhile are left out of the state,
        # the next append sends those part numbers again, replacing them,
        # and completion names only the parts in the state.
        pass

    async def keep(self) -> int:
        storage, id = self._storage, self._state["id"]
        s3 = storage._s3_now()
        written = self._object
        with _space("nothing was stored"):
            if written.tail is not None:
                await s3.put_object(Bucket=storage.bucket, Key=storage._tail(id), Body=written.tail)
            elif self.head:
                await s3.delete_object(Bucket=storage.bucket, Key=storage._tail(id))
        self._state["parts"] = written.parts
        self._state["tail"] = len(written.tail or b"")
        return _offset(self._state)


class _Object:
    """An object written in blocks: a multipart upload, or one PUT when it is small.

    For a resumable upload (`length` given) the last block of an append that
    is too small for a part and does not end the file is kept in `tail`
    instead, for the caller to store until the next append.
    """

    def __init__(
        self,
        s3: S3Client,
        bucket: str,
        key: str,
        type: str,
        hashers: list[Any],
        *,
        multipart: str | None = None,
        parts: Iterable[dict[str, Any]] = (),
        skip: int = 0,
        length: int | None = None,
    ) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._key = key
        self._type = type
        self._hashers = hashers
        self._multipart = multipart
        self._skip = skip  # bytes at the start that were hashed before (a tail)
        self._length = length
        self.parts = list(parts)
        self.tail: bytes | None = None
        self._put = False

    async def write(self, chunks: list[bytes], last: bool) -> None:
        data = await asyncio.to_thread(_join_and_hash, chunks, self._hashers, self._skip)
        self._skip = 0
        if self._length is None:
            if last and self._multipart is None:
                await self._s3.put_object(
                    Bucket=self._bucket, Key=self._key, Body=data, ContentType=self._type
                )
                self._put = True
                return
        elif last and len(data) < MIN_PART and self._stored + len(data) < self._length:
            self.tail = data
            return
        await self._send_part(data)

    @property
    def _stored(self) -> int:
        return sum(int(part["Size"]) for part in self.parts)

    async def _send_part(self, data: bytes) -> None:
        if self._multipart is None:
            created = await self._s3.create_multipart_upload(
                Bucket=self._bucket, Key=self._key, ContentType=self._type
            )
            self._multipart = created["UploadId"]
        number = len(self.parts) + 1
        sent = await self._s3.upload_part(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._multipart,
            PartNumber=number,
            Body=data,
        )
        self.parts.append({"PartNumber": number, "ETag": sent["ETag"], "Size": len(data)})

    async def finish(self) -> None:
        if self._multipart is not None:
            await self._s3.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._multipart,
                MultipartUpload={
                    "Parts": [
                        {"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in self.parts
                    ]
                },
            )
            self._multipart, self._put = None, True
        elif not self._put:
            await self._s3.put_object(
                Bucket=self._bucket, Key=self._key, Body=b"", ContentType=self._type
            )
            self._put = True

    async def discard(self) -> None:
        if self._multipart is not None:
            with contextlib.suppress(ClientError):
                await self._s3.abort_multipart_upload(
                    Bucket=self._bucket, Key=self._key, UploadId=self._multipart
                )
        if self._put:
            await self._s3.delete_object(Bucket=self._bucket, Key=self._key)


def _join_and_hash(chunks: list[bytes], hashers: list[Any], skip: int) -> bytes:
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    view = memoryview(data)[skip:]
    for hasher in hashers:
        hasher.update(view)
    return data


def _completed(parts: list[dict[str, Any]]) -> list[CompletedPartTypeDef]:
    return [{"PartNumber": part["PartNumber"], "ETag": part["ETag"]} for part in parts]


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _space(undone: str) -> Iterator[None]:
    """Turn an answer that means "no space" into `StorageFull`, saying what was `undone`."""
    try:
        yield
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 507 or _code(exc) in _FULL:
            raise StorageFull(undone) from exc
        raise


def _name_hash(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


def _meta_json(info: FileInfo) -> dict[str, Any]:
    """What `meta/<id>.json` holds: the public metadata, the owner and the expiry."""
    return {**info.json(), "owner": info.owner, "expires": info.expires}


def _file_info(meta: dict[str, Any]) -> FileInfo:
    return FileInfo(
        id=meta["id"],
        name=meta["name"],
        size=meta["size"],
        type=meta["type"],
        sha256=meta["sha256"],
        created=meta["created"],
        owner=meta.get("owner"),
        expires=meta.get("expires"),
    )


def _offset(state: State) -> int:
    if state["file"] is not None:
        return int(state["length"])
    return sum(int(part["Size"]) for part in state["parts"]) + int(state["tail"])


async def _gather_bounded(jobs: Iterable[Awaitable[T]], at_once: int) -> list[T]:
    gate = asyncio.Semaphore(at_once)

    async def one(job: Awaitable[T]) -> T:
        async with gate:
            return await job

    return await asyncio.gather(*(one(job) for job in jobs))


async def _whatever(cleanup: Awaitable[None]) -> None:
    """Run a cleanup to its end even through a cancellation; its own failure is not the news."""
    with contextlib.suppress(Exception):
        await uninterrupted(cleanup)
