"""Access control: who calls (tokens), what they may do (permissions), from where (origins).

Tokens are JWTs, verified by PyJWT. The key decides the algorithms: an HMAC
secret allows HS256/384/512 only; a public key only the algorithms of its
type (RSA: RS*/PS*, EC: the ES* of its curve, Ed25519/Ed448: EdDSA); a JWKS
the algorithm of each of its keys. So `alg: none` is never accepted, and a
token signed with HMAC using a public key as the secret ("algorithm
confusion") is never checked against that key as a secret.

`sub` is the identity; what it may do is in the claim `tidewire`:

    {"streams": ["demo", "reports.*"], "subscribe": ["news", "room.*"],
     "publish": ["room.alice"], "files": ["read", "write", "delete"], "admin": false}

Patterns are names in which `*` matches any run of characters.

Everything here but `Verifier`'s JWKS fetch is pure: the server calls it with
what a request carries, and turns `AuthError`s into statuses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt
from jwt.algorithms import has_crypto

__all__ = [
    "ACCESS_TOKEN_PARAM",
    "COOKIE",
    "OPEN",
    "Action",
    "AuthError",
    "Authorize",
    "Forbidden",
    "Identity",
    "Unauthenticated",
    "Verifier",
    "matches",
    "missing_permission",
    "origin_allowed",
    "token_from",
]

#: Where a token may travel besides `Authorization: Bearer` (RFC 6750 §2.3;
#: EventSource and browser WebSockets cannot set headers).
ACCESS_TOKEN_PARAM = "access_token"
#: The cookie an application may set (`SameSite=Strict`) for its pages.
COOKIE = "tidewire_token"

#: What a request asks to do; the resource is a stream, channel or file name/id.
Action = Literal[
    "stream",  # start a run of the stream named by the resource
    "subscribe",  # read a channel
    "publish",  # write to a channel
    "files:read",  # list and download (resource: a file id, or "" for the list)
    "files:write",  # upload (resource: the file's name)
    "files:delete",  # delete (resource: a file id)
]

#: `Tidewire(authorize=fn)`: a rule a token cannot hold. Called after the
#: token's own permissions allowed the action; False refuses it (403).
Authorize = Callable[["Identity", str, str], "bool | Awaitable[bool]"]

_FILE_RIGHTS = frozenset({"read", "read:own", "write", "delete"})


class AuthError(Exception):
    """A request that may not go on: `status`, a `detail` for the JSON, and `headers`."""

    status = 403

    def __init__(self, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})


class Unauthenticated(AuthError):
    """No token, or one that does not verify: 401 with `WWW-Authenticate` (RFC 6750 §3)."""

    status = 401

    def __init__(self, detail: str, *, token_sent: bool) -> None:
        challenge = 'Bearer realm="tidewire"'
        if token_sent:
            # Never the reason itself: it would help whoever forges tokens.
            challenge += ', error="invalid_token"'
        super().__init__(detail, {"www-authenticate": challenge})


class Forbidden(AuthError):
    """A good token without the permission: 403, the detail naming what is missing."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request comes from, and what its token allows."""

    sub: str
    streams: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    files: frozenset[str] = frozenset()
    admin: bool = False
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> Identity:
        """The identity of a verified token's claims; `ValueError` if they are malformed."""
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise ValueError("the token has no 'sub' (the identity)")
        grant = claims.get("tidewire", {})
        if not isinstance(grant, Mapping):
            raise ValueError("the token's 'tidewire' claim must be an object")

        def names(key: str) -> tuple[str, ...]:
            value = grant.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"the token's tidewire.{key} must be a list of names")
            return tuple(value)

        files = names("files")
        unknown = set(files) - _FILE_RIGHTS
        if unknown:
            raise ValueError(
                f"unknown file rights {sorted(unknown)}: use read, read:own, write, delete"
            )
        admin = grant.get("admin", False)
        if not isinstance(admin, bool):
            raise ValueError("the token's tidewire.admin must be true or false")
        return cls(
            sub=sub,
            streams=names("streams"),
            subscribe=names("subscribe"),
            publish=names("publish"),
            files=frozenset(files),
            admin=admin,
            claims=dict(claims),
        )


#: Everyone, when access control is off: may do everything, owns nothing.
OPEN = Identity(sub="", admin=True)


def matches(pattern: str, name: str) -> bool:
    """Whether `name` matches `pattern`, in which `*` matches any run of characters.

    Greedy with one backtrack point (the last `*`), so the time is linear in
    practice and at worst len(pattern) x len(name): no regex to blow up.
    """
    p = n = 0
    star, mark = -1, 0
    while n < len(name):
        if p < len(pattern) and pattern[p] == "*":
            star, mark = p, n
            p += 1
        elif p < len(pattern) and pattern[p] == name[n]:
            p += 1
            n += 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            n = mark
        else:
            return False
    return all(c == "*" for c in pattern[p:])


def _any(patterns: Iterable[str], name: str) -> bool:
    return any(matches(pattern, name) for pattern in patterns)


def missing_permission(
    identity: Identity, action: Action, resource: str, *, owner: str | None = None
) -> str | None:
    """What `identity` lacks to do `action` on `resource`; None if it may.

    `owner` is the `sub` that uploaded a file, for `read:own` and `delete`.
    """
    if identity.admin:
        return None
    if action == "stream":
        return None if _any(identity.streams, resource) else f"'{resource}' in tidewire.streams"
    if action == "subscribe":
        ok = _any(identity.subscribe, resource)
        return None if ok else f"'{resource}' in tidewire.subscribe"
    if action == "publish":
        return None if _any(identity.publish, resource) else f"'{resource}' in tidewire.publish"
    if action == "files:read":
        if "read" in identity.files:
            return None
        if "read:own" in identity.files and (owner is None or owner == identity.sub):
            # owner None: a listing, filtered to the identity's own files.
            return None
        return "'read' in tidewire.files" + (" (or 'read:own', for one's own files)")
    if action == "files:write":
        return None if "write" in identity.files else "'write' in tidewire.files"
    if action == "files:delete":
        if "delete" in identity.files and owner == identity.sub:
            return None
        if "delete" in identity.files:
            return "ownership of this file ('delete' covers one's own files; admin, any)"
        return "'delete' in tidewire.files"
    raise ValueError(f"unknown action {action!r}")


