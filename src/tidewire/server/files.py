"""Routes for files: upload (multipart or a raw body), list, download with ranges, delete.

Uploads stream: a multipart body is parsed as it arrives and each file part's
bytes go straight into `Storage.save`, so a file is written once and memory
stays flat whatever its size. Downloads of local files are `FileResponse`s
(zero-copy where the server offers it, or `X-Accel-Redirect` behind nginx);
remote files (S3) stream through a response of our own with the same
semantics: ranges, `If-Range`, `If-None-Match`, `HEAD`.

A file's name is only a label. It is never used to build a path: it goes
into the metadata and, made safe, into `Content-Disposition`.

The header logic (`parse_range`, `etag_matches`, `if_range_matches`,
`content_disposition`, `inline_safe`, `clean_type`) is pure, so that it is
tested on its own.
"""

from __future__ import annotations

import codecs
import mimetypes
import re
import secrets
import unicodedata
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlencode

import anyio
import orjson
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from ..storage import (
    ChecksumMismatch,
    FileInfo,
    FileNotFound,
    OffsetMismatch,
    Storage,
    StorageError,
    StorageFull,
    TooLarge,
    UploadNotFound,
    valid_id,
)

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

    from ..app import Tidewire

__all__ = [
    "MAX_NAME",
    "FileMetadata",
    "Unsatisfiable",
    "add_file_routes",
    "add_original_file_routes",
    "clean_name",
    "clean_type",
    "content_disposition",
    "etag_matches",
    "if_range_matches",
    "inline_safe",
    "parse_range",
    "receive_files",
    "send_file",
    "storage_errors",
    "storage_status",
]

#: Longest file name (a label) accepted, in characters.
MAX_NAME = 255
#: Most files one multipart request may carry.
MAX_FILES = 100
#: A Range header with more ranges than this is ignored (the whole file is sent):
#: many tiny ranges cost far more than the bytes they ask for.
MAX_RANGES = 100
#: Largest JSON or form body `/downloadfile/` reads to find a file name.
MAX_SMALL_BODY = 64 << 10

# -- errors ----------------------------------------------------------------

# The one place storage errors become HTTP statuses (see storage/__init__.py).
_STATUS: dict[type[StorageError], int] = {
    FileNotFound: 404,
    UploadNotFound: 404,
    TooLarge: 413,
    OffsetMismatch: 409,
    ChecksumMismatch: 460,
    StorageFull: 507,
}


def storage_status(exc: StorageError) -> int:
    """The HTTP status a storage error means."""
    for kind in type(exc).__mro__:
        if kind in _STATUS:
            return _STATUS[kind]
    return 400  # a StorageError is something the client can act on


def _storage_detail(exc: StorageError) -> str:
    if isinstance(exc, FileNotFound):
        return f"no file {_show(str(exc))}"
    if isinstance(exc, TooLarge):
        return f"the file is too large: at most {exc.limit} bytes may be stored"
    if isinstance(exc, StorageFull):
        return "the storage is full: nothing was stored; try again later"
    return str(exc) or type(exc).__name__


@contextmanager
def storage_errors() -> Iterator[None]:
    """Turn a `StorageError` raised inside into the HTTP error it means."""
    try:
        yield
    except StorageError as exc:
        status = storage_status(exc)
        headers = {"connection": "close"} if status == 413 else None
        raise HTTPException(status, _storage_detail(exc), headers) from None


