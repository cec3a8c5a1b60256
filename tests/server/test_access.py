"""Access control on every route and transport (DESIGN.md, "Access control").

A real server with an HMAC key: who may call what (401, 403, or it works),
who owns runs, files and uploads, and what a publisher may not send.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.conftest import LiveServer
from tidewire import Settings, Tidewire
from tidewire.auth import Authorize, Identity
from tidewire.broker.memory import MemoryBroker
from tidewire.server.compat import add_compat_routes
from tidewire.storage.local import LocalStorage

SECRET = "k" * 48
EVERYTHING = {
    "streams": ["count", "demo"],
    "subscribe": ["room.*"],
    "publish": ["room.*"],
    "files": ["read", "write", "delete"],
}
CHALLENGE = 'Bearer realm="tidewire"'
INVALID = 'Bearer realm="tidewire", error="invalid_token"'
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def token(
    sub: str = "alice", *, key: str = SECRET, ttl: float = 60, admin: bool = False, **grant: Any
) -> str:
    claims = {"sub": sub, "exp": int(time.time() + ttl), "tidewire": {**grant, "admin": admin}}
    return jwt.encode(claims, key, algorithm="HS256")


def unsigned(sub: str = "alice") -> str:
    """A token with `alg: none`: what a forger sends."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {"sub": sub, "exp": int(time.time()) + 60, "tidewire": {"admin": True}}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def bearer(jwt_: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {jwt_}"}


# Made when this module is collected, which may be many minutes before its
# tests run in the full suite: they must outlive it.
LONG = 24 * 3600
ADMIN = bearer(token("root", admin=True, ttl=LONG))
ALL = bearer(token(**EVERYTHING, ttl=LONG))
NOTHING = bearer(token(ttl=LONG))


def app(tmp_path: Path, authorize: Authorize | None = None, **settings: Any) -> Tidewire:
    tw = Tidewire(
        broker=MemoryBroker(),
        storage=LocalStorage(tmp_path / "data"),
        settings=Settings(
            heartbeat=0.3,
            disconnect_grace=0.3,
            close_timeout=2.0,
            **{"auth_secret": SECRET, **settings},
        ),
        authorize=authorize,
    )

    @tw.stream
    async def count(n: int = 2, interval: float = 0.0) -> AsyncIterator[int]:
        for i in range(n):
            yield i
            await asyncio.sleep(interval)

    @tw.stream
    async def demo() -> AsyncIterator[int]:
        yield 1

    add_compat_routes(tw.router, tw, [PNG])
    return tw


@pytest.fixture
def server(serve: Callable[..., LiveServer], tmp_path: Path) -> LiveServer:
    return serve(app(tmp_path))


def upload(server: LiveServer, headers: dict[str, str], name: str = "a.txt") -> str:
    response = httpx.put(f"{server.url}/files/{name}", content=b"hello", headers=headers)
    assert response.status_code == 201, response.text
    file_id: str = response.json()["id"]
    return file_id


def tus_create(server: LiveServer, headers: dict[str, str], length: int = 5) -> httpx.Response:
    meta = "filename " + base64.b64encode(b"t.txt").decode()
    return httpx.post(
        f"{server.url}/uploads/",
        headers={
            **headers,
            "Tus-Resumable": "1.0.0",
            "Upload-Length": str(length),
            "Upload-Metadata": meta,
        },
    )


# -- the matrix ---------------------------------------------------------------


@dataclass
class Call:
    """One request, the permission it needs (a grant key), and the status when allowed."""

    method: str
    path: str
    needs: str
    ok: int = 200
    kw: dict[str, Any] = field(default_factory=dict)

    def send(self, server: LiveServer, headers: dict[str, str]) -> httpx.Response:
        headers = {**self.kw.get("headers", {}), **headers}
        kw = {k: v for k, v in self.kw.items() if k != "headers"}
        with (
            httpx.Client(timeout=10) as client,
            client.stream(self.method, server.url + self.path, headers=headers, **kw) as response,
        ):
            if response.status_code != 200 or self.method == "HEAD":
                response.read()
            elif "events" in self.path and "channels" in self.path:
                pass  # a live subscription: its status is what counts
            else:
                response.read()
            return response


