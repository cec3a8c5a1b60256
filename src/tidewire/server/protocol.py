"""The HTTP/1.1 protocol `tidewire serve` runs: uvicorn's httptools one, with header limits.

uvicorn's httptools protocol takes request headers of any size and at any
pace: a 256 MB header was parsed for 72 s with the event loop blocked (the
parser grows each header value by concatenation), and connections that
dribble a header at a byte a second were kept forever. Its h11 protocol
bounds the size (`h11_max_incomplete_event_size`) but answers 400 rather than
431, has no header timeout either, and is slower (docs/security.md has the
numbers). So the httptools protocol is kept and guarded in front of its parser:

- `Settings.max_header_bytes`: bytes received while a request's headers are
  incomplete are counted; past the limit the request gets `431` and the
  connection is closed. The parser sees at most the limit plus one read
  (asyncio reads at most 256 KiB at a time), so it never works long.
- `Settings.header_timeout`: a request's headers must be complete this many
  seconds after its first byte (or after the connection opened): otherwise
  the connection is closed. Idle keep-alive connections are uvicorn's
  (`timeout_keep_alive`).

The limits come from the `TIDEWIRE_*` environment, which `tidewire serve`
sets from the app's settings, so that worker processes get them too.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..config import Settings

__all__ = ["HeaderLimitedProtocol", "header_limits"]


@functools.cache
def header_limits() -> tuple[int, float]:
    """`(max_header_bytes, header_timeout)` of this process's settings."""
    settings = Settings.from_env()
    return settings.max_header_bytes, settings.header_timeout


class HeaderLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol: headers over the size limit get 431, too slow a close."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_header_bytes, self._header_timeout = header_limits()
        #: Whether the next bytes are (the start of) a request's headers.
        self._in_headers = True
        #: Set once a request was refused: what the parser still finds in the
        #: read it was refused in is ignored (the connection is closing).
        self._refused = False
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            # Counted whole: the bytes of a request begun in the middle of a
            # read are not, so the count is low by less than one read, never high.
            self._header_bytes += len(data)
            if self._header_timer is None:
                self._start_header_timer()
        super().data_received(data)
        if self._in_headers and self._header_bytes > self._max_header_bytes:
            self._refuse_headers()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._stop_header_timer()
        if self._refused:
            return
        # Headers that arrived whole in one read were not refused by the
        # count: their parsed size is checked before the app sees them.
        if self._parsed_size() > self._max_header_bytes:
            self._refuse_headers()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        # What follows in this connection is the next request's headers; its
        # clock starts with its first byte (an idle connection is keep-alive's).
        self._in_headers = True
        self._header_bytes = 0

    def _parsed_size(self) -> int:
        """The size of the request line and headers just parsed, as sent (give or take spaces).

        `METHOD URL HTTP/1.1` CRLF, then `name: value` CRLF each, then CRLF.
        """
        size = len(self.parser.get_method()) + 1 + len(self.url) + len(" HTTP/1.1\r\n\r\n")
        return size + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _start_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self._header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._in_headers and not self.transport.is_closing():
            # As nginx's client_header_timeout: the connection is closed (no
            # one is reading an answer at that pace).
            self.transport.close()

    def _refuse_headers(self) -> None:
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._stop_header_timer()
        detail = f"request headers may be at most {self._max_header_bytes} bytes"
        body = orjson.dumps({"detail": detail})
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n"
        )
        self.transport.write(head + body)
        self.transport.close()
