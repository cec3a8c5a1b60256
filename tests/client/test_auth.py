"""The client's token: sent on every transport, refreshed on reconnects and 401s,
sent to its own server only; blobs are fetched from the client's server only.

The server is a real Tidewire with access control on (`auth_secret`): it
verifies every token and checks every permission. A `Witness` in front of it
(witness.py) only records where each request carried its token and what the
server answered. A token the server no longer takes is one that has expired
(a real, short `exp`) or one signed with another key (as a revoked one would be).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.client.witness import SECRET, Witness, forged, mint
from tests.conftest import QUICK, LiveServer
from tests.proxy import Proxy
from tidewire import Blob, Settings, Tidewire
from tidewire.client import AsyncClient, Client, Event, HTTPStatusError, ProtocolError, RemoteBlob
from tidewire.client._auth import Token
from tidewire.client._transfers import aupload, upload
from tidewire.storage.local import LocalStorage

TRANSPORTS = ["ndjson", "sse", "ws"]
N = 40
FILE_ID = "0c9f4m2k1v8r3n5p7q6s4t"  # the shape of a storage id


@pytest.fixture
def gate(tmp_path: Path, serve: Callable[..., LiveServer]) -> tuple[LiveServer, Witness]:
    settings = Settings(
        heartbeat=QUICK.heartbeat,
        disconnect_grace=10,  # a cut watcher comes back to its run
        close_timeout=QUICK.close_timeout,
        sse_retry_ms=100,
        inline_blob_limit=64,
        auth_secret=SECRET,
    )
    tw = Tidewire(settings=settings, storage=LocalStorage(tmp_path / "data"))

    @tw.stream
    async def paced(n: int = N, interval: float = 0.01) -> AsyncIterator[dict[str, int]]:
        for i in range(n):
            yield {"i": i}
            await asyncio.sleep(interval)

    @tw.stream
    async def big() -> AsyncIterator[Any]:
        yield {"blob": Blob(bytes(range(256)) * 4, "application/x-test")}

    witness = Witness(tw.app)
    return serve(witness, ws_ping=1.0), witness


class Minter:
    """A token callable: a new token at each call, the calls counted."""

    def __init__(self, ttl: float = 3600, first: str | None = None) -> None:
        self.ttl = ttl
        self.issued: list[str] = []
        self._first = first

    def __call__(self) -> str:
        if self._first is not None:
            self.issued.append(self._first)
            self._first = None
        else:
            self.issued.append(mint(ttl=self.ttl, jti=str(len(self.issued))))
        return self.issued[-1]

    async def acall(self) -> str:
        await asyncio.sleep(0)
        return self()


def check_complete(events: list[Event], n: int = N) -> None:
    assert [e.data["i"] for e in events[:-1]] == list(range(n))
    assert events[-1].event == "end"


# -- the token goes everywhere --------------------------------------------------------


def test_without_a_token_the_server_refuses(gate: tuple[LiveServer, Witness]) -> None:
    server, _ = gate
    with Client(server.url) as tw, pytest.raises(HTTPStatusError) as info:
        tw.streams()
    assert info.value.status_code == 401
    assert "needs a token" in str(info.value.detail)


def test_the_token_is_sent_on_every_request_and_handshake(
    gate: tuple[LiveServer, Witness], tmp_path: Path
) -> None:
    server, g = gate
    token = mint()
    small, large = tmp_path / "small.bin", tmp_path / "large.bin"
    small.write_bytes(b"s" * 1000)
    large.write_bytes(b"L" * 300_000)
    with Client(server.url, token=token) as tw:
        for transport in TRANSPORTS:
            with tw.stream("paced", n=2, transport=transport) as s:
                assert [e.event for e in s] == ["message", "message", "end"]
            assert [e.event for e in tw.watch(str(s.run_id), transport=transport)][-1] == "end"
            with tw.subscribe("room", transport=transport) as sub:
                tw.publish("room", {"via": transport})
                assert next(iter(sub)).data == {"via": transport}
        tw.publish("room", {"k": "v"}, files={"f": b"attached"})
        with tw.stream("big") as s:
            blob = next(iter(s)).data["blob"]
        assert isinstance(blob, RemoteBlob) and blob.read() == bytes(range(256)) * 4
        meta = tw.upload(small)
        by_tus = upload(tw.http, large, tus_threshold=1, chunk_size=100_000)
        tw.download(by_tus["id"], tmp_path / "out.bin")
        assert {m["id"] for m in tw.files()} >= {meta["id"], by_tus["id"]}
        with tw.stream("paced", n=10_000) as s:
            next(iter(s))
            tw.cancel(str(s.run_id))
        tw.delete(meta["id"])
    assert g.seen and not g.refused(), g.refused()
    assert {seen.header for seen in g.seen} == {f"Bearer {token}"}
    assert not any(seen.query for seen in g.seen)  # the header, never the URL
    kinds = {(seen.kind, seen.method, seen.path.split("/")[1]) for seen in g.seen}
    for wanted in [
        ("http", "POST", "streams"),
        ("http", "GET", "runs"),
        ("http", "GET", "channels"),
        ("http", "POST", "channels"),
        ("websocket", "GET", "streams"),
        ("websocket", "GET", "runs"),
        ("websocket", "GET", "channels"),
        ("http", "POST", "files"),
        ("http", "POST", "uploads"),
        ("http", "PATCH", "uploads"),
        ("http", "GET", "files"),
        ("http", "DELETE", "runs"),
        ("http", "DELETE", "files"),
    ]:
        assert wanted in kinds, wanted


def test_the_async_client_sends_an_async_callables_token(
    gate: tuple[LiveServer, Witness], tmp_path: Path
) -> None:
    server, g = gate
    minter = Minter()
    large = tmp_path / "large.bin"
    large.write_bytes(b"L" * 300_000)

    async def main() -> None:
        async with AsyncClient(server.url, token=minter.acall) as tw:
            for transport in TRANSPORTS:
                async with tw.stream("paced", n=2, transport=transport) as s:
                    assert [e.event async for e in s][-1] == "end"
                async with tw.subscribe("room", transport=transport, after="0") as sub:
                    await tw.publish("room", {"via": transport})
                    async for event in sub:
                        if event.data == {"via": transport}:
                            break
            meta = await aupload(tw.http, large, tus_threshold=1, chunk_size=100_000)
            await tw.download(meta["id"], tmp_path / "out.bin")
            async with tw.stream("big") as s:
                blob = [e async for e in s][0].data["blob"]  # noqa: RUF015
            assert await blob.aread() == bytes(range(256)) * 4

    asyncio.run(main())
    assert minter.issued and len(minter.issued) == 1  # fetched once, then reused
    assert {seen.token for seen in g.seen} == {minter.issued[0]}
    assert not g.refused(), g.refused()
    assert {s.path.split("/")[1] for s in g.seen if s.kind == "websocket"} == {
        "streams",
        "channels",
    }


# -- refresh ---------------------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stream_that_outlives_its_token_resumes_with_a_new_one(
    gate: tuple[LiveServer, Witness], proxy: type[Proxy], transport: Any, asynchronous: bool
) -> None:
    """A token with a real 2 s `exp`; the stream runs longer, and its connection
    is cut after the token has expired: the reconnect must carry a new token,
    and no event is lost."""
    server, g = gate
    p = proxy(server.port)
    minter = Minter(ttl=2)
    n = 80  # 80 x 0.04 s: about 3 s, longer than the token lives

    def expired() -> bool:
        exp = jwt.decode(minter.issued[0], options={"verify_signature": False})["exp"]
        return time.time() > exp + 0.2

    events: list[Event] = []
    if asynchronous:

        async def main() -> tuple[int, str]:
            async with (
                AsyncClient(p.url, token=minter.acall) as tw,
                tw.stream("paced", n=n, interval=0.04, transport=transport) as s,
            ):
                async for event in s:
                    events.append(event)
                    if p.cuts == 0 and expired():
                        p.cut()
                return s.reconnects, str(s.run_id)

        reconnects, run_id = asyncio.run(main())
    else:
        with (
            Client(p.url, token=minter) as tw,
            tw.stream("paced", n=n, interval=0.04, transport=transport) as s,
        ):
            for event in s:
                events.append(event)
                if p.cuts == 0 and expired():
                    p.cut()
        reconnects, run_id = s.reconnects, str(s.run_id)
    check_complete(events, n)
    assert p.cuts == 1 and reconnects == 1
    assert not g.refused(), g.refused()
    assert len(minter.issued) >= 2
    resumed = [seen for seen in g.seen if seen.path.startswith(f"/runs/{run_id}")]
    assert resumed and all(seen.token in minter.issued[1:] for seen in resumed)
    # The first token is really no good any more: the server says so.
    stale = httpx.get(
        f"{server.url}/streams", headers={"Authorization": f"Bearer {minter.issued[0]}"}
    )
    assert stale.status_code == 401 and 'error="invalid_token"' in stale.headers["www-authenticate"]


def test_a_401_gets_a_new_token_once_then_surfaces(gate: tuple[LiveServer, Witness]) -> None:
    server, g = gate
    # The first token the server does not take (revoked, or a rotated key); the next it does.
    first, good = forged(), mint(jti="b")
    tokens = iter([first, good])
    calls = []

    def token() -> str:
        calls.append(next(tokens))
        return calls[-1]

    with Client(server.url, token=token) as tw:
        tw.streams()  # 401 with the first token; the new one is fetched and sent
        assert calls == [first, good]
        assert [(s.status, s.token) for s in g.seen] == [(401, first), (200, good)]
        tw.streams()  # the good one is kept
        assert len(calls) == 2

    g.seen.clear()
    tokens = iter([forged("a"), forged("b"), forged("c")])  # and nothing better to be had
    with Client(server.url, token=token) as tw:
        with pytest.raises(HTTPStatusError) as info:
            tw.streams()
        assert info.value.status_code == 401
        assert len(calls) == 4  # once more, not in a loop
        assert [seen.status for seen in g.seen] == [401, 401]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_websocket_handshake_refused_401_is_tried_again_with_a_new_token(
    gate: tuple[LiveServer, Witness], asynchronous: bool
) -> None:
    server, g = gate
    minter = Minter(first=forged())
    if asynchronous:

        async def main() -> list[str]:
            async with (
                AsyncClient(server.url, token=minter.acall) as tw,
                tw.stream("paced", n=2, transport="ws") as s,
            ):
                return [e.event async for e in s]

        got = asyncio.run(main())
    else:
        with Client(server.url, token=minter) as tw, tw.stream("paced", n=2, transport="ws") as s:
            got = [e.event for e in s]
    assert got == ["message", "message", "end"]
    handshakes = [seen for seen in g.seen if seen.kind == "websocket"]
    assert [(h.status, h.token) for h in handshakes] == [
        (401, minter.issued[0]),
        (101, minter.issued[1]),
    ]


def test_a_string_token_is_not_retried(gate: tuple[LiveServer, Witness]) -> None:
    server, g = gate
    with Client(server.url, token=forged()) as tw, pytest.raises(HTTPStatusError) as info:
        tw.streams()
    assert info.value.status_code == 401
    assert len(g.seen) == 1  # nothing new to send: no second request


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_403_reaches_the_caller_at_once(
    gate: tuple[LiveServer, Witness], transport: Any, asynchronous: bool
) -> None:
    """A good token without the permission: the server's 403, naming what is
    missing, is the caller's error; no new token is fetched, nothing is retried."""
    server, g = gate
    calls: list[str] = []

    def token() -> str:
        calls.append(mint(tidewire={"streams": ["big"]}))
        return calls[-1]

    async def atoken() -> str:
        return token()

    with pytest.raises(HTTPStatusError) as info:
        if asynchronous:

            async def main() -> None:
                async with (
                    AsyncClient(server.url, token=atoken, retries=5) as tw,
                    tw.stream("paced", n=2, transport=transport) as s,
                ):
                    [e async for e in s]

            asyncio.run(main())
        else:
            with (
                Client(server.url, token=token, retries=5) as tw,
                tw.stream("paced", n=2, transport=transport) as s,
            ):
                list(s)
    assert info.value.status_code == 403
    assert "'paced' in tidewire.streams" in str(info.value.detail)
    assert len(calls) == 1
    assert [seen.status for seen in g.seen] == [403]