SSE = {"headers": {"Accept": "text/event-stream"}}
TUS = {"Tus-Resumable": "1.0.0"}
FILE = "{file}"  # filled with an uploaded file's id
CALLS = [
    Call("GET", "/streams/count", "streams"),
    Call("GET", "/streams/count", "streams", kw=SSE),
    Call("POST", "/streams/count", "streams", kw={"json": {"n": 1}}),
    Call("POST", "/streams/count?detach=true", "streams", 202),
    Call("POST", "/channels/room.a/events", "publish", 201, kw={"json": {"hi": 1}}),
    Call("GET", "/channels/room.a/events", "subscribe"),
    Call("GET", "/channels/room.a/events", "subscribe", kw=SSE),
    Call("POST", "/files", "files", 201, kw={"files": {"file": ("x.txt", b"x")}}),
    Call("PUT", "/files/x.txt", "files", 201, kw={"content": b"x"}),
    Call("GET", "/files", "files"),
    Call("GET", f"/files/{FILE}", "files"),
    Call("HEAD", f"/files/{FILE}", "files"),
    Call("GET", f"/files/{FILE}/meta", "files"),
    Call("DELETE", f"/files/{FILE}", "files", 204),
    Call(
        "POST",
        "/uploads/",
        "files",
        201,
        kw={"headers": {**TUS, "Upload-Length": "3"}},
    ),
    Call("GET", "/stream?n=1&interval=0", "streams"),
    Call("POST", "/stream", "streams", kw={"json": {"n": 1, "interval": 0}}),
    Call("POST", "/uploadfile/", "files", kw={"files": {"file": ("y.txt", b"y")}}),
    Call("POST", "/downloadfile/", "files", kw={"json": {"filename": "mine.txt"}}),
]
IDS = [f"{c.method} {c.path}{' SSE' if c.kw is SSE else ''}" for c in CALLS]


def bad_tokens() -> dict[str, dict[str, str]]:
    return {
        "expired": bearer(token(ttl=-30, **EVERYTHING)),
        "wrong key": bearer(token(key="w" * 48, **EVERYTHING)),
        "alg none": bearer(unsigned()),
        "not bearer": {"Authorization": f"Basic {token(**EVERYTHING)}"},
    }


def fill(call: Call, server: LiveServer) -> Call:
    if FILE not in call.path:
        return call
    # Each call gets a file of its own (a DELETE takes it away); the caller
    # owns it, for `delete` covers one's own files.
    return Call(call.method, call.path.replace(FILE, upload(server, ALL)), call.needs, call.ok)


@pytest.mark.parametrize("call", CALLS, ids=IDS)
def test_every_route_needs_a_token_and_the_permission(server: LiveServer, call: Call) -> None:
    upload(server, ALL, "mine.txt")  # what /downloadfile/ asks for
    call = fill(call, server)

    anonymous = call.send(server, {})
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.headers["www-authenticate"] == CHALLENGE
    if call.method != "HEAD":
        assert "token" in anonymous.json()["detail"]

    for what, headers in bad_tokens().items():
        refused = call.send(server, headers)
        assert refused.status_code == 401, (what, refused.text)
        assert refused.headers["www-authenticate"] == INVALID, what

    # A good token without the permission: 403 naming what is missing.
    forbidden = call.send(server, NOTHING)
    assert forbidden.status_code == 403, forbidden.text
    if call.method != "HEAD":
        assert f"tidewire.{call.needs}" in forbidden.json()["detail"]

    allowed = call.send(server, ALL)
    assert allowed.status_code == call.ok, allowed.text


WS_CALLS = [("/streams/count/ws", "streams"), ("/channels/room.a/ws", "subscribe")]


