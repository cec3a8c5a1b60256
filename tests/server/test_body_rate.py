"""Bodies that stop progressing are cut: 408, the connection closed (MinBodyRate).

A real server and raw sockets: a client that sends its body a byte a second
(multipart, PUT, tus PATCH, a publish) gets 408 about `body_grace` seconds
in, and its connection is closed; a multipart or PUT upload leaves no file, a
tus upload keeps what arrived and resumes. A fair client a little above the
rate finishes. The grace is short here so that the tests are quick.
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive, Scope, Send

from tests.conftest import QUICK, LiveServer
from tidewire import Settings, Tidewire
from tidewire.server.bodies import MinBodyRate
from tidewire.storage.local import LocalStorage

Serve = Callable[..., LiveServer]

RATE = 1000.0
SETTINGS = Settings(heartbeat=QUICK.heartbeat, min_body_rate=RATE, body_grace=1.0)
LENGTH = 6000


@pytest.fixture
def server(serve: Serve, tmp_path: Path) -> LiveServer:
    return serve(Tidewire(settings=SETTINGS, storage=LocalStorage(tmp_path / "data")))


def send_paced(
    server: LiveServer, head: bytes, first: bytes, step: bytes, every: float, limit: float = 30
) -> tuple[bytes, bool]:
    """Send `head + first`, then `step` every `every` seconds until the server answers.

    Returns what it answered and whether it closed the connection after. The
    pace is kept against the clock (a late send is caught up), so the
    average rate is the one asked for.
    """
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(head + first)
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < limit:
            wait = start + (sent + 1) * every - time.monotonic()
            readable, _, _ = select.select([sock], [], [], max(wait, 0))
            if readable:
                break
            try:
                sock.sendall(step)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
        return read_to_end(sock)
    finally:
        sock.close()


def read_to_end(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything until the server closes (True), or 10 s of silence (False)."""
    sock.settimeout(10)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
            if b"HTTP/1.1 201" in answer or b"HTTP/1.1 204" in answer:
                return answer, False  # an answer to a body that was all sent
    except TimeoutError:
        return answer, False
    except ConnectionResetError:
        pass
    return answer, True


def request(method: str, path: str, length: int, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", f"Content-Length: {length}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def left_on_disk(tmp_path: Path) -> list[Path]:
    data = tmp_path / "data"
    return [p for folder in ("files", "tmp") for p in (data / folder).glob("*")]


def multipart_head(boundary: str = "b0undary") -> tuple[bytes, bytes]:
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    head = request(
        "POST", "/files", LENGTH, f"Content-Type: multipart/form-data; boundary={boundary}"
    )
    return head, part


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url) as client:
        yield client


def assert_cut(answer: bytes, closed: bool) -> None:
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"bytes per second" in answer
    assert closed, "the connection was left open"


def test_a_multipart_upload_at_a_byte_a_second_is_cut_and_leaves_nothing(
    server: LiveServer, http: httpx.Client, tmp_path: Path
) -> None:
    head, part = multipart_head()
    began = time.monotonic()
    answer, closed = send_paced(server, head, part + b"x" * 10, b"x", 1.0)
    assert_cut(answer, closed)
    assert time.monotonic() - began < 10  # at about the grace, not the 30 s the client would go on
    assert http.get("/files").json() == []
    assert left_on_disk(tmp_path) == []


def test_a_put_at_a_byte_a_second_is_cut_and_leaves_nothing(
    server: LiveServer, http: httpx.Client, tmp_path: Path
) -> None:
    answer, closed = send_paced(server, request("PUT", "/files/slow.bin", LENGTH), b"", b"x", 1.0)
    assert_cut(answer, closed)
    assert http.get("/files").json() == []
    assert left_on_disk(tmp_path) == []


def test_a_publish_at_a_byte_a_second_is_cut(server: LiveServer) -> None:
    head = request("POST", "/channels/slow/events", 500, "Content-Type: application/json")
    answer, closed = send_paced(server, head, b'"', b"x", 1.0)
    assert_cut(answer, closed)


def test_a_slow_tus_patch_is_cut_keeps_what_arrived_and_resumes(
    server: LiveServer, http: httpx.Client
) -> None:
    tus = {"Tus-Resumable": "1.0.0"}
    created = http.post("/uploads", headers={**tus, "Upload-Length": str(LENGTH)})
    assert created.status_code == 201
    location = created.headers["location"]
    head = request(
        "PATCH",
        location,
        LENGTH,
        "Tus-Resumable: 1.0.0",
        "Upload-Offset: 0",
        "Content-Type: application/offset+octet-stream",
    )
    answer, closed = send_paced(server, head, b"a" * 500, b"a", 1.0)
    assert_cut(answer, closed)
    offset = int(http.head(location, headers=tus).headers["upload-offset"])
    assert 500 <= offset < LENGTH
    resumed = http.patch(
        location,
        content=b"a" * (LENGTH - offset),
        headers={
            **tus,
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
        },
    )
    assert resumed.status_code == 204
    [file] = http.get("/files").json()
    assert file["size"] == LENGTH


def test_a_fair_sender_just_above_the_rate_finishes(server: LiveServer, http: httpx.Client) -> None:
    # 1.5 times the rate, in steps a tenth of a second apart: about 4 s, well past the grace.
    step = int(RATE * 1.5 / 10)
    head, part = multipart_head()
    tail = b"\r\n--b0undary--\r\n"
    body = part + b"y" * (LENGTH - len(part) - len(tail)) + tail
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(head)
        start = time.monotonic()
        for i, at in enumerate(range(0, LENGTH, step)):
            time.sleep(max(0.0, start + i * 0.1 - time.monotonic()))
            sock.sendall(body[at : at + step])
        answer, _ = read_to_end(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
    assert [f["size"] for f in http.get("/files").json()] == [LENGTH - len(part) - len(tail)]


def run_middleware(pause_in_app: float, pause_in_client: float) -> list[Message]:
    """A body of 4 chunks of 10 bytes through MinBodyRate (1000 B/s after 0.2 s): the app
    pauses before each read, the client before each chunk; what the middleware sends."""
    chunks: list[Message] = [
        {"type": "http.request", "body": b"x" * 10, "more_body": i < 3} for i in range(4)
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        await asyncio.sleep(pause_in_client)
        return chunks.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            async for _ in request.stream():
                await asyncio.sleep(pause_in_app)
        except ClientDisconnect:
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = MinBodyRate(app, rate=1000, grace=0.2)
    asyncio.run(middleware({"type": "http", "method": "PUT", "headers": []}, receive, send))
    return sent


def test_time_the_app_spends_elsewhere_is_not_the_clients() -> None:
    # The app takes 0.3 s per chunk (1.2 s in all, six times the grace): the client is prompt.
    [start, _] = run_middleware(pause_in_app=0.3, pause_in_client=0)
    assert start["status"] == 201


def test_time_the_app_waits_for_the_client_is() -> None:
    [start, body] = run_middleware(pause_in_app=0, pause_in_client=0.3)
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]
    assert b"bytes per second" in body["body"]