def token_from(
    headers: Mapping[str, str], query: Mapping[str, str], cookies: Mapping[str, str]
) -> str | None:
    """The token a request carries: the `Authorization` header wins, then
    `?access_token=`, then the cookie. `Unauthenticated` for a malformed header."""
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "send the token as 'Authorization: Bearer <token>'", token_sent=True
            )
        return token.strip()
    return query.get(ACCESS_TOKEN_PARAM) or cookies.get(COOKIE) or None


def origin_allowed(origin: str, own: str, allowed: Iterable[str]) -> bool:
    """Whether a request's `Origin` is the server's own (`scheme://host[:port]`) or allowed.

    Compared case-insensitively, as origins are (`*` in `allowed` allows any).
    """
    origin = origin.strip().rstrip("/").lower()
    if origin == own.lower():
        return True
    return any(a == "*" or origin == a.strip().rstrip("/").lower() for a in allowed)


# -- verifying tokens ------------------------------------------------------

_HMAC = ["HS256", "HS384", "HS512"]
#: How long a fetched JWKS is used before it is fetched again, and how soon a
#: token with an unknown `kid` may make it fetched again (keys rotate; a flood
#: of made-up kids must not become a flood of fetches).
JWKS_TTL = 300.0
JWKS_REFETCH = 30.0


def _public_key_algorithms(key: Any) -> list[str]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey):
        return ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if key.curve.name not in by_curve:
            raise ValueError(f"EC curve {key.curve.name} is not one JWT signs with")
        return [by_curve[key.curve.name]]
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ["EdDSA"]
    raise ValueError("the public key must be RSA, EC (P-256/384/521), Ed25519 or Ed448")


class Verifier:
    """Verifies tokens with one kind of key: an HMAC secret, a PEM public key, or a JWKS URL."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | None = None,
        jwks_url: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        fetch: Callable[[str], Awaitable[Mapping[str, Any]]] | None = None,
    ) -> None:
        given = [k for k in (secret, public_key, jwks_url) if k]
        if len(given) != 1:
            raise ValueError("give exactly one of an HMAC secret, a public key or a JWKS URL")
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self._key: Any = None
        self._algorithms: list[str] = []
        if secret:
            if len(secret.encode()) < 32:
                # RFC 7518 §3.2: an HS256 key at least as long as the hash.
                raise ValueError("the auth secret must be at least 32 bytes")
            self._key, self._algorithms = secret, _HMAC
        elif public_key:
            if not has_crypto:
                raise ValueError("public keys need the 'cryptography' package")
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            try:
                self._key = load_pem_public_key(public_key.encode())
            except ValueError as exc:
                raise ValueError(f"the public key is not a PEM public key: {exc}") from None
            self._algorithms = _public_key_algorithms(self._key)
        self._jwks_url = jwks_url
        self._fetch = fetch or _fetch_json
        self._jwks: dict[str, jwt.PyJWK] = {}
        self._jwks_at = -JWKS_TTL
        self._jwks_lock = asyncio.Lock()

    async def verify(self, token: str) -> Identity:
        """The identity of a token; `Unauthenticated` if it does not verify."""
        try:
            if self._jwks_url is not None:
                jwk = await self._jwk_for(token)
                key, algorithms = jwk.key, [jwk.algorithm_name]
            else:
                key, algorithms = self._key, self._algorithms
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["sub"], "verify_aud": self.audience is not None},
            )
            return Identity.from_claims(claims)
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired", token_sent=True) from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the token is not valid yet (nbf)", token_sent=True) from None
        except (jwt.InvalidTokenError, ValueError) as exc:
            raise Unauthenticated(f"the token is not valid: {exc}", token_sent=True) from None

    async def _jwk_for(self, token: str) -> jwt.PyJWK:
        kid = jwt.get_unverified_header(token).get("kid")
        now = time.monotonic()
        stale = now - self._jwks_at > JWKS_TTL
        if stale or (kid not in self._jwks and now - self._jwks_at > JWKS_REFETCH):
            async with self._jwks_lock:
                if time.monotonic() - self._jwks_at > min(JWKS_REFETCH, JWKS_TTL) or stale:
                    await self._load_jwks()
        if kid is None and len(self._jwks) == 1:
            return next(iter(self._jwks.values()))
        if kid not in self._jwks:
            raise jwt.InvalidTokenError(f"no key with kid {kid!r} in the key set")
        return self._jwks[kid]

    async def _load_jwks(self) -> None:
        assert self._jwks_url is not None
        try:
            data = await self._fetch(self._jwks_url)
            keys = jwt.PyJWKSet.from_dict(dict(data)).keys
        except Exception as exc:
            if self._jwks:
                return  # keep the keys we have; fetched again at the next miss
            raise jwt.InvalidTokenError(f"the key set could not be fetched ({exc})") from None
        self._jwks = {str(k.key_id): k for k in keys}
        self._jwks_at = time.monotonic()


async def _fetch_json(url: str) -> Mapping[str, Any]:
    import httpx

    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
        response.raise_for_status()
        data = response.json()
    if not isinstance(data, Mapping):
        raise ValueError("a JWKS is a JSON object")
    return data
