"""Body limits on every route that reads a body into memory: at, just under and just over.

`max_event_bytes` bounds every publish (JSON, text, forms, multipart files,
WebSocket frames); `max_body_bytes` every other body that is not a file
(stream parameters, `/stream`'s, tus metadata, `/downloadfile/`'s name, a
link's lifetime). Small limits here, so that "just over" is cheap; a declared
length is refused before the body is read, a chunked one while it is read.
Nothing refused leaves a file, an upload or an event behind.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import QUICK, LiveServer
from tidewire import Settings, Tidewire
from tidewire.demo import FRAMES
from tidewire.server.compat import add_compat_routes
from tidewire.storage.local import LocalStorage

Serve = Callable[..., LiveServer]

#: Both limits, small: every body below is built to be exactly this, one less or one more.
LIMIT = 1000
SETTINGS = Settings(
    heartbeat=QUICK.heartbeat,
    disconnect_grace=QUICK.disconnect_grace,
    close_timeout=QUICK.close_timeout,
    max_event_bytes=LIMIT,
    max_body_bytes=LIMIT,
    # Accepted multipart publishes store their file as a blob: a refused one must not.
    inline_blob_limit=100,
)
SIZES = {"under": LIMIT - 1, "at": LIMIT, "over": LIMIT + 1}


@pytest.fixture
def app(tmp_path: Path) -> Tidewire:
    tw = Tidewire(settings=SETTINGS, storage=LocalStorage(tmp_path / "data"))

    @tw.stream
    async def echo(text: str = "") -> AsyncIterator[dict[str, int]]:
        """Yield the length of the text."""
        yield {"length": len(text)}

    add_compat_routes(tw.router, tw, FRAMES)
    return tw


@pytest.fixture
def server(serve: Serve, app: Tidewire) -> LiveServer:
    return serve(app)


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def chunked(body: bytes) -> Iterator[bytes]:
    """The body without a Content-Length: the server can only count it as it comes."""
    for start in range(0, len(body), 100):
        yield body[start : start + 100]


def json_string(size: int) -> bytes:
    """A JSON string of exactly `size` bytes."""
    return b'"' + b"x" * (size - 2) + b'"'


def json_object(size: int, key: str = "text") -> bytes:
    """`{"<key>": "xxx…"}` of exactly `size` bytes."""
    frame = json.dumps({key: ""}).encode()
    return json.dumps({key: "x" * (size - len(frame))}).encode()


def urlencoded(size: int, key: str = "text") -> bytes:
    return f"{key}=".encode() + b"x" * (size - len(key) - 1)


def multipart(size: int, filename: str | None = "f.bin") -> tuple[bytes, str]:
    """A multipart body of exactly `size` bytes: one part whose content fills it."""
    boundary = "b0undary"
    disposition = 'form-data; name="f"' + (f'; filename="{filename}"' if filename else "")
    head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    body = head + b"y" * (size - len(head) - len(tail)) + tail
    assert len(body) == size
    return body, f"multipart/form-data; boundary={boundary}"


def sent_both_ways(
    http: httpx.Client, url: str, body: bytes, kind: str, **kwargs: Any
) -> list[httpx.Response]:
    """The same body with its length declared, and chunked."""
    headers = {"content-type": kind}
    return [
        http.post(url, content=body, headers=headers, **kwargs),
        http.post(url, content=chunked(body), headers=headers, **kwargs),
    ]


def read_events(http: httpx.Client, channel: str) -> list[dict[str, Any]]:
    """The channel's retained events: read until the first heartbeat (a blank line)."""
    events = []
    url = f"/channels/{channel}/events"
    with http.stream("GET", url, params={"after": "0"}) as response:
        for line in response.iter_lines():
            if not line.strip():
                break
            events.append(json.loads(line))
    return events


def on_disk(tmp_path: Path, folder: str) -> list[Path]:
    """What the local storage holds in `files`, `tmp` (bytes on their way) or `uploads`."""
    return [path for path in (tmp_path / "data" / folder).glob("*") if path.is_file()]


