"""A witness in front of a real auth-on Tidewire: it records, the server decides.

The server's own guard accepts or refuses every request (DESIGN.md, "Access
control"); `Witness` only notes, for each request and WebSocket handshake,
where the token travelled (the `Authorization` header or `?access_token=`)
and the status the server answered, so that tests can check that a client
sends its token on every transport, in the right place, and what came of it.
It changes nothing on the way through.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt
from starlette.requests import HTTPConnection

from tidewire.auth import ACCESS_TOKEN_PARAM

SECRET = "a test secret that is long enough for HS256"


def mint(sub: str = "alice", ttl: float = 3600, key: str = SECRET, **claims: Any) -> str:
    """A token the test server accepts (admin unless `tidewire=` says otherwise)."""
    body = {"sub": sub, "exp": int(time.time() + ttl), "tidewire": {"admin": True}, **claims}
    return jwt.encode(body, key, algorithm="HS256")


def forged(sub: str = "alice") -> str:
    """A token signed with another key: the server answers it 401, as a revoked one."""
    return mint(sub, key="another key, just as long, that the server does not hold")


@dataclass(slots=True)
class Seen:
    """One request or handshake, and what the server answered."""

    kind: str  # "http" or "websocket"
    method: str
    path: str
    header: str | None  # the Authorization header
    query: str | None  # ?access_token=
    status: int = 0  # the server's answer; 101 for an accepted WebSocket

    @property
    def token(self) -> str | None:
        if self.header and self.header.startswith("Bearer "):
            return self.header.removeprefix("Bearer ")
        return self.query


class Witness:
    """ASGI middleware that records every request and the status the app answered."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[Seen] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        seen = Seen(
            scope["type"],
            scope.get("method", "GET"),
            scope["path"],
            conn.headers.get("authorization"),
            conn.query_params.get(ACCESS_TOKEN_PARAM),
        )
        self.seen.append(seen)

        async def watch(message: Any) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                seen.status = message["status"]
            elif kind == "websocket.accept":
                seen.status = 101
            elif kind == "websocket.close" and not seen.status:
                seen.status = message.get("code", 1000)  # closed before it was accepted
            await send(message)

        await self.app(scope, receive, watch)

    def refused(self) -> list[Seen]:
        """What the server did not let through."""
        return [s for s in self.seen if s.status >= 400]