def _show(value: str, limit: int = 80) -> str:
    """A client's string, quoted and cut short, for an error message."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _no_file(id: str) -> HTTPException:
    return HTTPException(404, f"no file {_show(id)}; GET /files lists them")


# -- names and types -------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean_name(name: str) -> str:
    """A file name checked for use as a label; `ValueError` says what is wrong.

    Names are never paths, so `../x` or `C:\\x` are fine labels; what is
    refused is what no file name should hold: control characters (NUL, line
    breaks, terminal escapes), and names that are empty or too long.
    """
    if not name.strip():
        raise ValueError("the file name is empty")
    if len(name) > MAX_NAME:
        raise ValueError(f"the file name is longer than {MAX_NAME} characters")
    if _CONTROL.search(name):
        raise ValueError("the file name contains control characters")
    return name


_TOKEN = r"[A-Za-z0-9!#$&^_.+-]+"
_MEDIA_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})\Z")
_CHARSET = re.compile(rf"charset\s*=\s*\"?({_TOKEN})\"?\Z", re.IGNORECASE)

#: Content types that say nothing about the content: the name says more.
_GENERIC = frozenset(
    {
        "application/octet-stream",
        "binary/octet-stream",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "application/unknown",
    }
)


def clean_type(value: str | None) -> str | None:
    """A media type reduced to `type/subtype[; charset=x]`, lower case; None if malformed."""
    if not value:
        return None
    essence, *params = value.split(";")
    match = _MEDIA_TYPE.match(essence.strip())
    if match is None:
        return None
    kind = essence.strip().lower()
    for param in params:
        charset = _CHARSET.match(param.strip())
        if charset is not None:
            return f"{kind}; charset={charset.group(1).lower()}"
    return kind


def upload_type(declared: str | None, name: str) -> str:
    """The type to store: the declared one if it says something, else guessed from the name."""
    kind = clean_type(declared)
    if kind is not None and kind.split(";")[0] not in _GENERIC:
        return kind
    return mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"


# Types a browser may show from our origin: none of them can run script.
# Everything else (HTML, SVG, XML, JavaScript, unknown types...) is sent as an
# attachment inside a CSP sandbox, whatever the uploader claimed.
_INLINE = frozenset(
    {
        "text/plain",
        "application/json",
        "application/pdf",
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "image/avif",
        "image/apng",
        "image/bmp",
        "image/x-icon",
        "image/vnd.microsoft.icon",
    }
)


def inline_safe(kind: str) -> bool:
    """Whether a browser may display this type inline from our origin."""
    essence = kind.split(";")[0].strip().lower()
    return essence in _INLINE or essence.startswith(("audio/", "video/"))


# Kept out of the ASCII `filename=`: what ends or escapes the quoted string,
# path separators, and `%`, which some browsers decode there.
_UNSAFE_IN_FALLBACK = re.compile(r'[^\x20-\x7e]|["\\/%;]')


def content_disposition(name: str, *, inline: bool = False) -> str:
    """`inline`/`attachment` with an ASCII `filename=` and a UTF-8 `filename*=` (RFC 6266)."""
    disposition = "inline" if inline else "attachment"
    name = unicodedata.normalize("NFC", name)
    if not name.strip(". ") or _CONTROL.search(name):
        name = "download"  # no browser would save under "..", "" or a control character
    fallback = _UNSAFE_IN_FALLBACK.sub("_", name)
    # RFC 5987 attr-char: everything else is percent-encoded.
    encoded = quote(name, safe="!#$&+-.^_`|~")
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


# -- conditional requests and ranges --------------------------------------

_ENTITY_TAG = re.compile(r'\s*((?:W/)?"[^"]*")\s*(?:,|\Z)')


def _entity_tags(header: str) -> list[str] | None:
    """The entity-tags of an `If-None-Match` list; None if the header is malformed."""
    tags, pos = [], 0
    header = header.strip()
    while pos < len(header):
        match = _ENTITY_TAG.match(header, pos)
        if match is None:
            return None
        tags.append(match.group(1))
        pos = match.end()
    return tags


def etag_matches(header: str, etag: str) -> bool:
    """Whether `If-None-Match: header` matches `etag` (weak comparison, `*` matches any)."""
    if header.strip() == "*":
        return True
    tags = _entity_tags(header)
    return tags is not None and etag.removeprefix("W/") in (t.removeprefix("W/") for t in tags)


def _http_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def if_range_matches(header: str, etag: str, modified: float) -> bool:
    """Whether `If-Range: header` lets a range through: the same strong ETag, or date."""
    header = header.strip()
    if header.startswith("W/"):
        return False  # a weak tag never validates a range
    if header.startswith('"'):
        return header == etag
    date = _http_date(header)
    return date is not None and int(date) == int(modified)


def not_modified(request: Request, etag: str, modified: float) -> bool:
    """Whether a GET or HEAD may be answered 304."""
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        return etag_matches(if_none_match, etag)
    since = request.headers.get("if-modified-since")
    if since is not None:
        date = _http_date(since)
        return date is not None and int(modified) <= date
    return False


class Unsatisfiable(Exception):
    """None of the requested ranges overlaps the file: 416."""


_RANGE_SPEC = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*\Z")


def parse_range(header: str, size: int) -> list[tuple[int, int]] | None:
    """The byte ranges `[start, end)` a `Range` header asks of `size` bytes.

    Sorted, with overlapping and adjacent ranges merged. None when the header
    is to be ignored and the whole file sent: another unit, bad syntax, too
    many ranges, or a suffix range of an empty file. Raises `Unsatisfiable`
    when no range overlaps the file (RFC 9110, 14.1.2).
    """
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    # Empty list elements ("0-1,,2-3") are allowed and skipped.
    specs = [part for part in spec.split(",") if part.strip()]
    if not specs or len(specs) > MAX_RANGES:
        return None
    ranges: list[tuple[int, int]] = []
    whole_empty_file = False
    for part in specs:
        match = _RANGE_SPEC.match(part)
        if match is None:
            return None
        first, last = match.groups()
        try:
            if first:
                start = int(first)
                end = int(last) + 1 if last else size
                if last and end <= start:
                    return None  # last < first: the header is invalid
                if start < size:
                    ranges.append((start, min(end, size)))
            elif last:
                length = int(last)
                if length > 0 and size == 0:
                    whole_empty_file = True  # satisfiable, but there is no byte to send
                elif length > 0:
                    ranges.append((max(size - length, 0), size))
            else:
                return None  # "-" alone
        except ValueError:  # more digits than int() takes
            return None
    if not ranges:
        if whole_empty_file:
            return None
        raise Unsatisfiable
    ranges.sort()
    merged = [ranges[0]]
    for start, end in ranges[1:]:
        last_start, last_end = merged[-1]
        if start <= last_end:
            merged[-1] = (last_start, max(last_end, end))
        else:
            merged.append((start, end))
    return merged


def _byteranges(
    ranges: list[tuple[int, int]], size: int, kind: str, boundary: str
) -> tuple[list[bytes], bytes, int]:
    """The part headers and closing line of a multipart/byteranges body, and its length."""
    heads = [
        (
            f"--{boundary}\r\nContent-Type: {kind}\r\n"
            f"Content-Range: bytes {start}-{end - 1}/{size}\r\n\r\n"
        ).encode("latin-1")
        for start, end in ranges
    ]
    tail = f"--{boundary}--".encode("latin-1")
    length = sum(len(h) + (end - start) + 2 for h, (start, end) in zip(heads, ranges, strict=True))
    return heads, tail, length + len(tail)


# -- responses -------------------------------------------------------------


class _LocalFile(FileResponse):
    """A `FileResponse` whose ranges were decided already, by `parse_range` and `If-Range`.

    `FileResponse` reads `Range` and `If-Range` from the request itself (and
    answers a malformed Range with a plain-text 400). So that local and remote
    files behave the same, it sees our decision instead: no Range header when
    the whole file is to be sent, else the merged ranges, written canonically.
    """

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

        async def body() -> AsyncIterator[bytes]:
            async for chunk in _read(storage, info, 0):
                yield chunk

    elif len(ranges) == 1:
        [(start, end)] = ranges
        status, length = 206, end - start
        headers["content-range"] = f"bytes {start}-{end - 1}/{size}"

        async def body() -> AsyncIterator[bytes]:
            async for chunk in _read(storage, info, start, end):
                yield chunk

    else:
        boundary = secrets.token_hex(13)
        heads, tail, length = _byteranges(ranges, size, headers["content-type"], boundary)
        headers["content-type"] = f"multipart/byteranges; boundary={boundary}"
        status = 206

        async def body() -> AsyncIterator[bytes]:
            for head, (start, end) in zip(heads, ranges, strict=True):
                yield head
                async for chunk in _read(storage, info, start, end):
                    yield chunk
                yield b"\r\n"
            yield tail

    headers["content-length"] = str(length)
    if head:
        return Response(status_code=status, headers=headers)
    return StreamingResponse(body(), status_code=status, headers=headers)


def _file_headers(info: FileInfo, *, attachment: bool) -> dict[str, str]:
    kind = clean_type(info.type) or "application/octet-stream"
    safe = inline_safe(kind)
    headers = {
        "content-type": kind,
        "content-disposition": content_disposition(info.name, inline=safe and not attachment),
        "etag": info.etag,
        "last-modified": formatdate(info.created, usegmt=True),
        "accept-ranges": "bytes",
        "x-content-type-options": "nosniff",
    }
    if not safe:
        # Even opened directly, a document of this type runs in a unique
        # origin with no script: it can never act as our site.
        headers["content-security-policy"] = "sandbox"
    return headers


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
    if reading and not_modified(request, info.etag, info.created):
        kept = ("etag", "last-modified", "x-content-type-options")
        return Response(status_code=304, headers={k: headers[k] for k in kept})

    ranges: list[tuple[int, int]] | None = None
    range_header = request.headers.get("range")
    # Ranges are defined for GET only (RFC 9110, 14.2): HEAD and the POST of
    # /downloadfile/ get the whole file.
    if request.method == "GET" and range_header is not None:
        if_range = request.headers.get("if-range")
        if if_range is None or if_range_matches(if_range, info.etag, info.created):
            try:
                ranges = parse_range(range_header, info.size)
            except Unsatisfiable:
                return JSONResponse(
                    {"detail": f"the range is outside the file: it has {info.size} bytes"},
                    status_code=416,
                    headers={
                        "content-range": f"bytes */{info.size}",
                        "x-content-type-options": "nosniff",
                    },
                )

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
        raise _no_file(info.id) from None  # deleted since its metadata was read
    return _LocalFile(ranges, path=path, headers=headers, stat_result=stat)


# -- multipart -------------------------------------------------------------


class BadMultipart(Exception):
    """The body is not the multipart/form-data it claims to be."""


@dataclass(frozen=True, slots=True)
class Part:
    """One part's headers: its field, its file name (None for a plain field), its type."""

    field: str
    filename: str | None
    type: str | None


