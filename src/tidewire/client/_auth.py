"""The client's token: which one to send, where to send it, and when to get a new one.

`Client(url, token=...)` takes a string or a callable returning one (for
`AsyncClient`, the callable may be async). The token goes as
`Authorization: Bearer` on every HTTP request to the client's own server
(`BearerAuth`, an httpx `Auth`, so streams, uploads, downloads and `get`
cannot forget it) and as the same header on WebSocket handshakes.

A callable is called lazily, then again when

- a stream reconnects (a stream outlives its token: the server checks the
  token when a connection starts, so the next connection needs a fresh one),
- a request is answered `401` (once: the request is sent again with the new
  token, and a second `401` is the caller's error), and
- the token is a JWT whose `exp` has passed, so that a request whose body
  cannot be sent twice (a streamed upload) does not go out with it.

The header is sent only to the origin (scheme, host, port) of the client's
URL: a URL from elsewhere (a redirect, a tus `Location`) never gets it.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from typing import Any, TypeAlias

import httpx

__all__ = ["BearerAuth", "Token", "TokenSource", "origin_of", "same_origin"]

#: What `token=` takes: a token, or a callable that returns the current one.
TokenSource: TypeAlias = "str | Callable[[], str] | Callable[[], Awaitable[str]]"

#: A JWT expiring within this many seconds is refreshed before it is sent:
#: clocks differ, and a request takes time to arrive.
EXPIRY_MARGIN = 5.0

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def origin_of(url: httpx.URL) -> tuple[str, str, int | None]:
    """`(scheme, host, port)`, with the scheme's default port spelled out."""
    scheme = url.scheme.lower()
    return scheme, url.host.lower(), url.port or _DEFAULT_PORTS.get(scheme)


def same_origin(url: httpx.URL, base: httpx.URL) -> bool:
    return origin_of(url) == origin_of(base)


def _expired(token: str) -> bool:
    """Whether `token` is a JWT whose `exp` is (nearly) past; False for anything else."""
    # Here, not at the top: PyJWT loads `cryptography`, which a client
    # without a token (most downloads) would load for nothing.
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return False  # not a JWT, or not one we can read: the server decides
    exp = claims.get("exp")
    return isinstance(exp, int | float) and exp - EXPIRY_MARGIN <= time.time()


class Token:
    """The current token of one client, and how to get the next one."""

    def __init__(self, source: TokenSource) -> None:
        if isinstance(source, str):
            if not source:
                raise ValueError("token must not be empty (give None for no token)")
            self._fixed: str | None = source
            self._source: Callable[[], Any] | None = None
        elif callable(source):
            self._fixed, self._source = None, source
        else:
            raise TypeError(f"token must be a string or a callable, not {type(source).__name__}")
        self._current: str | None = self._fixed
        self._lock = threading.Lock()
        #: How many times the callable was called (tests and logs read it).
        self.fetches = 0

    @property
    def current(self) -> str | None:
        """The token last sent (None before the callable was first called)."""
        return self._current

    @property
    def refreshable(self) -> bool:
        return self._source is not None

    def _accept(self, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise TypeError(f"the token callable must return a non-empty string, not {value!r}")
        self._current = value
        self.fetches += 1
        return value

    # -- sync -----------------------------------------------------------------------

    def get(self) -> str:
        """The token to send now (fetched if there is none yet, or it has expired)."""
        current = self._current
        if current is not None and (self._source is None or not _expired(current)):
            return current
        return self.refresh(current)

    def refresh(self, stale: str | None = None) -> str:
        """A new token from the callable, unless another caller already replaced `stale`."""
        if self._source is None:
            assert self._fixed is not None
            return self._fixed
        with self._lock:
            if self._current is not None and self._current != stale:
                return self._current
            value = self._source()
            if inspect.isawaitable(value):
                close = getattr(value, "close", None)
                if close is not None:
                    close()  # no "coroutine was never awaited" warning
                raise TypeError("Client's token callable returned an awaitable: use AsyncClient")
            return self._accept(value)

    # -- async ----------------------------------------------------------------------

    async def aget(self) -> str:
        current = self._current
        if current is not None and (self._source is None or not _expired(current)):
            return current
        return await self.arefresh(current)

    async def arefresh(self, stale: str | None = None) -> str:
        if self._source is None:
            assert self._fixed is not None
            return self._fixed
        if self._current is not None and self._current != stale:
            return self._current
        value = self._source()
        if inspect.isawaitable(value):
            value = await value
        return self._accept(value)


def _replayable(request: httpx.Request) -> bool:
    """Whether the request's body can be sent a second time (bytes, JSON, a form, none).

    A streamed body (an upload read from a file as it goes) cannot: its 401
    is answered as it is, after the token was refreshed for what follows.
    """
    return isinstance(request.stream, httpx.ByteStream)


class BearerAuth(httpx.Auth):
    """`Authorization: Bearer <token>` on requests to `base`'s origin; one retry on a 401."""

    def __init__(self, token: Token, base: httpx.URL) -> None:
        self.token = token
        self.base = base

    def _set(self, request: httpx.Request, token: str) -> None:
        request.headers["Authorization"] = f"Bearer {token}"

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        if not same_origin(request.url, self.base):
            request.headers.pop("Authorization", None)
            yield request
            return
        sent = self.token.get()
        self._set(request, sent)
        response = yield request
        if response.status_code == 401 and self.token.refreshable:
            fresh = self.token.refresh(sent)
            if _replayable(request):
                self._set(request, fresh)
                yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if not same_origin(request.url, self.base):
            request.headers.pop("Authorization", None)
            yield request
            return
        sent = await self.token.aget()
        self._set(request, sent)
        response = yield request
        if response.status_code == 401 and self.token.refreshable:
            fresh = await self.token.arefresh(sent)
            if _replayable(request):
                self._set(request, fresh)
                yield request
