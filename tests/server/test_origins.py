"""Origins: what a page on another site may do here, with access control on and off."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import LiveServer
from tidewire import Settings, Tidewire
from tidewire.server.origins import EXPOSED_HEADERS

EVIL = "https://evil.example"
FRIEND = "https://app.example.com"
SECRET = "s" * 32


@pytest.fixture(autouse=True)
def _own_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The apps here keep files in ./data, as `tidewire serve` does: a folder
    # of this test's own, not one other tests have written to.
    monkeypatch.chdir(tmp_path)


def make(serve: Callable[..., LiveServer], **settings: Any) -> tuple[Tidewire, LiveServer]:
    tw = Tidewire(settings=Settings(allow_origins=(FRIEND,), **settings))

    @tw.stream
    async def count(n: int = 2) -> Any:
        for i in range(n):
            yield i

    return tw, serve(tw)


def replay(server: LiveServer, channel: str) -> list[Any]:
    """The messages a channel holds: a subscription from the start, read until it idles."""
    seen: list[Any] = []
    try:
        with httpx.stream(
            "GET", f"{server.url}/channels/{channel}/events?after=0", timeout=0.5
        ) as response:
            for line in response.iter_lines():
                if line:
                    event = json.loads(line)
                    if event["event"] == "message":
                        seen.append(event["data"])
    except httpx.ReadTimeout:
        pass
    return seen


def ws_status(url: str, origin: str | None, **headers: str) -> int:
    """The handshake's status: 101 when the socket opened."""
    try:
        with connect(url, origin=origin, additional_headers=headers, open_timeout=5):  # type: ignore[arg-type]
            return 101
    except InvalidStatus as exc:
        if exc.response.status_code == 403:
            assert "origin" in json.loads(exc.response.body or b"{}")["detail"]
        return exc.response.status_code


def test_a_websocket_from_a_foreign_origin_is_refused(serve: Callable[..., LiveServer]) -> None:
    _, server = make(serve)
    own = server.url
    for path in ("/channels/room/ws", "/streams/count/ws", "/runs/nope/ws"):
        url = server.ws_url + path
        assert ws_status(url, EVIL) == 403, path
        # An origin differing only in scheme, host or port is foreign too.
        assert ws_status(url, own.replace("http:", "https:")) == 403, path
        assert ws_status(url, own.replace("127.0.0.1", "localhost")) == 403, path
        assert ws_status(url, f"http://127.0.0.1:{server.port + 1}") == 403, path
    for origin in (FRIEND, FRIEND.upper() + "/", own, None):
        assert ws_status(server.ws_url + "/channels/room/ws", origin) == 101, origin
        assert ws_status(server.ws_url + "/streams/count/ws", origin) == 101, origin


def test_a_foreign_page_cannot_publish_change_or_start(serve: Callable[..., LiveServer]) -> None:
    _, server = make(serve)
    evil = {"origin": EVIL}
    # What a cross-site form or a text/plain fetch sends without a preflight.
    refused = [
        httpx.post(
            f"{server.url}/channels/room/events",
            content=b'{"x": 1}',
            headers={**evil, "content-type": "text/plain"},
        ),
        httpx.put(f"{server.url}/files/a.txt", content=b"x", headers=evil),
        httpx.post(f"{server.url}/uploads/", headers={**evil, "tus-resumable": "1.0.0"}),
        httpx.delete(f"{server.url}/files/x", headers=evil),
        httpx.patch(f"{server.url}/uploads/x", headers=evil),
        httpx.get(f"{server.url}/streams/count", headers=evil),
        httpx.post(f"{server.url}/streams/count", headers=evil),
    ]
    for response in refused:
        assert response.status_code == 403, (response.request, response.text)
        assert EVIL in response.json()["detail"]
        assert "access-control-allow-origin" not in response.headers
    assert replay(server, "room") == []
    assert httpx.get(f"{server.url}/files").json() == []
    # Reads are CORS's business: answered, but without the header a browser needs.
    listed = httpx.get(f"{server.url}/streams", headers=evil)
    assert listed.status_code == 200
    assert "access-control-allow-origin" not in listed.headers