_Event = Literal["headers", "data", "end_part", "end"]
_FILENAME_STAR = re.compile(r"filename\*\s*=\s*([^;]+)", re.IGNORECASE)


def _decode(raw: bytes) -> str:
    # Browsers send names as raw UTF-8; anything else is read as Latin-1.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _part(headers: list[tuple[bytes, bytes]]) -> Part:
    found = dict(headers)
    disposition = found.get(b"content-disposition", b"")
    _, options = parse_options_header(disposition)
    if b"name" not in options:
        raise BadMultipart('a part has no Content-Disposition "name"')
    filename: str | None = None
    if b"filename" in options:
        filename = _decode(options[b"filename"])
    else:
        # RFC 7578 forbids `filename*=`, but some clients send only that.
        star = _FILENAME_STAR.search(disposition.decode("latin-1"))
        if star is not None:
            charset, _, rest = star.group(1).strip().strip('"').partition("''")
            try:
                filename = unquote(rest, encoding=codecs.lookup(charset).name, errors="strict")
            except (LookupError, UnicodeDecodeError):
                raise BadMultipart("a part's filename* cannot be decoded") from None
    content_type = found.get(b"content-type")
    return Part(
        _decode(options[b"name"]),
        filename,
        content_type.decode("latin-1") if content_type is not None else None,
    )