@pytest.mark.parametrize(("path", "needs"), WS_CALLS)
def test_websocket_handshakes_get_the_same_statuses(
    server: LiveServer, path: str, needs: str
) -> None:
    url = server.ws_url + path
    with pytest.raises(InvalidStatus) as anonymous:
        connect(url, open_timeout=10)
    assert anonymous.value.response.status_code == 401
    assert anonymous.value.response.headers["www-authenticate"] == CHALLENGE

    for what, headers in bad_tokens().items():
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == 401, what
        assert refused.value.response.headers["www-authenticate"] == INVALID

    with pytest.raises(InvalidStatus) as forbidden:
        connect(url, additional_headers=NOTHING, open_timeout=10)
    assert forbidden.value.response.status_code == 403
    assert f"tidewire.{needs}".encode() in forbidden.value.response.body

    # Browsers cannot set headers on a WebSocket: ?access_token= it is.
    good = token(**EVERYTHING)
    with connect(f"{url}?access_token={good}", open_timeout=10) as ws:
        if "streams" in path:
            assert json.loads(ws.recv(10))["data"] == 0


def test_open_routes_need_no_token_and_ignore_a_bad_one(server: LiveServer) -> None:
    for path in ("/healthz", "/", "/docs", "/openapi.json"):
        for headers in ({}, bad_tokens()["wrong key"]):
            response = httpx.get(server.url + path, headers=headers)
            assert response.status_code == 200, (path, response.text)
    options = httpx.options(f"{server.url}/uploads/")
    assert options.status_code == 204  # what tus supports, asked without credentials


