"""What caches may keep, and what goes out compressed.

- JSON answers (listings, metadata, a run's state, health) describe the
  present: `Cache-Control: no-store` unless the route said otherwise.
- File downloads carry validators (`ETag`, `Last-Modified`) and `no-cache`
  (downloads.py): a cache may keep them but asks again each time (a 304).
- Streams (NDJSON, SSE) are neither cached (`no-cache`, transport.py) nor
  compressed: a compressor holds bytes back until it has enough, and a
  stream's events must leave as they are made.

Compression is Starlette's `GZipMiddleware`, for clients that send
`Accept-Encoding: gzip`: JSON and text above `GZIP_MIN_BYTES`, never a
stream, a ranged answer (206: the range is of the stored bytes) or a type
that is already compressed.
"""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.gzip import (
    DEFAULT_EXCLUDED_CONTENT_TYPES,
    GZipMiddleware,
    GZipResponder,
    IdentityResponder,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["GZIP_MIN_BYTES", "NotStored", "compressed"]

#: Smaller answers gain less from gzip than its header and the work cost.
GZIP_MIN_BYTES = 1024

#: Never compressed: streams (a compressor would buffer them), and types whose
#: bytes are already compressed or binary. Starlette's defaults include SSE.
NOT_COMPRESSED = (
    *DEFAULT_EXCLUDED_CONTENT_TYPES,
    "application/x-ndjson",
    "application/octet-stream",
    "application/pdf",
    "application/x-bzip2",
    "application/x-xz",
    "application/x-7z-compressed",
    "application/zstd",
    "font/*",
    "image/*",
)


def compressed(app: ASGIApp) -> ASGIApp:
    """`app` with gzip for the answers that gain from it, and JSON marked `no-store`
    (see the module's docstring)."""
    return _Caching(app)


def _mark(message: Message) -> None:
    """`Cache-Control: no-store` on a JSON answer's start that does not say otherwise."""
    headers = MutableHeaders(scope=message)
    kind = headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind == "application/json" and "cache-control" not in headers:
        headers["cache-control"] = "no-store"


class _Marking(IdentityResponder):
    """A responder that marks JSON answers before gzip sees them (as `NotStored`
    inside it would, without a layer of its own for every connection's life)."""

    async def send_with_compression(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            _mark(message)
            await super().send_with_compression(message)
            if self.content_type_is_excluded:
                # Sent as it is, and so is the rest (a stream): the start
                # need not be kept for as long as the stream lasts.
                self.initial_message = _SENT
            return
        await super().send_with_compression(message)


#: The start of an answer that was sent as it was.
_SENT: Message = {}


class _Identity(_Marking):
    pass


class _GZip(_Marking, GZipResponder):
    pass


class _Caching(GZipMiddleware):
    """Starlette's `GZipMiddleware` and `NotStored` in one layer.

    Its responders also share one copy of the types never compressed:
    Starlette's make their own for every request, which an open stream keeps
    (1.6 KB a connection, bench W4).
    """

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app, minimum_size=GZIP_MIN_BYTES, exclude_content_types=NOT_COMPRESSED)
        self.excluded = tuple(t.partition(";")[0].strip().lower() for t in NOT_COMPRESSED)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        responder: IdentityResponder
        if "gzip" in Headers(scope=scope).get("accept-encoding", ""):
            responder = _GZip(
                self.app,
                self.minimum_size,
                compresslevel=self.compresslevel,
                thread_minimum_size=self.thread_minimum_size,
                exclude_content_types=self.exclude_content_types,
            )
        else:
            responder = _Identity(
                self.app, self.minimum_size, exclude_content_types=self.exclude_content_types
            )
        responder.exclude_content_types = self.excluded
        await responder(scope, receive, send)


class NotStored:
    """Add `Cache-Control: no-store` to JSON answers that do not say otherwise.

    For apps without `compressed`, which does this too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                _mark(message)
            await send(message)

        await self.app(scope, receive, send_marked)