def test_own_allowed_and_no_origin_pass(serve: Callable[..., LiveServer]) -> None:
    _, server = make(serve)
    for origin in (server.url, FRIEND, None):
        headers = {"origin": origin} if origin else {}
        published = httpx.post(f"{server.url}/channels/room/events", json=1, headers=headers)
        assert published.status_code == 201, origin
        started = httpx.get(f"{server.url}/streams/count", headers=headers)
        assert started.status_code == 200, origin
    assert replay(server, "room") == [1, 1, 1]


def test_own_origin_is_the_scheme_and_host_the_request_came_with(
    serve: Callable[..., LiveServer],
) -> None:
    # uvicorn believes X-Forwarded-Proto from 127.0.0.1 by default (a proxy
    # on this machine): the scheme the browser used is https.
    _, server = make(serve)
    proxied = {"host": "tidewire.example", "x-forwarded-proto": "https"}

    def publish(origin: str, **headers: str) -> int:
        url = f"{server.url}/channels/room/events"
        return httpx.post(url, json=1, headers={"origin": origin, **headers}).status_code

    assert publish("https://tidewire.example", **proxied) == 201
    assert publish("https://tidewire.example:443", **proxied) == 201
    assert publish("http://tidewire.example", **proxied) == 403
    assert publish("https://tidewire.example", host="tidewire.example") == 403
    assert publish("http://tidewire.example:80", host="tidewire.example") == 201
    assert publish("null") == 403  # sandboxed frames, file:// pages


def test_cors_answers_allowed_origins_only(serve: Callable[..., LiveServer]) -> None:
    _, server = make(serve)
    for path in ("/files", "/uploads/", "/channels/room/events", "/streams/count"):
        preflight = {
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization, upload-length",
        }
        allowed = httpx.options(server.url + path, headers={"origin": FRIEND, **preflight})
        assert allowed.status_code == 200, path
        assert allowed.headers["access-control-allow-origin"] == FRIEND
        assert allowed.headers["access-control-allow-credentials"] == "true"
        assert "POST" in allowed.headers["access-control-allow-methods"]
        assert "upload-length" in allowed.headers["access-control-allow-headers"].lower()
        refused = httpx.options(server.url + path, headers={"origin": EVIL, **preflight})
        assert refused.status_code == 403, path
        assert "--allow-origin" in refused.json()["detail"]
        assert not any(h.startswith("access-control-") for h in refused.headers)
    # A plain OPTIONS (tus's discovery) is still the route's.
    assert httpx.options(f"{server.url}/uploads/").headers["tus-version"] == "1.0.0"
    response = httpx.get(f"{server.url}/files?limit=1", headers={"origin": FRIEND})
    assert response.headers["access-control-allow-origin"] == FRIEND
    exposed = response.headers["access-control-expose-headers"].lower()
    for name in ("Tidewire-Run", "Tidewire-Next-Cursor", "Upload-Offset", "Location"):
        assert name.lower() in exposed
    assert set(EXPOSED_HEADERS) >= {"Tus-Version", "Tus-Resumable", "Tus-Max-Size"}


def test_origins_are_checked_with_access_control_on(serve: Callable[..., LiveServer]) -> None:
    _, server = make(serve, auth_secret=SECRET)
    admin = jwt.encode(
        {"sub": "root", "exp": time.time() + 60, "tidewire": {"admin": True}}, SECRET
    )
    bearer = {"authorization": f"Bearer {admin}"}
    url = f"{server.ws_url}/channels/room/ws?access_token={admin}"
    assert ws_status(url, EVIL) == 403
    assert ws_status(url, FRIEND) == 101
    published = httpx.post(
        f"{server.url}/channels/room/events", json=1, headers={"origin": EVIL, **bearer}
    )
    assert published.status_code == 403
    published = httpx.post(
        f"{server.url}/channels/room/events", json=1, headers={"origin": FRIEND, **bearer}
    )
    assert published.status_code == 201


def test_a_star_allows_every_origin(serve: Callable[..., LiveServer]) -> None:
    server = serve(Tidewire(settings=Settings(allow_origins=("*",))))
    assert ws_status(f"{server.ws_url}/channels/room/ws", EVIL) == 101
    response = httpx.post(f"{server.url}/channels/room/events", json=1, headers={"origin": EVIL})
    assert response.status_code == 201
    # With credentials, the origin itself, never "*".
    assert response.headers["access-control-allow-origin"] == EVIL
