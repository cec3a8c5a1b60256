"""Tokens, permissions and origins, without a server (tidewire/auth.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tidewire.auth import (
    OPEN,
    Forbidden,
    Identity,
    Unauthenticated,
    Verifier,
    matches,
    missing_permission,
    origin_allowed,
    token_from,
)

from .linear import assert_linear

SECRET = "s" * 64
GRANT = {
    "streams": ["demo", "reports.*"],
    "subscribe": ["news", "room.*"],
    "publish": ["room.alice"],
    "files": ["read", "write"],
}


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 60, "tidewire": GRANT, **extra}


def verify(verifier: Verifier, token: str) -> Identity:
    return asyncio.run(verifier.verify(token))


def pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


# -- patterns ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("demo", "demo", True),
        ("demo", "demo2", False),
        ("room.*", "room.alice", True),
        ("room.*", "room.", True),
        ("room.*", "room", False),
        ("*", "anything", True),
        ("*.log", "a.b.log", True),
        ("a*b*c", "aXbYc", True),
        ("a*b*c", "aXcYb", False),
        ("", "", True),
        ("", "x", False),
        ("room.?", "room.a", False),  # only `*` is special
    ],
)
def test_patterns(pattern: str, name: str, expected: bool) -> None:
    assert matches(pattern, name) is expected


def test_patterns_match_in_linear_time() -> None:
    # The classic worst case of backtracking matchers.
    assert_linear(lambda n: matches("*a*a*a*a*b", n), lambda n: "a" * n)


# -- permissions ------------------------------------------------------------

ALICE = Identity.from_claims(claims())


@pytest.mark.parametrize(
    ("action", "resource", "owner", "allowed"),
    [
        ("stream", "demo", None, True),
        ("stream", "reports.q1", None, True),
        ("stream", "admin", None, False),
        ("subscribe", "room.bob", None, True),
        ("subscribe", "secret", None, False),
        ("publish", "room.alice", None, True),
        ("publish", "room.bob", None, False),
        ("files:read", "f1", "bob", True),
        ("files:write", "x.txt", None, True),
        ("files:delete", "f1", "alice", False),  # no 'delete' right
    ],
)
def test_permissions(action: Any, resource: str, owner: str | None, allowed: bool) -> None:
    missing = missing_permission(ALICE, action, resource, owner=owner)
    assert (missing is None) is allowed
    if not allowed:
        assert resource in missing or "tidewire.files" in missing  # type: ignore[operator]


def test_own_files() -> None:
    reader = Identity("bob", files=frozenset({"read:own", "delete"}))
    assert missing_permission(reader, "files:read", "f", owner="bob") is None
    assert missing_permission(reader, "files:read", "f", owner="alice") is not None
    assert missing_permission(reader, "files:read", "") is None  # a listing: filtered
    assert missing_permission(reader, "files:delete", "f", owner="bob") is None
    assert "ownership" in str(missing_permission(reader, "files:delete", "f", owner="alice"))


def test_admin_and_open_may_do_everything() -> None:
    for identity in (Identity("root", admin=True), OPEN):
        for action in ("stream", "subscribe", "publish", "files:read", "files:delete"):
            assert missing_permission(identity, action, "x", owner="other") is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "grant",
    [
        {"streams": "demo"},
        {"streams": [1]},
        {"files": ["everything"]},
        {"admin": "yes"},
        "all",
    ],
)
def test_malformed_grants_are_refused(grant: Any) -> None:
    with pytest.raises(ValueError):
        Identity.from_claims({"sub": "a", "tidewire": grant})


# -- where the token travels -------------------------------------------------


def test_the_header_wins_then_the_query_then_the_cookie() -> None:
    header = {"authorization": "Bearer H"}
    query = {"access_token": "Q"}
    cookie = {"tidewire_token": "C"}
    assert token_from(header, query, cookie) == "H"
    assert token_from({}, query, cookie) == "Q"
    assert token_from({}, {}, cookie) == "C"
    assert token_from({}, {}, {}) is None
    with pytest.raises(Unauthenticated) as caught:
        token_from({"authorization": "Basic dXNlcjpwYXNz"}, {}, {})
    assert 'error="invalid_token"' in caught.value.headers["www-authenticate"]


# -- verifying ----------------------------------------------------------------


def test_hmac_tokens() -> None:
    verifier = Verifier(secret=SECRET)
    for alg in ("HS256", "HS384", "HS512"):
        identity = verify(verifier, jwt.encode(claims(), SECRET, algorithm=alg))
        assert identity.sub == "alice" and identity.publish == ("room.alice",)


@pytest.mark.parametrize(
    "token",
    [
        jwt.encode(claims(exp=int(time.time()) - 5), SECRET),
        jwt.encode(claims(nbf=int(time.time()) + 60), SECRET),
        jwt.encode(claims(), "another secret of thirty-two bytes!"),
        jwt.encode({"exp": int(time.time()) + 60}, SECRET),  # no sub
        "not.a.token",
    ],
    ids=["expired", "not yet", "wrong key", "no sub", "garbage"],
)
def test_bad_tokens_are_401(token: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        verify(Verifier(secret=SECRET), token)
    assert caught.value.status == 401
    assert caught.value.headers["www-authenticate"].startswith('Bearer realm="tidewire"')


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(payload: Mapping[str, Any], alg: str = "none") -> str:
    head = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{head}.{_b64(json.dumps(payload).encode())}."


def test_alg_none_is_refused_whatever_the_key() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for verifier in (Verifier(secret=SECRET), Verifier(public_key=pem(key))):
        with pytest.raises(Unauthenticated):
            verify(verifier, _unsigned(claims()))


def test_hmac_signed_with_the_public_key_is_refused() -> None:
    # "Algorithm confusion": an attacker signs HS256 using the public key's
    # PEM as the secret, hoping the server checks it that way.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = pem(key)
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims()).encode())
    sig = hmac.new(public.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    with pytest.raises(Unauthenticated):
        verify(Verifier(public_key=public), f"{head}.{body}.{_b64(sig)}")


@pytest.mark.parametrize(
    ("private", "alg"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "PS384"),
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (ec.generate_private_key(ec.SECP384R1()), "ES384"),
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    ],
)
def test_public_keys(private: Any, alg: str) -> None:
    verifier = Verifier(public_key=pem(private))
    assert verify(verifier, jwt.encode(claims(), private, algorithm=alg)).sub == "alice"


def test_audience_and_issuer_are_checked_when_set() -> None:
    verifier = Verifier(secret=SECRET, audience="tidewire", issuer="https://id.example")
    good = jwt.encode(claims(aud="tidewire", iss="https://id.example"), SECRET)
    assert verify(verifier, good).sub == "alice"
    for bad in (claims(aud="other", iss="https://id.example"), claims(aud="tidewire")):
        with pytest.raises(Unauthenticated):
            verify(verifier, jwt.encode(bad, SECRET))


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Verifier(secret="short")


def test_jwks_keys_rotate_by_kid() -> None:
    keys = {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048) for kid in "ab"}
    served: dict[str, Any] = {"keys": []}
    fetches = []

    def publish(*kids: str) -> None:
        served["keys"] = [
            {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys[k].public_key())), "kid": k}
            for k in kids
        ]

    async def fetch(url: str) -> Mapping[str, Any]:
        fetches.append(url)
        return served

    def token(kid: str) -> str:
        return jwt.encode(claims(), keys[kid], algorithm="RS256", headers={"kid": kid})

    async def main() -> None:
        verifier = Verifier(jwks_url="https://id.example/jwks", fetch=fetch)
        publish("a")
        assert (await verifier.verify(token("a"))).sub == "alice"
        assert (await verifier.verify(token("a"))).sub == "alice"
        assert len(fetches) == 1, "the key set is cached"
        # Rotation: a token with a new kid makes the set fetched again (once
        # the refetch interval allows it).
        publish("a", "b")
        verifier._jwks_at -= 60
        assert (await verifier.verify(token("b"))).sub == "alice"
        assert len(fetches) == 2
        # A made-up kid right after does not fetch again.
        with pytest.raises(Unauthenticated):
            await verifier.verify(jwt.encode(claims(), keys["a"], "RS256", {"kid": "zzz"}))
        assert len(fetches) == 2

    asyncio.run(main())


# -- origins ------------------------------------------------------------------


def test_origins() -> None:
    own = "http://127.0.0.1:8000"
    assert origin_allowed("http://127.0.0.1:8000", own, [])
    assert origin_allowed("HTTP://127.0.0.1:8000/", own, [])
    assert not origin_allowed("https://evil.example", own, [])
    assert origin_allowed("https://app.example", own, ["https://app.example"])
    assert not origin_allowed("https://app.example.evil", own, ["https://app.example"])
    assert origin_allowed("https://any.example", own, ["*"])


def test_forbidden_is_403() -> None:
    assert Forbidden("x").status == 403
