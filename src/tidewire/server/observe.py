"""What each request leaves behind: its request id, its metrics and its access log line.

`Observe` is one ASGI middleware, the outermost of the app's: every layer
around a route holds a frame for as long as the connection is open, and an
idle subscription's memory is what bounds how many a server holds (bench W4),
so everything a request reports is done here, in one layer.

- Request id: a sane incoming `X-Request-ID` (1 to 64 visible ASCII
  characters) is kept, else one is made; it goes back in the response's
  `X-Request-ID` (and a WebSocket's accept), into the access line, and into
  every log record written while the request runs (`logs.REQUEST_ID`).
- Metrics: `tidewire_http_requests_total{route,status}`, labelled by the
  route's template (`/streams/{name}`), never the raw path, which would make
  a series per stream name or file id; requests that match no route are
  `route="unmatched"`. Durations go to one of two histograms: the whole
  request for ordinary answers (`tidewire_http_request_duration_seconds`),
  the time to the first byte for streams and WebSockets
  (`tidewire_stream_start_seconds`), whose whole length is how long the
  client chose to listen, and would drown every latency in the first.
- File download bytes, for answers that `count_download` marked.
- The access line (logger `tidewire.access`), at the end of the request:
  for a stream, when it closes, with its whole duration.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..metrics import DOWNLOAD_BYTES, DOWNLOAD_MARK, HTTP_DURATION, HTTP_REQUESTS, STREAM_START
from ..quotas import CLIENT_SCOPE_KEY
from . import SERVER_SEND
from .handoff import handed_off
from .logs import REQUEST_ID

__all__ = ["REQUEST_ID_HEADER", "Observe", "request_id_from"]

REQUEST_ID_HEADER = "X-Request-ID"
_HEADER = REQUEST_ID_HEADER.lower().encode()
_STREAM_TYPES = (b"text/event-stream", b"application/x-ndjson")

access_log = logging.getLogger("tidewire.access")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's `X-Request-ID` if it is 1-64 visible ASCII characters, else a new one.

    Anything else (control characters, spaces, very long) could forge or break
    log lines, so it is replaced rather than cleaned.
    """
    for name, value in headers:
        if name == _HEADER:
            if 0 < len(value) <= 64 and all(0x21 <= c <= 0x7E for c in value):
                return value.decode("ascii")
            break
    return secrets.token_hex(8)


class Observe:
    """ASGI middleware: request ids, request metrics and access lines (see the module)."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        #: The app's routes, to name a matched plain Starlette route (see `_route`).
        self.routes = routes
        self._templates: dict[int, str] = {}

    def _route(self, scope: Scope) -> str:
        """The template of the route that answered, or `unmatched`."""
        # The router puts the route it matched into the scope (the same dict
        # we hold): FastAPI's own routes do, ...
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        # ... but a plain Starlette route (a lean stream endpoint) in an
        # included router leaves only its endpoint: look that up.
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return "unmatched"
        template = self._templates.get(id(endpoint))
        if template is None:
            self._templates = {
                id(r.endpoint): r.path for r in self.routes if isinstance(r, Route | WebSocketRoute)
            }
            template = self._templates.get(id(endpoint), "unmatched")
        return template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(self, scope, send)
        SERVER_SEND.set(send)
        # Not reset after: the server runs each request in a task of its own
        # (so a context of its own), and the answer to an error, made outside
        # this middleware, still reads it (app.py).
        REQUEST_ID.set(exchange.rid)
        try:
            await self.app(scope, receive, exchange.send)
        except BaseException as exc:
            await exchange.ended(exc)
            raise
        handoff = handed_off()
        if handoff is None:
            exchange.end()
        else:
            handoff.after(exchange.ended)  # a stream: logged when it ends (handoff.py)


class _Exchange:
    """One request as `Observe` sees it. An object with slots rather than a
    closure over cells: it stays alive with every idle stream, and is smaller."""

    __slots__ = ("download", "observe", "rid", "scope", "started", "status", "streaming", "wrapped")

    def __init__(self, observe: Observe, scope: Scope, send: Send) -> None:
        self.observe = observe
        self.scope = scope
        self.wrapped = send
        self.started = time.perf_counter()
        self.rid = request_id_from(scope["headers"])
        self.status = 0
        self.streaming = scope["type"] == "websocket"
        self.download = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if self.download:
                DOWNLOAD_BYTES.inc(len(message.get("body", b"")))
        elif kind == "http.response.start" or kind == "websocket.http.response.start":
            self.status = message["status"]
            headers = message.get("headers", ())
            # A new list: a response may share its header list between answers.
            message = {**message, "headers": [*headers, (_HEADER, self.rid.encode())]}
            for name, value in headers:
                if name.lower() == b"content-type" and value.startswith(_STREAM_TYPES):
                    self.streaming = True
                    self._started_streaming()
            self.download = self.scope.get(DOWNLOAD_MARK, False) is True
        elif kind == "websocket.accept":
            self.status = 101
            headers = [*message.get("headers", ()), (_HEADER, self.rid.encode())]
            message = {**message, "headers": headers}
            self._started_streaming()
        elif kind == "websocket.close" and not self.status:
            self.status = 403  # closed before it was accepted: the server answers 403
        await self.wrapped(message)

    def _started_streaming(self) -> None:
        route = self.observe._route(self.scope)
        STREAM_START.labels(route).observe(time.perf_counter() - self.started)

    async def ended(self, error: BaseException | None) -> None:
        if error is not None and not self.status:
            self.status = 500  # the server error middleware outside answers it
        self.end()

    def end(self) -> None:
        duration = time.perf_counter() - self.started
        route = self.observe._route(self.scope)
        HTTP_REQUESTS.labels(route, str(self.status)).inc()
        if not self.streaming:
            HTTP_DURATION.labels(route).observe(duration)
        if access_log.isEnabledFor(logging.INFO):
            _log_access(self.scope, self.rid, route, self.status, duration)


def _log_access(scope: Scope, rid: str, route: str, status: int, duration: float) -> None:
    method = scope.get("method", "WS")
    # The path only: query strings may carry tokens (`?access_token=`).
    path = scope["path"]
    client = scope.get("client")
    address = client[0] if client else ""
    # Who: the token's subject or the address, as quotas count them.
    identity = scope.get(CLIENT_SCOPE_KEY) or f"addr:{address}"
    extra: dict[str, Any] = {
        "request_id": rid,
        "method": method,
        "route": route,
        "path": path,
        "status": status,
        "duration_ms": round(duration * 1000, 3),
        "identity": identity,
        "client": address,
    }
    access_log.info(
        "%s %s %s %.1fms", method, path, status, duration * 1000, extra={"access": extra}
    )