def test_the_stream_list_shows_what_the_token_may_start(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/streams").status_code == 401
    names = [s["name"] for s in httpx.get(f"{server.url}/streams", headers=ALL).json()]
    assert sorted(names) == ["count", "demo"]
    only = bearer(token(streams=["co*"]))
    assert [s["name"] for s in httpx.get(f"{server.url}/streams", headers=only).json()] == ["count"]
    assert httpx.get(f"{server.url}/streams", headers=NOTHING).json() == []


def test_a_run_is_its_starters(server: LiveServer) -> None:
    alice = bearer(token("alice", streams=["count"]))
    bob = bearer(token("bob", streams=["count"]))
    started = httpx.post(f"{server.url}/streams/count?detach=true&n=3", headers=alice)
    run_id = started.json()["run"]
    unknown = httpx.get(f"{server.url}/runs/0000000000000000", headers=bob)
    for method, path in (
        ("GET", f"/runs/{run_id}"),
        ("GET", f"/runs/{run_id}/events"),
        ("DELETE", f"/runs/{run_id}"),
    ):
        refused = httpx.request(method, server.url + path, headers=bob)
        # Exactly as a run that does not exist, so ids tell nothing.
        assert refused.status_code == 404, (path, refused.text)
        assert refused.json()["detail"] == unknown.json()["detail"].replace(
            "0000000000000000", run_id
        )
        assert httpx.request(method, server.url + path).status_code == 401
    with pytest.raises(InvalidStatus) as refused_ws:
        connect(f"{server.ws_url}/runs/{run_id}/ws", additional_headers=bob, open_timeout=10)
    assert refused_ws.value.response.status_code == 404

    assert httpx.get(f"{server.url}/runs/{run_id}", headers=alice).status_code == 200
    assert httpx.get(f"{server.url}/runs/{run_id}", headers=ADMIN).status_code == 200
    events = httpx.get(f"{server.url}/runs/{run_id}/events", headers=alice).text
    assert [json.loads(line)["event"] for line in events.splitlines() if line] == [
        "message",
        "message",
        "message",
        "end",
    ]


def test_run_ownership_holds_in_another_process_on_redis(
    serve: Callable[..., LiveServer], redis_server: Any, tmp_path: Path
) -> None:
    from tidewire.broker.redis import RedisBroker

    prefix = f"access-{time.time_ns()}:"
    servers = []
    for where in ("a", "b"):
        tw = Tidewire(
            broker=RedisBroker(redis_server.url, prefix=prefix),
            storage=LocalStorage(tmp_path / where),
            settings=Settings(heartbeat=0.3, lease=1.5, auth_secret=SECRET),
        )

        @tw.stream
        async def slow(n: int = 1000) -> AsyncIterator[int]:
            for i in range(n):
                yield i
                await asyncio.sleep(0.05)

        servers.append(serve(tw))
    a, b = servers
    alice = bearer(token("alice", streams=["slow"]))
    bob = bearer(token("bob", streams=["slow"]))
    run_id = httpx.post(f"{a.url}/streams/slow?detach=true", headers=alice).json()["run"]

    # b knows the run only from its shared record in Redis.
    assert httpx.get(f"{b.url}/runs/{run_id}", headers=bob).status_code == 404
    assert httpx.get(f"{b.url}/runs/{run_id}/events", headers=bob).status_code == 404
    assert httpx.delete(f"{b.url}/runs/{run_id}", headers=bob).status_code == 404
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{b.ws_url}/runs/{run_id}/ws", additional_headers=bob, open_timeout=10)
    assert refused.value.response.status_code == 404
    info = httpx.get(f"{b.url}/runs/{run_id}", headers=alice)
    assert info.status_code == 200 and info.json()["state"] == "running"
    cancelled = httpx.delete(f"{b.url}/runs/{run_id}", headers=alice, timeout=10)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled"


def test_read_own_lists_and_reads_only_own_files(server: LiveServer) -> None:
    alice = bearer(token("alice", files=["read:own", "write"]))
    bob = bearer(token("bob", files=["read:own", "write"]))
    reader = bearer(token("carol", files=["read"]))
    mine = upload(server, alice, "a.txt")
    theirs = upload(server, bob, "b.txt")
    upload(server, bob, "a.txt")  # the same name as alice's, newer

    listed = httpx.get(f"{server.url}/files", headers=alice).json()
    assert [f["id"] for f in listed] == [mine]
    assert "owner" not in listed[0]  # the public metadata says nothing of who
    assert len(httpx.get(f"{server.url}/files", headers=reader).json()) == 3
    assert httpx.get(f"{server.url}/files/{mine}", headers=alice).content == b"hello"
    for path in (f"/files/{theirs}", f"/files/{theirs}/meta"):
        refused = httpx.get(server.url + path, headers=alice)
        assert refused.status_code == 403
        assert "read:own" in refused.json()["detail"]
    assert httpx.get(f"{server.url}/files/{theirs}", headers=reader).status_code == 200
    # By name: alice's own newest of that name, not bob's newer one.
    [found] = httpx.get(f"{server.url}/files?name=a.txt", headers=alice).json()
    assert found["id"] == mine
    assert httpx.get(f"{server.url}/files?name=b.txt", headers=alice).json() == []
    by_name = httpx.post(f"{server.url}/downloadfile/?filename=b.txt", headers=alice)
    assert by_name.status_code == 404
    by_id = httpx.post(f"{server.url}/downloadfile/?filename={theirs}", headers=alice)
    assert by_id.status_code == 403


def test_delete_covers_own_files_and_admin_any(server: LiveServer) -> None:
    alice = bearer(token("alice", files=["read", "write", "delete"]))
    bob = bearer(token("bob", files=["read", "write", "delete"]))
    mine, theirs = upload(server, alice), upload(server, bob)
    refused = httpx.delete(f"{server.url}/files/{theirs}", headers=alice)
    assert refused.status_code == 403
    assert "ownership" in refused.json()["detail"]
    assert httpx.delete(f"{server.url}/files/{mine}", headers=alice).status_code == 204
    assert httpx.delete(f"{server.url}/files/{theirs}", headers=ADMIN).status_code == 204
    gone = httpx.delete(f"{server.url}/files/{theirs}", headers=bob)
    assert gone.status_code == 404


def test_an_upload_is_its_creators_and_so_is_its_file(server: LiveServer) -> None:
    alice = bearer(token("alice", files=["read:own", "write"]))
    bob = bearer(token("bob", files=["read:own", "write"]))
    created = tus_create(server, alice)
    assert created.status_code == 201, created.text
    url = server.url + created.headers["location"]
    for method in ("HEAD", "PATCH", "DELETE"):
        headers = {**bob, **TUS, "Upload-Offset": "0"}
        headers["Content-Type"] = "application/offset+octet-stream"
        refused = httpx.request(method, url, headers=headers, content=b"evil!")
        assert refused.status_code == 404, method
        assert httpx.request(method, url, headers=TUS).status_code == 401
    assert httpx.head(url, headers={**alice, **TUS}).headers["upload-offset"] == "0"
    patched = httpx.patch(
        url,
        content=b"hello",
        headers={
            **alice,
            **TUS,
            "Upload-Offset": "0",
            "Content-Type": "application/offset+octet-stream",
        },
    )
    assert patched.status_code == 204, patched.text
    file_id = patched.headers["tidewire-file"]
    assert [f["id"] for f in httpx.get(f"{server.url}/files", headers=alice).json()] == [file_id]
    assert httpx.get(f"{server.url}/files", headers=bob).json() == []


def test_a_websocket_frame_the_token_may_not_publish_closes_with_1008(server: LiveServer) -> None:
    reader = bearer(token(subscribe=["room.*"], publish=["room.mine"]))
    with connect(
        f"{server.ws_url}/channels/room.a/ws", additional_headers=reader, open_timeout=10
    ) as ws:
        ws.send(json.dumps({"hello": 1}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert "tidewire.publish" in closed.value.rcvd.reason

    writer = bearer(token(subscribe=["room.*"], publish=["room.*"]))
    with connect(
        f"{server.ws_url}/channels/room.b/ws", additional_headers=writer, open_timeout=10
    ) as ws:
        ws.send(json.dumps({"hello": 2}))
        assert json.loads(ws.recv(10))["data"] == {"hello": 2}


def test_no_event_went_out_from_a_refused_frame(server: LiveServer) -> None:
    reader = bearer(token(subscribe=["room.*"]))
    with connect(
        f"{server.ws_url}/channels/room.c/ws", additional_headers=reader, open_timeout=10
    ) as ws:
        ws.send(b"binary too")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    published = httpx.post(f"{server.url}/channels/room.c/events", json="marker", headers=ALL)
    with connect(
        f"{server.ws_url}/channels/room.c/ws?after=0", additional_headers=ALL, open_timeout=10
    ) as ws:
        first = json.loads(ws.recv(10))
    assert first["id"] == published.json()["id"]  # the marker is the channel's first event


FORGED = {"picture": {"$blob": {"type": "image/png", "size": 5, "url": "https://evil/x"}}}


def test_a_published_blob_with_a_url_is_refused(server: LiveServer) -> None:
    url = f"{server.url}/channels/room.a/events"
    for body in (FORGED, [1, {"deep": FORGED}], FORGED["picture"]):
        refused = httpx.post(url, json=body, headers=ALL)
        assert refused.status_code == 422, refused.text
        assert "url" in refused.json()["detail"]
    inline = {"$blob": {"type": "text/plain", "data": base64.b64encode(b"ok").decode()}}
    assert httpx.post(url, json=inline, headers=ALL).status_code == 201
    with connect(
        f"{server.ws_url}/channels/room.a/ws", additional_headers=ALL, open_timeout=10
    ) as ws:
        ws.send(json.dumps(FORGED))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert "url" in closed.value.rcvd.reason


def test_the_blob_rule_holds_with_access_control_off(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    tw = Tidewire(broker=MemoryBroker(), storage=LocalStorage(tmp_path), settings=Settings())
    server = serve(tw)
    refused = httpx.post(f"{server.url}/channels/news/events", json=FORGED)
    assert refused.status_code == 422


def test_detach_needs_post(server: LiveServer) -> None:
    refused = httpx.get(f"{server.url}/streams/count?detach=true", headers=ALL)
    assert refused.status_code == 405
    assert refused.headers["allow"] == "POST"
    assert "POST" in refused.json()["detail"]
    assert httpx.get(f"{server.url}/streams/count?detach=false", headers=ALL).status_code == 200


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_authorize_hook_refuses_with_403(
    serve: Callable[..., LiveServer], tmp_path: Path, kind: str
) -> None:
    asked: list[tuple[str, str, str]] = []

    def rule(identity: Identity, action: str, resource: str) -> bool:
        asked.append((identity.sub, action, resource))
        return identity.sub != "mallory"

    async def async_rule(identity: Identity, action: str, resource: str) -> bool:
        await asyncio.sleep(0)
        return rule(identity, action, resource)

    server = serve(app(tmp_path, rule if kind == "sync" else async_rule))
    mallory = bearer(token("mallory", **EVERYTHING))
    refused = httpx.get(f"{server.url}/streams/count", headers=mallory)
    assert refused.status_code == 403
    assert "policy" in refused.json()["detail"]
    assert httpx.post(
        f"{server.url}/channels/room.a/events", json=1, headers=mallory
    ).status_code == (403)
    with pytest.raises(InvalidStatus) as ws_refused:
        connect(f"{server.ws_url}/channels/room.a/ws", additional_headers=mallory)
    assert ws_refused.value.response.status_code == 403
    assert httpx.get(f"{server.url}/streams/count", headers=ALL).status_code == 200
    assert ("alice", "stream", "count") in asked
    assert ("mallory", "subscribe", "room.a") in asked


def test_a_stream_verifies_its_token_once(serve: Callable[..., LiveServer], tmp_path: Path) -> None:
    """A token that expires while its stream runs does not cut the stream."""
    server = serve(app(tmp_path))
    short = bearer(token(ttl=2, **EVERYTHING))
    started = time.monotonic()
    body = httpx.get(
        f"{server.url}/streams/count?n=30&interval=0.1", headers=short, timeout=20
    ).text
    assert time.monotonic() - started > 2  # it outlived its token
    events = [json.loads(line) for line in body.splitlines() if line]
    assert events[-1]["event"] == "end" and len(events) == 31


def test_auth_comes_from_the_environment_without_settings(
    monkeypatch: pytest.MonkeyPatch, serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    """What `tidewire serve` workers get: TIDEWIRE_AUTH_SECRET turns auth on."""
    monkeypatch.setenv("TIDEWIRE_AUTH_SECRET", SECRET)
    tw = Tidewire(broker=MemoryBroker(), storage=LocalStorage(tmp_path))
    assert tw.guard.on
    server = serve(tw)
    assert httpx.get(f"{server.url}/files").status_code == 401
    assert httpx.get(f"{server.url}/files", headers=ALL).status_code == 200


def test_with_auth_off_files_have_no_owner(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    tw = Tidewire(broker=MemoryBroker(), storage=LocalStorage(tmp_path), settings=Settings())
    server = serve(tw)
    file_id = upload(server, {})
    assert httpx.delete(f"{server.url}/files/{file_id}").status_code == 204


def test_a_blob_with_a_url_is_refused_on_every_publish_path(server: LiveServer) -> None:
    """JSON under any JSON type or none, the Python client (sync and async), a
    WebSocket text frame: 422 (or 1008), nothing published. Form fields and
    text are strings, never blobs: what looks like one arrives as text."""
    from tidewire.client import AsyncClient, Client, HTTPStatusError

    url = f"{server.url}/channels/room.p/events"
    raw = json.dumps(FORGED).encode()
    for content_type in ("application/json", "application/vnd.example+json", None):
        headers = {**ALL, **({"Content-Type": content_type} if content_type else {})}
        refused = httpx.post(url, content=raw, headers=headers)
        assert refused.status_code == 422, (content_type, refused.text)
        assert '"url"' in refused.json()["detail"]
    jwt_ = token(**EVERYTHING)
    with Client(server.url, token=jwt_) as tw, pytest.raises(HTTPStatusError) as sync:
        tw.publish("room.p", FORGED)
    assert sync.value.status_code == 422

    async def publish_async() -> int:
        async with AsyncClient(server.url, token=jwt_) as tw:
            try:
                await tw.publish("room.p", [FORGED])
            except HTTPStatusError as exc:
                return exc.status_code
        return 0

    assert asyncio.run(publish_async()) == 422
    with connect(f"{server.ws_url}/channels/room.p/ws", additional_headers=ALL) as ws:
        ws.send(raw.decode())
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008

    as_form = httpx.post(url, data={"picture": raw.decode()}, headers=ALL)
    as_text = httpx.post(url, content=raw, headers={**ALL, "Content-Type": "text/plain"})
    assert as_form.status_code == as_text.status_code == 201
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{url}?after=0", headers=ALL) as live,
    ):
        lines = live.iter_lines()
        got = [json.loads(next(lines)) for _ in range(2)]
    assert [e["data"] for e in got] == [{"picture": raw.decode()}, raw.decode()]
