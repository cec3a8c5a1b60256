"""Reading a request body that is not a file, with a bound.

Every route that reads a body into memory (a publish, stream parameters,
`/downloadfile/`'s name, a link's lifetime) goes through `read_limited`, so
that no client can make the server hold more than `Settings.max_event_bytes`
(publishes) or `Settings.max_body_bytes` (the rest) for it. File bodies do
not come here: they stream to storage under `max_file_size`.
"""

from __future__ import annotations

from fastapi import HTTPException
from starlette.requests import Request

from .headers import content_length

__all__ = ["read_limited", "too_large"]


def too_large(limit: int, what: str = "a request body") -> HTTPException:
    return HTTPException(413, f"{what} may be at most {limit} bytes")


async def read_limited(request: Request, limit: int, what: str = "a request body") -> bytes:
    """The whole body, refused (413) as soon as it is over `limit` bytes.

    A declared length over the limit is refused before anything is read;
    a chunked body while it is read, at the first chunk that passes it.
    What was read is kept where `Request.body()` keeps it, so that
    `request.form()` and `request.json()` parse it without reading again.
    """
    declared = content_length(request.headers)
    if declared is not None and declared > limit:
        raise too_large(limit, what)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit, what)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body
    return body