PUBLISH_BODIES: dict[str, Callable[[int], tuple[bytes, str]]] = {
    "json": lambda size: (json_string(size), "application/json"),
    "text": lambda size: (b"t" * size, "text/plain"),
    "urlencoded": lambda size: (urlencoded(size), "application/x-www-form-urlencoded"),
    "multipart file": lambda size: multipart(size),
    "multipart field": lambda size: multipart(size, filename=None),
}


@pytest.mark.parametrize("kind", PUBLISH_BODIES)
def test_a_publish_is_bounded_by_max_event_bytes(
    http: httpx.Client, tmp_path: Path, kind: str
) -> None:
    channel = f"limits-{kind.replace(' ', '-')}"
    url = f"/channels/{channel}/events"
    published = 0
    for where, size in SIZES.items():
        body, content_type = PUBLISH_BODIES[kind](size)
        assert len(body) == size
        for response in sent_both_ways(http, url, body, content_type):
            if where == "over":
                assert response.status_code == 413, (where, response.text[:200])
                assert f"at most {LIMIT} bytes" in response.json()["detail"]
            else:
                assert response.status_code == 201, (where, response.text[:200])
                published += 1
    assert len(read_events(http, channel)) == published == 4, "nothing over was published"
    # Accepted multipart files became blob files (over 100 bytes); refused ones left none.
    expected_files = 4 if kind == "multipart file" else 0
    assert len(on_disk(tmp_path, "files")) == expected_files
    assert on_disk(tmp_path, "tmp") == []


