"""Which web pages may use this server: the origin check and CORS.

A browser sends `Origin` with every WebSocket handshake, every cross-site
request and every non-GET fetch; it also attaches cookies and, on a LAN,
reaches servers that the page's author could not. So, with access control on
or off, a request whose `Origin` is neither the server's own nor one of
`Settings.allow_origins` is refused (403) where it could do something:

- every WebSocket handshake (browsers do not apply CORS to WebSockets);
- every state-changing method (POST, PUT, PATCH, DELETE): a cross-site form
  or `text/plain` fetch is sent without a preflight, and CORS only hides the
  answer, not the effect;
- every stream start (`GET /streams/{name}`, the original's `GET /stream`):
  starting a run is not a read.

A request without `Origin` (curl, scripts, the Python client) is not an
origin check's business: tokens decide. Reads from other origins are left to
CORS, which gives the answer only to allowed origins (`cors`).

The server's own origin is the request's scheme and `Host`. Behind a proxy,
uvicorn rewrites the scheme from `X-Forwarded-Proto` only for the addresses
in `--forwarded-allow-ips`; the proxy must pass the `Host` the browser used
(nginx: `proxy_set_header Host $http_host`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from ..auth import origin_allowed
from ..wire import AFTER_HEADER, FILE_HEADER, NEXT_CURSOR_HEADER, RUN_HEADER
from .routing import deny_websocket

__all__ = [
    "EXPOSED_HEADERS",
    "Cors",
    "OriginCheck",
    "check_origin",
    "origin_refusal",
    "own_origin",
]

#: Methods that change state: checked whatever the path.
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: GETs that start a run (path relative to the app's root).
_STARTS = re.compile(r"^/streams/[^/]+/?$|^/stream/?$")
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}

#: Response headers a page on an allowed origin may read: tidewire's own, and
#: what tus-js-client and the page need (tus 1.0.0, "Browser support").
EXPOSED_HEADERS = (
    RUN_HEADER,
    AFTER_HEADER,
    NEXT_CURSOR_HEADER,
    FILE_HEADER,
    "Location",
    "Link",
    "Content-Disposition",
    "Content-Range",
    "Accept-Ranges",
    "ETag",
    "Retry-After",
    "WWW-Authenticate",
    "Upload-Offset",
    "Upload-Length",
    "Upload-Metadata",
    "Upload-Defer-Length",
    "Upload-Concat",
    "Upload-Expires",
    "Tus-Version",
    "Tus-Resumable",
    "Tus-Max-Size",
    "Tus-Extension",
    "Tus-Checksum-Algorithm",
)


def _normal(origin: str) -> str:
    """An origin as compared: lowercased, no trailing slash, no default port."""
    origin = origin.strip().rstrip("/").lower()
    scheme, sep, _ = origin.partition("://")
    port = _DEFAULT_PORTS.get(scheme)
    if sep and port and origin.endswith(port):
        origin = origin[: -len(port)]
    return origin


def own_origin(scope: Scope) -> str:
    """This server's origin as the request reached it: its scheme and `Host`."""
    scheme = str(scope.get("scheme", "http"))
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    host = Headers(scope=scope).get("host")
    if not host:
        # HTTP/1.0 without Host: the address the request came in on.
        server = scope.get("server")
        host = f"{server[0]}:{server[1]}" if server else ""
    return _normal(f"{scheme}://{host}")


def _checked(scope: Scope) -> bool:
    """Whether a request of this kind must come from an allowed origin."""
    if scope["type"] == "websocket":
        return True
    method = scope["method"]
    if method in _UNSAFE:
        return True
    if method in ("GET", "HEAD"):
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return _STARTS.match(path) is not None
    return False


def origin_refusal(scope: Scope, allowed: Iterable[str]) -> HTTPException | None:
    """The 403 for a request from an origin that may not do what it asks; None if it may."""
    if scope["type"] not in ("http", "websocket") or not _checked(scope):
        return None
    origin = Headers(scope=scope).get("origin")
    if origin is None:
        return None  # not a browser's request: tokens decide
    if origin_allowed(_normal(origin), own_origin(scope), (_normal(a) for a in allowed)):
        return None
    shown = origin[:200]
    return HTTPException(
        403,
        f"requests from origin {shown!r} are not allowed here: the server must list it "
        f"(tidewire serve --allow-origin {shown}, or Settings(allow_origins=...))",
    )


def check_origin(conn: HTTPConnection, allowed: Iterable[str]) -> None:
    """For a route mounted without `OriginCheck` (`tw.router` in another app): 403 or nothing."""
    refusal = origin_refusal(conn.scope, allowed)
    if refusal is not None:
        raise refusal


class OriginCheck:
    """ASGI middleware: refuse what `origin_refusal` refuses, before any route runs."""

    def __init__(self, app: ASGIApp, allow_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = tuple(allow_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = origin_refusal(scope, self.allowed)
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await deny_websocket(WebSocket(scope, receive, send), refusal)
        else:
            response = JSONResponse({"detail": refusal.detail}, refusal.status_code)
            await response(scope, receive, send)


class Cors(CORSMiddleware):
    """Starlette's CORS for `allow_origins`, with credentials and tidewire's headers.

    Origins compare as `origin_allowed` compares them; a refused preflight
    is a JSON 403 (Starlette's is a plain-text 400) without CORS headers, so
    the browser stops there.
    """

    def __init__(self, app: ASGIApp, allow_origins: Iterable[str] = ()) -> None:
        super().__init__(
            app,
            allow_origins=tuple(allow_origins),
            allow_methods=["*"],
            # The request headers of an allowed origin are its own business
            # (Authorization, Last-Event-ID, tus's Upload-*).
            allow_headers=["*"],
            allow_credentials=True,
            expose_headers=EXPOSED_HEADERS,
        )

    async def simple_response(
        self, scope: Scope, receive: Receive, send: Send, request_headers: Headers
    ) -> None:
        # Starlette's keeps a partial of its `send` and the request's headers
        # for as long as the response lasts: this keeps the origin only.
        origin = request_headers.get("origin")
        await self.app(scope, receive, _CorsSend(self, send, origin))

    def is_allowed_origin(self, origin: str) -> bool:
        # Never the empty string: "" would otherwise equal an empty own origin.
        return bool(origin.strip()) and origin_allowed(
            _normal(origin), "", (_normal(a) for a in self.allow_origins)
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        origin = request_headers["origin"]
        if not self.is_allowed_origin(origin):
            detail = (
                f"origin {origin[:200]!r} is not allowed: the server must list it "
                "(tidewire serve --allow-origin ORIGIN)"
            )
            return JSONResponse({"detail": detail}, 403, {"vary": "Origin"})
        response = super().preflight_response(request_headers)
        if response.status_code != 200:
            detail = bytes(response.body).decode("latin-1")  # "Disallowed CORS method"...
            return JSONResponse({"detail": detail}, response.status_code)
        return response


class _CorsSend:
    """`Cors`'s `send`: Starlette's CORS headers on the response's start.
    An object with slots: an open stream keeps it (bench W4)."""

    __slots__ = ("cors", "origin", "send")

    def __init__(self, cors: Cors, send: Send, origin: str | None) -> None:
        self.cors, self.send, self.origin = cors, send, origin

    async def __call__(self, message: Message) -> None:
        if message["type"] != "http.response.start":
            await self.send(message)
            return
        # What Starlette's `send` reads of the request's headers: its Origin.
        origin = self.origin
        raw = [] if origin is None else [(b"origin", origin.encode("latin-1"))]
        await self.cors.send(message, self.send, Headers(raw=raw))