class MultipartStream:
    """multipart/form-data read off a byte stream one part at a time.

    `next_part()` gives the next part's headers; `body()` then yields that
    part's bytes as they arrive. The request is read only as fast as the body
    is consumed, so a slow storage slows the client down instead of filling
    memory, and a failure anywhere stops the reading. No queue or task is
    needed: the storage's `save` pulls the bytes, and pulling drives the parser.
    """

    def __init__(self, chunks: AsyncIterator[bytes], boundary: bytes) -> None:
        self._chunks = chunks
        # What the parser found in the last chunk, in order; `_data` and
        # `_parts` hold the payloads of the "data" and "headers" events.
        self._events: deque[_Event] = deque()
        self._data: deque[bytes] = deque()
        self._parts: deque[list[tuple[bytes, bytes]]] = deque()
        self._field = bytearray()
        self._value = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": lambda: self._events.append("end_part"),
            "on_end": lambda: self._events.append("end"),
        }
        try:
            self._parser = MultipartParser(boundary, callbacks)
        except FormParserError as exc:
            raise BadMultipart(str(exc)) from None

    def _part_begin(self) -> None:
        self._headers = []

    def _header_end(self) -> None:
        self._headers.append((bytes(self._field).lower(), bytes(self._value)))
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        self._events.append("headers")
        self._parts.append(self._headers)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self._events.append("data")
            self._data.append(data[start:end])

    async def _event(self) -> _Event:
        while not self._events:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                raise BadMultipart("the body ended before its closing boundary") from None
            try:
                self._parser.write(chunk)
            except FormParserError as exc:
                raise BadMultipart(str(exc)) from None
        return self._events.popleft()

    async def next_part(self) -> Part | None:
        """The next part's headers (the rest of the current part is skipped); None at the end."""
        while True:
            event = await self._event()
            if event == "headers":
                return _part(self._parts.popleft())
            if event == "data":
                self._data.popleft()
            elif event == "end":
                return None

    async def body(self) -> AsyncIterator[bytes]:
        """The current part's bytes, up to its end."""
        while True:
            event = await self._event()
            if event == "data":
                yield self._data.popleft()
            elif event == "end_part":
                return
            else:
                raise BadMultipart("a part ended without its boundary")


