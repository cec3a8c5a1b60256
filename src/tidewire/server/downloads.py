"""Sending a stored file: `send_file`, the one answer to every download.

`GET /files/{id}`, `HEAD` and the original `/downloadfile/` all end here,
whatever the storage. The decisions are made once, from the request and the
file's metadata (304 or not, which ranges, inline or attachment, which
headers), and then the bytes are sent one of three ways:

- a local file: a `FileResponse` (zero-copy where the server offers it),
  told our ranges rather than reading the Range header itself;
- a local file behind nginx (`Settings.accel_redirect`): our headers and
  `X-Accel-Redirect`, and nginx sends the bytes;
- a remote file (S3): streamed through `Storage.read`, ranges and
  multipart/byteranges framed here.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..metrics import count_download
from ..storage import FileInfo, FileNotFound, Storage
from .errors import storage_error, storage_errors
from .headers import (
    Unsatisfiable,
    byteranges,
    clean_type,
    content_disposition,
    http_date,
    if_range_matches,
    inline_safe,
    not_modified,
    parse_range,
)

if TYPE_CHECKING:
    from ..app import Tidewire

__all__ = ["send_file"]


class _LocalFile(FileResponse):
    """A `FileResponse` whose ranges were decided already, by `parse_range` and `If-Range`.

    `FileResponse` reads `Range` and `If-Range` from the request itself (and
    answers a malformed Range with a plain-text 400). So that local and remote
    files behave the same, it sees our decision instead: no Range header when
    the whole file is to be sent, else the merged ranges, written canonically.
    """

    # Where the server offers no `http.response.pathsend` (uvicorn, hypercorn),
    # Starlette reads and sends `chunk_size` bytes at a time: at its 64 KiB, a
    # thread hop and a send per 64 KiB held uvicorn to ~0.4x nginx; at 1 MiB it
    # is past nginx (bench W5), for ~2 MiB more memory per download.
    chunk_size = 1 << 20

    def __init__(self, ranges: list[tuple[int, int]] | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ranges = ranges

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"range", b"if-range")]
        if self.ranges:
            spec = ",".join(f"{start}-{end - 1}" for start, end in self.ranges)
            headers.append((b"range", f"bytes={spec}".encode("latin-1")))
        await super().__call__({**scope, "headers": headers}, receive, send)


async def _read(
    storage: Storage, info: FileInfo, start: int, end: int | None = None
) -> AsyncIterator[bytes]:
    chunks = storage.read(info, start, end)
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        # A client that leaves midway must not leave the storage's reader
        # (and its connection) open until garbage collection.
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


def _remote_file(
    storage: Storage,
    info: FileInfo,
    headers: dict[str, str],
    ranges: list[tuple[int, int]] | None,
    head: bool,
) -> Response:
    """The file's bytes from `storage.read`: whole, one range, or multipart/byteranges."""
    size = info.size
    if not ranges:
        status, length = 200, size
        body = _read(storage, info, 0)
    elif len(ranges) == 1:
        [(start, end)] = ranges
        status, length = 206, end - start
        headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
        body = _read(storage, info, start, end)
    else:
        boundary = secrets.token_hex(13)
        heads, tail, length = byteranges(ranges, size, headers["content-type"], boundary)
        headers["content-type"] = f"multipart/byteranges; boundary={boundary}"
        status = 206

        async def parts() -> AsyncIterator[bytes]:
            for part_head, (start, end) in zip(heads, ranges, strict=True):
                yield part_head
                async for chunk in _read(storage, info, start, end):
                    yield chunk
                yield b"\r\n"
            yield tail

        body = parts()

    headers["content-length"] = str(length)
    if head:
        # `body` was never started, so it has read nothing and holds nothing.
        return Response(status_code=status, headers=headers)
    return StreamingResponse(body, status_code=status, headers=headers)


def _file_headers(info: FileInfo, *, attachment: bool) -> dict[str, str]:
    kind = clean_type(info.type) or "application/octet-stream"
    safe = inline_safe(kind)
    headers = {
        "content-type": kind,
        "content-disposition": content_disposition(info.name, inline=safe and not attachment),
        "etag": info.etag,
        "last-modified": http_date(info.created),
        # Caches may keep a file, and revalidate it (If-None-Match: a 304) each time.
        "cache-control": "no-cache",
        "accept-ranges": "bytes",
        "x-content-type-options": "nosniff",
    }
    if not safe:
        # Even opened directly, a document of this type runs in a unique
        # origin with no script: it can never act as our site.
        headers["content-security-policy"] = "sandbox"
    return headers


def _ranges(request: Request, info: FileInfo) -> list[tuple[int, int]] | None:
    """The ranges to send; None for the whole file. Raises `Unsatisfiable`."""
    range_header = request.headers.get("range")
    # Ranges are defined for GET only (RFC 9110, 14.2): HEAD and the POST of
    # /downloadfile/ get the whole file.
    if request.method != "GET" or range_header is None:
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and not if_range_matches(if_range, info.etag, info.created):
        return None  # the file changed since the client's copy: send it all
    return parse_range(range_header, info.size)


async def send_file(
    request: Request,
    tw: Tidewire,
    info: FileInfo,
    *,
    attachment: bool = False,
) -> Response:
    """Answer `request` with a file: conditional, ranged, safe to open in a browser."""
    storage = tw.storage
    headers = _file_headers(info, attachment=attachment)
    reading = request.method in ("GET", "HEAD")
    if reading and not_modified(request.headers, info.etag, info.created):
        kept = ("etag", "last-modified", "cache-control", "x-content-type-options")
        return Response(status_code=304, headers={k: headers[k] for k in kept})
    try:
        ranges = _ranges(request, info)
    except Unsatisfiable:
        return JSONResponse(
            {"detail": f"the range is outside the file: it has {info.size} bytes"},
            status_code=416,
            headers={"content-range": f"bytes */{info.size}", "x-content-type-options": "nosniff"},
        )

    # The bytes of the answer are counted as they are sent (server/observe.py);
    # an X-Accel-Redirect answer has none: nginx counts those.
    count_download(request.scope)
    with storage_errors():
        path = storage.path(info)
    if path is None:
        return _remote_file(storage, info, headers, ranges, head=request.method == "HEAD")

    accel = tw.settings.accel_redirect
    if accel is not None and request.method == "GET":
        # nginx sends the bytes (and does ranges itself); see add_file_routes.
        headers["x-accel-redirect"] = f"{accel}{info.id}"
        headers.pop("accept-ranges")
        return Response(headers=headers)
    try:
        stat = await anyio.to_thread.run_sync(path.stat)
    except FileNotFoundError:
        raise storage_error(FileNotFound(info.id)) from None  # deleted since its metadata was read
    return _LocalFile(ranges, path=path, headers=headers, stat_result=stat)
