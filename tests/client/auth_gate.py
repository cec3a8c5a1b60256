"""A stand-in for the server's access control, for the client's tests.

`TokenGate` wraps a real Tidewire app and lets a request through only with a
token that `tidewire.auth.Verifier` accepts and the test has not revoked, as
the server's guard will once every route enforces it (401 with
`WWW-Authenticate`; a WebSocket handshake is denied with the same status).
It records where each request carried its token, so tests can check that the
client sends it on every transport. It checks no permissions: that is the
server's business, tested there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt
from fastapi import HTTPException
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from tidewire.auth import ACCESS_TOKEN_PARAM, AuthError, Unauthenticated, Verifier, token_from
from tidewire.server.routing import deny_websocket

SECRET = "a test secret that is long enough for HS256"
#: Paths open without a token, as in DESIGN.md: health, the page and its scripts.
OPEN_PATHS = ("/healthz", "/readyz", "/", "/favicon.ico")
OPEN_PREFIXES = ("/web/",)


def mint(sub: str = "alice", ttl: float = 3600, **claims: Any) -> str:
    return jwt.encode(
        {"sub": sub, "exp": int(time.time() + ttl), "tidewire": {"admin": True}, **claims},
        SECRET,
        algorithm="HS256",
    )


@dataclass(frozen=True, slots=True)
class Seen:
    """One request or handshake as the gate saw it."""

    kind: str  # "http" or "websocket"
    method: str
    path: str
    header: str | None  # the Authorization header
    query: str | None  # ?access_token=
    status: int  # what the gate answered: 0 when it let the request through

    @property
    def token(self) -> str | None:
        if self.header and self.header.startswith("Bearer "):
            return self.header.removeprefix("Bearer ")
        return self.query


class TokenGate:
    """ASGI middleware: no good token, no entry (HTTP 401, or a denied handshake)."""

    def __init__(self, app: Any, secret: str = SECRET) -> None:
        self.app = app
        self.verifier = Verifier(secret=secret)
        self.revoked: set[str] = set()
        self.seen: list[Seen] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] not in ("http", "websocket")
            or path in OPEN_PATHS
            or path.startswith(OPEN_PREFIXES)
        ):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        status = 0
        error: AuthError | None = None
        try:
            token = token_from(conn.headers, conn.query_params, conn.cookies)
            if token is None:
                raise Unauthenticated("this server needs a token", token_sent=False)
            if token in self.revoked:
                raise Unauthenticated("the token was revoked", token_sent=True)
            await self.verifier.verify(token)
        except AuthError as exc:
            error, status = exc, exc.status
        self.seen.append(
            Seen(
                scope["type"],
                scope.get("method", "GET"),
                scope["path"],
                conn.headers.get("authorization"),
                conn.query_params.get(ACCESS_TOKEN_PARAM),
                status,
            )
        )
        if error is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            body = {"detail": error.detail}
            await JSONResponse(body, error.status, error.headers)(scope, receive, send)
        else:
            refusal = HTTPException(error.status, error.detail, error.headers)
            await deny_websocket(WebSocket(scope, receive, send), refusal)
