"""Reading a request body that is not a file, with a bound.

Every route that reads a body into memory (a publish, stream parameters,
`/downloadfile/`'s name, a link's lifetime) goes through `read_limited`, so
that no client can make the server hold more than `Settings.max_event_bytes`
(publishes) or `Settings.max_body_bytes` (the rest) for it. File bodies do
not come here: they stream to storage under `max_file_size`.

Every body, files included, must also keep coming: `MinBodyRate` closes
requests whose body arrives slower than `Settings.min_body_rate` (after
`body_grace`), as Kestrel's MinRequestBodyDataRate does.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from fastapi import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .handoff import handed_off
from .headers import content_length

__all__ = ["MinBodyRate", "read_limited", "too_large"]


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


class MinBodyRate:
    """Requests whose body stops progressing get 408 and their connection is closed.

    Measured as Kestrel measures MinRequestBodyDataRate: only the time the
    app spends waiting for the body counts (an app that is slow to read,
    or a server that paused reading for it, is not the client's fault), and
    after `grace` seconds of it the body must have averaged `rate` bytes per
    second since the first wait: `received >= rate * (waited - grace)`. A
    client 1 byte a second behind is cut at about `grace` seconds; a fair
    one that falls behind for a while is not, as long as its average holds.

    The route sees what any client that goes away looks like (`http.disconnect`,
    so `ClientDisconnect`): a multipart or PUT upload keeps nothing, a tus
    PATCH keeps what arrived (the client may resume). Its answer is replaced
    by a 408 with `connection: close`, so that the server closes the
    connection once it is sent.
    """

    def __init__(self, app: ASGIApp, *, rate: float | None, grace: float) -> None:
        self.app = app
        self.rate = rate
        self.grace = grace

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.rate or not _has_body(scope):
            # No minimum (rate None or 0), or no body to wait for: then the
            # server's first message says so, and nothing is metered.
            await self.app(scope, receive, send)
            return
        rate, grace = self.rate, self.grace
        waited = 0.0
        received = 0
        done = False  # the whole body has arrived: later waits are for a disconnect
        too_slow = False
        started = False

        async def metered() -> Message:
            nonlocal waited, received, done, too_slow
            if done or too_slow:
                return {"type": "http.disconnect"} if too_slow else await receive()
            # It may wait until the average would fall under the rate.
            allowed = grace + received / rate - waited
            begun = time.monotonic()
            try:
                async with asyncio.timeout(max(allowed, 0.0)):
                    message = await receive()
            except TimeoutError:
                too_slow = True
                return {"type": "http.disconnect"}
            finally:
                waited += time.monotonic() - begun
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
            return message

        async def answer(message: Message) -> None:
            nonlocal started
            if not too_slow:
                started = True
                await send(message)
            elif not started:
                # The route's answer (to a client it thinks went away) is
                # replaced by ours, once: whatever it sends next is dropped.
                started = True
                await _send_too_slow(send, rate, grace)

        async def ended(_: BaseException | None) -> None:
            if too_slow and not started:
                await _send_too_slow(send, rate, grace)

        try:
            await self.app(scope, metered, answer)
        except Exception:
            if not too_slow:
                raise
        handoff = handed_off()
        if handoff is None:
            await ended(None)
        else:
            handoff.after(ended)  # the response runs on (handoff.py)


def _has_body(scope: Scope) -> bool:
    """Whether a request may have a body to meter. A GET or HEAD over HTTP/1.x
    (every stream and subscription) has none unless it says so, by
    Content-Length (not 0) or Transfer-Encoding (RFC 9112 6.3); anything
    else is metered as before."""
    if scope.get("method") not in ("GET", "HEAD") or scope.get("http_version") not in (
        "1.0",
        "1.1",
    ):
        return True
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


async def _send_too_slow(send: Send, rate: float, grace: float) -> None:
    detail = (
        f"the request body arrived slower than {rate:g} bytes per second"
        f" (after a grace of {grace:g} s): send it faster, or resume the upload"
    )
    body = orjson.dumps({"detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": 408,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # uvicorn closes the connection once this response is sent.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
