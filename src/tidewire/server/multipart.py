"""A streaming multipart/form-data reader, pulled one part at a time.

Why not `request.form()`: Starlette's form parser spools every file to a
temporary file (in memory up to 1 MiB) before the route sees any of it, so
an upload would be written twice, and the route could not refuse a file
(too large, a bad name, storage full) until the whole body had arrived.
Here the route asks for the next part's headers, then hands that part's
bytes, as they arrive, straight to `Storage.save`: each byte is written once,
memory stays flat whatever the file's size, and a refusal stops the reading.

The bytes are parsed by python-multipart's `MultipartParser`, the same one
Starlette uses; only the driving is ours.
"""

from __future__ import annotations

import codecs
import re
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = ["BadMultipart", "MultipartStream", "Part", "decode"]


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


def decode(raw: bytes) -> str:
    """A field name, file name or small field value as text."""
    # Browsers send them as raw UTF-8; anything else is read as Latin-1.
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
        filename = decode(options[b"filename"])
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
        decode(options[b"name"]),
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