def _boundary(request: Request, hint: str) -> bytes:
    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data":
        raise HTTPException(415, f"send multipart/form-data: {hint}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "the multipart/form-data Content-Type has no boundary")
    return boundary


async def _discard(storage: Storage, files: list[FileInfo]) -> None:
    # Shielded: a cancelled request must still take back what it stored.
    with anyio.CancelScope(shield=True):
        for info in files:
            with suppress(FileNotFound):
                await storage.delete(info.id)


async def receive_files(request: Request, tw: Tidewire, *, most: int = MAX_FILES) -> list[FileInfo]:
    """Store each `file` part of a multipart request, streaming; all of them or none.

    The size limit applies to each file, as it streams: the length of a
    multipart body does not say how large its files are.
    """
    hint = "one or more file fields named 'file', e.g. curl -F file=@photo.jpg URL"
    boundary = _boundary(request, hint)
    storage = tw.storage
    saved: list[FileInfo] = []
    try:
        reader = MultipartStream(request.stream(), boundary)
        while (part := await reader.next_part()) is not None:
            if part.field != "file" or not part.filename:
                continue  # another field, or a file input left empty
            if len(saved) == most:
                raise HTTPException(413, f"at most {most} file(s) per request")
            try:
                name = clean_name(part.filename)
            except ValueError as exc:
                raise HTTPException(422, f"{exc}: {_show(part.filename)}") from None
            with storage_errors():
                info = await storage.save(
                    reader.body(),
                    name=name,
                    type=upload_type(part.type, name),
                    limit=tw.settings.max_file_size,
                )
            saved.append(info)
    except BaseException as exc:
        await _discard(storage, saved)
        if isinstance(exc, BadMultipart):
            raise HTTPException(400, f"malformed multipart body: {exc}") from None
        raise
    if not saved:
        raise HTTPException(422, f"no file in the request: send {hint}")
    return saved


def _declared_too_large(request: Request, limit: int | None) -> None:
    """413 before reading a body whose declared length is over the limit."""
    declared = request.headers.get("content-length", "")
    if limit is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(
            413,
            f"the file is too large: at most {limit} bytes may be stored",
            {"connection": "close"},
        )


# -- OpenAPI ---------------------------------------------------------------


class FileMetadata(BaseModel):
    """A stored file, as the file routes describe it."""

    id: str
    name: str
    size: int
    type: str
    sha256: str
    created: float
    url: str


class OriginalUpload(FileMetadata):
    filename: str


def _request_body(content: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    """`openapi_extra` for a body the route reads itself (FastAPI cannot see it)."""
    return {"requestBody": {"required": required, "content": content}}


def _files_form(file: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "properties": {"file": file}, "required": ["file"]}
    return _request_body({"multipart/form-data": {"schema": schema}})


_BINARY = {"type": "string", "format": "binary"}
_FILENAME = {"schema": {"type": "object", "properties": {"filename": {"type": "string"}}}}
_MULTIPART_BODY = _files_form({"type": "array", "items": _BINARY})
_ONE_FILE_BODY = _files_form(_BINARY)
_RAW_BODY = _request_body({"application/octet-stream": {"schema": _BINARY}})
_FILENAME_BODY = _request_body(
    {"application/json": _FILENAME, "application/x-www-form-urlencoded": _FILENAME},
    required=False,
)
_CONTENT: dict[int | str, dict[str, Any]] = {
    200: {"description": "The file", "content": {"application/octet-stream": {"schema": _BINARY}}},
    206: {"description": "The requested range(s); several as multipart/byteranges"},
    304: {"description": "Not modified (If-None-Match / If-Modified-Since)"},
    404: {"description": "No such file"},
    416: {"description": "The range is outside the file"},
}


# -- routes ----------------------------------------------------------------


def add_file_routes(router: APIRouter, tw: Tidewire) -> None:
    """`/files`: upload, list, download, metadata, delete.

    Listing: `GET /files` answers a JSON list of metadata, newest first, as
    the contract says; when there are more, the next page's cursor is in the
    `Tidewire-Next-Cursor` header and in `Link: </files?...>; rel="next"`.

    Behind nginx, with `Settings(accel_redirect="/_tidewire_files/")`, a GET
    of a local file answers with our headers and `X-Accel-Redirect:
    /_tidewire_files/<id>`, and nginx sends the bytes from an internal
    location aliased to the storage's `files/` folder. nginx keeps only some
    of our headers (Content-Type, Content-Disposition...), so the location
    puts back the others::

        location /_tidewire_files/ {
            internal;
            alias /srv/tidewire/data/files/;
            etag off;
            add_header ETag $upstream_http_etag;
            add_header X-Content-Type-Options nosniff always;
            add_header Content-Security-Policy $upstream_http_content_security_policy;
        }
    """

    async def get_info(file_id: str) -> FileInfo:
        if not valid_id(file_id):
            raise _no_file(file_id)  # never reaches the storage
        try:
            return await tw.storage.info(file_id)
        except FileNotFound:
            raise _no_file(file_id) from None

    @router.post(
        "/files",
        tags=["files"],
        status_code=201,
        summary="Upload files (multipart, one or more `file` fields)",
        response_model=None,
        responses={201: {"model": list[FileMetadata]}},
        openapi_extra=_MULTIPART_BODY,
    )
    async def upload_files(request: Request) -> Response:
        try:
            saved = await receive_files(request, tw)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is there to read it
        return JSONResponse([info.json() for info in saved], status_code=201)

    @router.put(
        "/files/{filename:path}",
        tags=["files"],
        status_code=201,
        summary="Upload a file as the raw body (curl -T FILE URL)",
        response_model=None,
        responses={201: {"model": FileMetadata}},
        openapi_extra=_RAW_BODY,
    )
    async def put_file(request: Request, filename: str) -> Response:
        """The name in the URL is only the file's label; the server makes its id."""
        try:
            name = clean_name(filename)
        except ValueError as exc:
            raise HTTPException(422, f"{exc}: PUT /files/<name> names the file") from None
        _declared_too_large(request, tw.settings.max_file_size)
        kind = upload_type(request.headers.get("content-type"), name)
        try:
            with storage_errors():
                info = await tw.storage.save(
                    request.stream(), name=name, type=kind, limit=tw.settings.max_file_size
                )
        except ClientDisconnect:
            return Response(status_code=400)
        return JSONResponse(info.json(), status_code=201, headers={"location": info.url})

    @router.get(
        "/files",
        tags=["files"],
        summary="List files, newest first",
        response_model=None,
        responses={200: {"model": list[FileMetadata]}},
    )
    async def list_files(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000, description="files per page")] = 50,
        cursor: Annotated[
            str | None, Query(max_length=200, description="Tidewire-Next-Cursor of a page")
        ] = None,
    ) -> Response:
        try:
            with storage_errors():
                page = await tw.storage.list(limit=limit, cursor=cursor)
        except ValueError:
            raise HTTPException(
                400, "bad cursor: pass the Tidewire-Next-Cursor of a page"
            ) from None
        headers = {}
        if page.next is not None:
            query = urlencode({"limit": limit, "cursor": page.next})
            headers["tidewire-next-cursor"] = page.next
            headers["link"] = f'<{request.url.path}?{query}>; rel="next"'
        return JSONResponse([info.json() for info in page.files], headers=headers)

    # PUT /files/{filename:path} also matches "/files/", so the usual slash
    # redirect would not happen: GET /files/ would be a 405 instead of the list.
    router.add_api_route("/files/", list_files, methods=["GET"], include_in_schema=False)

    async def get_file(request: Request, file_id: str, download: bool = False) -> Response:
        """The file's bytes; `?download=1` makes any file an attachment."""
        return await send_file(request, tw, await get_info(file_id), attachment=download)

    for method, summary in (("GET", "Download a file"), ("HEAD", "A file's headers")):
        router.add_api_route(
            "/files/{file_id}",
            get_file,
            methods=[method],
            tags=["files"],
            summary=summary + " (Range, If-Range, If-None-Match)",
            response_model=None,
            responses=_CONTENT,
        )

    @router.get(
        "/files/{file_id}/meta",
        tags=["files"],
        summary="A file's metadata",
        response_model=None,
        responses={200: {"model": FileMetadata}},
    )
    async def file_meta(file_id: str) -> Response:
        return JSONResponse((await get_info(file_id)).json())

    @router.delete("/files/{file_id}", tags=["files"], status_code=204, summary="Delete a file")
    async def delete_file(file_id: str) -> Response:
        if not valid_id(file_id):
            raise _no_file(file_id)
        try:
            await tw.storage.delete(file_id)
        except FileNotFound:
            raise _no_file(file_id) from None
        return Response(status_code=204)


