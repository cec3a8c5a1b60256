"""W4 reference floors: what an idle SSE connection costs before any SSE library is involved.

`raw` is a bare ASGI app on uvicorn (the server's own per-connection cost); `fastapi_app` adds
FastAPI's routing and middleware around a response that only waits for the client to leave.
"""

from typing import Any

from fastapi import FastAPI
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def _hold(receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": b": hi\n\n", "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass


async def raw(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await _hold(receive, send)


class Hold(Response):
    def __init__(self) -> None:  # no body, no content-length: the stream stays open
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _hold(receive, send)


fastapi_app = FastAPI()


@fastapi_app.get("/idle")
async def idle() -> Any:
    return Hold()
