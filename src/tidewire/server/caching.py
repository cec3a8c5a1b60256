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

from starlette.datastructures import MutableHeaders
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES, GZipMiddleware
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
    """`app` with gzip for the answers that gain from it (see the module's docstring)."""
    return GZipMiddleware(app, minimum_size=GZIP_MIN_BYTES, exclude_content_types=NOT_COMPRESSED)


class NotStored:
    """Add `Cache-Control: no-store` to JSON answers that do not say otherwise."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                kind = headers.get("content-type", "").partition(";")[0].strip()
                if kind == "application/json" and "cache-control" not in headers:
                    headers["cache-control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_marked)