async def _small_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_SMALL_BODY:
        raise HTTPException(413, f"send at most {MAX_SMALL_BODY} bytes: just the filename")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_SMALL_BODY:
            raise HTTPException(413, f"send at most {MAX_SMALL_BODY} bytes: just the filename")
    return bytes(body)


async def _form_field(request: Request, field: str) -> str | None:
    """A plain field of a small form body (urlencoded or multipart), read with a bound."""
    body = await _small_body(request)
    kind, _ = parse_options_header(request.headers.get("content-type"))
    if kind == b"application/x-www-form-urlencoded":
        values = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return values[field][-1] if field in values else None

    async def once() -> AsyncIterator[bytes]:
        yield body

    boundary = _boundary(request, "a form")
    value: str | None = None
    try:
        reader = MultipartStream(once(), boundary)
        while (part := await reader.next_part()) is not None:
            if part.field == field and part.filename is None:
                value = _decode(b"".join([chunk async for chunk in reader.body()]))
    except BadMultipart as exc:
        raise HTTPException(400, f"malformed multipart body: {exc}") from None
    return value


async def _requested_name(request: Request) -> str:
    """`filename` from the query string, else a JSON or form body."""
    name = request.query_params.get("filename")
    if name is not None:
        return name
    kind, _ = parse_options_header(request.headers.get("content-type"))
    value: Any = None
    if kind == b"application/json" or kind.endswith(b"+json"):
        try:
            body = orjson.loads(await _small_body(request) or b"{}")
        except orjson.JSONDecodeError as exc:
            raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPException(422, 'send a JSON object: {"filename": "..."}')
        value = body.get("filename")
    elif kind in (b"application/x-www-form-urlencoded", b"multipart/form-data"):
        value = await _form_field(request, "filename")
    if value is None:
        raise HTTPException(
            422, 'name the file: ?filename=NAME, a form field, or JSON {"filename": NAME}'
        )
    if not isinstance(value, str):
        raise HTTPException(422, "filename must be a string")
    return value


