"""Who may call a route: the request side of access control (the rules are in auth.py).

Every route asks the `Guard` once per request or connection: `identify` reads
and verifies the token the request carries (a long-lived stream is verified
when it starts, not per event), `require` checks one action on one resource,
and refusals are `HTTPException`s (401 with `WWW-Authenticate`, 403 naming
what is missing): every route, a `LeanEndpoint` and `deny_websocket` already
answer those as JSON, also in an app that only includes `tw.router`.

With access control off, `identify` answers `OPEN` (may do everything) and
`require` never refuses: routes are written once, for both.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import time

from fastapi import HTTPException
from starlette.requests import HTTPConnection

from ..auth import (
    OPEN,
    Action,
    AuthError,
    Authorize,
    Forbidden,
    Identity,
    Unauthenticated,
    Verifier,
    missing_permission,
    token_from,
)
from ..config import Settings

__all__ = ["Guard", "http_error"]

_VERBS: dict[str, str] = {
    "stream": "start this stream",
    "subscribe": "subscribe to this channel",
    "publish": "publish to this channel",
    "files:read": "read files",
    "files:write": "upload files",
    "files:delete": "delete this file",
}


def _public_key_text(value: str) -> str:
    """A PEM given as its text, or as the path of a file holding it."""
    if value.lstrip().startswith("-----BEGIN"):
        return value
    with open(value, encoding="ascii") as f:
        return f.read()


class Guard:
    """Identifies callers and checks their permissions, for every route."""

    def __init__(self, settings: Settings, authorize: Authorize | None = None) -> None:
        self.settings = settings
        self.authorize = authorize
        self.verifier: Verifier | None = None
        if settings.auth:
            self.verifier = Verifier(
                secret=settings.auth_secret,
                public_key=_public_key_text(settings.auth_public_key)
                if settings.auth_public_key
                else None,
                jwks_url=settings.auth_jwks,
                audience=settings.auth_audience,
                issuer=settings.auth_issuer,
            )
        self._link_key = _link_key(settings)

    @property
    def on(self) -> bool:
        return self.verifier is not None

    async def identify(self, conn: HTTPConnection) -> Identity:
        """Who sent this request; 401 without a good token."""
        try:
            return await self._identify(conn)
        except AuthError as exc:
            raise http_error(exc) from None

    async def _identify(self, conn: HTTPConnection) -> Identity:
        if self.verifier is None:
            return OPEN
        token = token_from(conn.headers, conn.query_params, conn.cookies)
        if token is None:
            raise Unauthenticated(
                "this server needs a token: send 'Authorization: Bearer <token>' "
                "(EventSource and WebSocket: ?access_token=<token>)",
                token_sent=False,
            )
        return await self.verifier.verify(token)

    async def require(
        self, identity: Identity, action: Action, resource: str, *, owner: str | None = None
    ) -> None:
        """403 unless `identity` may do `action` on `resource`."""
        try:
            await self._require(identity, action, resource, owner)
        except AuthError as exc:
            raise http_error(exc) from None

    async def _require(
        self, identity: Identity, action: Action, resource: str, owner: str | None
    ) -> None:
        if identity is OPEN:
            return
        missing = missing_permission(identity, action, resource, owner=owner)
        if missing is not None:
            raise Forbidden(f"this token may not {_VERBS[action]}: it needs {missing}")
        if self.authorize is not None:
            allowed = self.authorize(identity, action, resource)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if not allowed:
                raise Forbidden(
                    f"the server's policy does not let {identity.sub!r} {action} {resource!r}"
                )

    async def check(
        self, conn: HTTPConnection, action: Action, resource: str, *, owner: str | None = None
    ) -> Identity:
        """`identify`, then `require`: the one call most routes make."""
        identity = await self.identify(conn)
        await self.require(identity, action, resource, owner=owner)
        return identity

    @staticmethod
    def owns(identity: Identity, owner: str | None) -> bool:
        """Whether `identity` may see a run (or file) that `owner` made: its own, or admin."""
        return identity.admin or owner == identity.sub

    # -- signed links --------------------------------------------------------

    def sign(self, path: str, expires: int) -> str:
        """The signature of a link to `path` valid until `expires` (unix time)."""
        message = f"{path}\n{expires}".encode()
        return hmac.new(self._link_key, message, hashlib.sha256).hexdigest()

    def link_valid(self, path: str, expires: str, signature: str) -> bool:
        """Whether `?exp=&sig=` sign `path` and have not expired."""
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
            return False
        expected = self.sign(path, int(expires))
        return hmac.compare_digest(expected, signature) and int(expires) >= time.time()


def _link_key(settings: Settings) -> bytes:
    # A key of its own, derived, so that a link's signature never reveals
    # anything usable as a token signature (and vice versa).
    secret = settings.link_secret or settings.auth_secret
    if secret is None:
        # Public keys only, and no link secret: links work in this process.
        import secrets

        secret = secrets.token_hex(32)
    return hmac.new(secret.encode(), b"tidewire file links v1", hashlib.sha256).digest()


def http_error(exc: AuthError) -> HTTPException:
    """A refusal as the HTTPException every route answers: 401 or 403, with its headers."""
    return HTTPException(exc.status, exc.detail, exc.headers)