def test_an_expired_jwt_is_replaced_before_it_is_sent() -> None:
    expired, fresh = mint(ttl=-10), mint(jti="fresh")
    token = Token(iter([expired, fresh]).__next__)
    assert token.get() == expired  # what the callable gave, sent as it is: the server judges
    assert token.get() == fresh  # but not sent twice: its exp has passed
    assert token.get() == fresh and token.fetches == 2
    assert Token("not-a-jwt").get() == "not-a-jwt"  # opaque tokens are the server's to judge


def test_a_sync_client_refuses_an_async_callable() -> None:
    async def source() -> str:
        return "t"

    with Client("http://127.0.0.1:9", token=source) as tw, pytest.raises(TypeError, match="Async"):
        tw.token.get()  # type: ignore[union-attr]


def test_token_and_an_authorization_header_conflict() -> None:
    with pytest.raises(ValueError, match="token="):
        Client("http://127.0.0.1:9", token="t", headers={"Authorization": "Bearer u"})


def test_the_token_goes_to_the_clients_own_origin_only() -> None:
    seen: dict[str, str | None] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[str(request.url)] = request.headers.get("authorization")
        return httpx.Response(200, json={})

    with Client("http://tw.example:8000", token="secret-token") as tw:
        tw.http._transport = httpx.MockTransport(handler)
        for url in [
            "/x",
            "http://tw.example:8000/y",
            "http://elsewhere.example:8000/z",
            "https://tw.example:8000/w",
            "http://tw.example:8001/v",
        ]:
            tw.http.get(url)
    assert seen == {
        "http://tw.example:8000/x": "Bearer secret-token",
        "http://tw.example:8000/y": "Bearer secret-token",
        "http://elsewhere.example:8000/z": None,
        "https://tw.example:8000/w": None,
        "http://tw.example:8001/v": None,
    }