@pytest.mark.parametrize("frame", ["text", "bytes"])
def test_a_websocket_frame_is_bounded_by_max_event_bytes_in_the_app(
    server: LiveServer, http: httpx.Client, frame: str
) -> None:
    """Served with uvicorn's own frame limit (16 MiB): the app's check refuses it."""
    channel = f"ws-{frame}"
    for where, size in SIZES.items():
        # Text frames count in bytes: two-byte characters, and one ASCII to make the size.
        payload: str | bytes = (
            "é" * (size // 2) + "x" * (size % 2) if frame == "text" else b"z" * size
        )
        with connect(f"{server.ws_url}/channels/{channel}/ws", max_size=None) as ws:
            ws.send(payload)
            if where == "over":
                with pytest.raises(ConnectionClosed):
                    ws.recv(timeout=5)
                assert ws.close_code == 1009
                assert ws.close_reason == f"frames may be at most {LIMIT} bytes"
            else:
                ws.recv(timeout=5)  # the event it published, back to its subscriber
    assert len(read_events(http, channel)) == 2


@pytest.mark.parametrize("implementation", ["websockets", "websockets-sansio"])
def test_the_server_refuses_a_frame_over_ws_max_size_before_the_app_sees_it(
    serve: Serve, app: Tidewire, implementation: str
) -> None:
    """`tidewire serve` sets uvicorn's `ws_max_size` to `max_event_bytes`: 1009 from the server.

    (wsproto, the third implementation uvicorn may use, honours `ws_max_size`
    since uvicorn 0.46, the floor in pyproject.toml; it is not installed here.)
    """
    server = serve(app, ws=implementation, ws_max_size=LIMIT)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for where, size in SIZES.items():
            with connect(f"{server.ws_url}/channels/server/ws", max_size=None) as ws:
                ws.send(b"z" * size)
                if where == "over":
                    with pytest.raises(ConnectionClosed):
                        ws.recv(timeout=5)
                    assert ws.close_code == 1009
                    # Not the app's reason: the frame never reached it.
                    assert ws.close_reason != f"frames may be at most {LIMIT} bytes"
                else:
                    ws.recv(timeout=5)
        assert len(read_events(http, "server")) == 2


PARAMS_BODIES: dict[str, Callable[[int], tuple[bytes, str]]] = {
    "json": lambda size: (json_object(size), "application/json"),
    "urlencoded": lambda size: (urlencoded(size), "application/x-www-form-urlencoded"),
}


@pytest.mark.parametrize("kind", PARAMS_BODIES)
@pytest.mark.parametrize("route", ["/streams/echo", "/stream"])
def test_stream_parameters_are_bounded_by_max_body_bytes(
    http: httpx.Client, route: str, kind: str
) -> None:
    for where, size in SIZES.items():
        body, content_type = PARAMS_BODIES[kind](size)
        # /stream's own parameters in the query: one event, at once.
        query = {"n": "1", "interval": "0"} if route == "/stream" else {}
        for response in sent_both_ways(http, route, body, content_type, params=query):
            if where == "over":
                assert response.status_code == 413, (where, response.text[:200])
                assert f"at most {LIMIT} bytes" in response.json()["detail"]
            elif route == "/stream":
                # Its parameters are n and interval: others are ignored, as the original did.
                assert response.status_code == 200, (where, response.text[:200])
                response.close()
            else:
                assert response.status_code == 200, (where, response.text[:200])
                assert json.loads(response.text.splitlines()[0])["data"]["length"] > LIMIT - 20


def test_a_multipart_parameters_body_counts_whole(http: httpx.Client) -> None:
    body, content_type = multipart(LIMIT + 1)
    for response in sent_both_ways(http, "/streams/echo", body, content_type):
        assert response.status_code == 413


def test_tus_metadata_is_bounded_by_max_body_bytes(http: httpx.Client, tmp_path: Path) -> None:
    tus = {"Tus-Resumable": "1.0.0", "Upload-Length": "3"}
    name = "filename " + base64.b64encode(b"a.txt").decode()
    for where, size in SIZES.items():
        # Then a pad pair, its key as long as makes its base64 value a multiple of 4.
        rest = size - len(name) - 1
        key = "p" * (1 + (rest - 2) % 4)
        metadata = f"{name},{key} " + "A" * (rest - len(key) - 1)
        assert len(metadata) == size
        response = http.post("/uploads/", headers={**tus, "Upload-Metadata": metadata})
        if where == "over":
            assert response.status_code == 413, response.text
            assert f"at most {LIMIT} bytes" in response.json()["detail"]
        else:
            assert response.status_code == 201, response.text
    # Two uploads were begun; the refused one left nothing.
    uploads = on_disk(tmp_path, "uploads")
    assert len({p.name.split(".")[0] for p in uploads}) == 2, uploads


def test_downloadfile_body_is_bounded_by_max_body_bytes(http: httpx.Client) -> None:
    for where, size in SIZES.items():
        bodies = {
            "json": (json_object(size, "filename"), "application/json"),
            "urlencoded": (urlencoded(size, "filename"), "application/x-www-form-urlencoded"),
        }
        for kind, (body, content_type) in bodies.items():
            for response in sent_both_ways(http, "/downloadfile/", body, content_type):
                if where == "over":
                    assert response.status_code == 413, (kind, response.text[:200])
                    assert f"at most {LIMIT} bytes" in response.json()["detail"]
                else:
                    # Read, and found to name nothing stored (or too long a name).
                    assert response.status_code in (404, 422), (kind, response.text[:200])


def test_a_link_body_is_bounded_by_max_body_bytes(http: httpx.Client) -> None:
    file_id = http.put("/files/a.txt", content=b"abc").json()["id"]
    url = f"/files/{file_id}/links"
    for where, size in SIZES.items():
        # Valid JSON of that size: the lifetime, then spaces.
        body = b'{"expires_in": 60}'
        body += b" " * (size - len(body))
        for response in sent_both_ways(http, url, body, "application/json"):
            if where == "over":
                assert response.status_code == 413, response.text[:200]
                assert f"at most {LIMIT} bytes" in response.json()["detail"]
            else:
                assert response.status_code == 201, response.text[:200]
    bad = http.post(url, json={"expires_in": "soon"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "expires_in"]


def test_a_file_part_with_oversized_headers_is_400(http: httpx.Client, tmp_path: Path) -> None:
    """python-multipart (>= 0.0.27) bounds a part's header lines; nothing is stored."""
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="f"; filename="a.bin"\r\n'
        f"X-Pad: {'a' * 8000}\r\n\r\n"
        f"abc\r\n--{boundary}--\r\n"
    ).encode()
    kind = f"multipart/form-data; boundary={boundary}"
    response = http.post("/files", content=body, headers={"content-type": kind})
    assert response.status_code == 400, response.text
    assert "multipart" in response.json()["detail"]
    assert on_disk(tmp_path, "files") == []