def add_original_file_routes(router: APIRouter, tw: Tidewire) -> None:
    """The original service's `/uploadfile/` and `/downloadfile/`, on top of the storage.

    The original wrote uploads to `uploads/<the client's file name>` and sent
    back whatever path `/downloadfile/` was given. Here names are labels, as
    everywhere: `/downloadfile/` looks a file up by its id or its name.
    """

    async def upload(request: Request) -> Response:
        try:
            [info] = await receive_files(request, tw, most=1)
        except ClientDisconnect:
            return Response(status_code=400)
        # 200, as the original answered (its clients check for it).
        return JSONResponse({"filename": info.name, **info.json()})

    async def download(request: Request) -> Response:
        name = await _requested_name(request)
        info: FileInfo | None = None
        if valid_id(name):
            with suppress(FileNotFound):
                info = await tw.storage.info(name)
        if info is None:
            try:
                # A label, compared for equality: any string is safe to look up.
                info = await tw.storage.find(name)
            except FileNotFound:
                raise HTTPException(
                    404,
                    f"no file named {_show(name)}; "
                    "POST /uploadfile/ stores one, GET /files lists them",
                ) from None
        return await send_file(request, tw, info, attachment=True)

    # With and without the slash: the original client posts to /downloadfile,
    # and a redirect would cost a round trip (and, for some clients, the body).
    for path, schema in (("/uploadfile/", True), ("/uploadfile", False)):
        router.add_api_route(
            path,
            upload,
            methods=["POST"],
            tags=["compatibility"],
            summary="The original service's upload (multipart `file`)",
            response_model=None,
            responses={200: {"model": OriginalUpload}},
            openapi_extra=_ONE_FILE_BODY,
            include_in_schema=schema,
        )
    for path, schema in (("/downloadfile/", True), ("/downloadfile", False)):
        router.add_api_route(
            path,
            download,
            methods=["POST"],
            tags=["compatibility"],
            summary="The original service's download, by file name or id",
            response_model=None,
            responses=_CONTENT,
            openapi_extra=_FILENAME_BODY,
            include_in_schema=schema,
        )