# -- forged file references -------------------------------------------------------------


def _blob_client(base: str, requests: list[httpx.URL]) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request.url)
        return httpx.Response(200, content=b"the file")

    return httpx.Client(base_url=base, transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example/files/" + FILE_ID,  # another host
        "https://tw.example:8000/files/" + FILE_ID,  # another scheme
        "http://tw.example:8001/files/" + FILE_ID,  # another port
        "//evil.example/files/" + FILE_ID,  # scheme-relative: another host
        "http://tw.example:8000/runs/" + FILE_ID,  # not a file
        "/streams/demo",
        "/files/../streams/demo",
        "/files/" + FILE_ID + "/../../streams/demo",
        "/files/not-an-id",
        "/files/" + FILE_ID + "?then=elsewhere",
        "files/" + FILE_ID,  # relative to what?
        "file:///etc/passwd",
        "",
    ],
)
def test_a_blob_pointing_elsewhere_is_not_fetched(url: str) -> None:
    requests: list[httpx.URL] = []
    with _blob_client("http://tw.example:8000", requests) as http:
        blob = RemoteBlob(url, "image/png", 8, http)
        with pytest.raises(ProtocolError, match="not a file of this server"):
            blob.read()
    assert requests == []


def test_an_async_blob_pointing_elsewhere_is_not_fetched() -> None:
    requests: list[httpx.URL] = []

    async def main() -> None:
        transport = httpx.MockTransport(lambda r: requests.append(r.url) or httpx.Response(200))  # type: ignore[func-returns-value]
        async with httpx.AsyncClient(base_url="http://tw.example", transport=transport) as http:
            blob = RemoteBlob("http://evil.example/files/" + FILE_ID, "x/y", 1, http)
            with pytest.raises(ProtocolError):
                await blob.aread()

    asyncio.run(main())
    assert requests == []


@pytest.mark.parametrize(
    ("base", "url", "fetched"),
    [
        ("http://tw.example:8000", "/files/" + FILE_ID, "http://tw.example:8000/files/" + FILE_ID),
        (
            "http://tw.example:8000",
            "http://tw.example:8000/files/" + FILE_ID,
            "http://tw.example:8000/files/" + FILE_ID,
        ),
        ("http://tw.example", "http://TW.example:80/files/" + FILE_ID, None),
        # A server mounted under a prefix: its files are below it.
        ("http://tw.example/api", "/files/" + FILE_ID, "http://tw.example/api/files/" + FILE_ID),
        (
            "http://tw.example/api",
            "http://tw.example/api/files/" + FILE_ID,
            "http://tw.example/api/files/" + FILE_ID,
        ),
    ],
)
def test_a_blob_of_the_clients_own_server_is_fetched(
    base: str, url: str, fetched: str | None
) -> None:
    requests: list[httpx.URL] = []
    with _blob_client(base, requests) as http:
        assert RemoteBlob(url, "x/y", 8, http).read() == b"the file"
    assert len(requests) == 1
    assert fetched is None or str(requests[0]) == fetched
