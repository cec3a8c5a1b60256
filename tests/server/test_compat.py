"""The original service's routes (server/compat.py), and its own client run against them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

from tidewire import Settings, Tidewire
from tidewire.server.compat import add_compat_routes
from tidewire.storage import Storage
from tidewire.storage.local import LocalStorage

from ..conftest import QUICK, LiveServer
from ..s3_server import s3_bucket_fixture, s3_server_fixture  # noqa: F401
from .original_client import RequestHandler
from .test_files import STORAGES, make_storage

#: What `/stream` cycles through as its images (the demo gives it PNGs).
FRAMES = [b"frame zero", b"\x00\x01 frame one", b"frame two \xff"]
DATA = os.urandom(300_000)  # a few chunks on every path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_app(storage: Storage, settings: Settings = QUICK) -> Tidewire:
    tw = Tidewire(storage=storage, settings=settings)
    add_compat_routes(tw.router, tw, FRAMES)
    return tw


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[LocalStorage]:
    local = LocalStorage(tmp_path / "data")
    yield local
    asyncio.run(local.aclose())


@pytest.fixture
def server(serve: Callable[..., LiveServer], storage: LocalStorage) -> LiveServer:
    return serve(make_app(storage))


@pytest.fixture
def local_client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


@pytest.fixture(params=STORAGES)
def client(
    request: pytest.FixtureRequest, tmp_path: Path, serve: Callable[..., LiveServer]
) -> Iterator[httpx.Client]:
    """A server over local storage, then over S3."""
    live = serve(make_app(make_storage(request.param, request, tmp_path)))
    with httpx.Client(base_url=live.url, timeout=10) as http:
        yield http


def original_lines(n: int) -> list[str]:
    """What the original `/stream` sends for `n` events, line by line."""
    images = [base64.b64encode(frame).decode() for frame in FRAMES]
    return [
        json.dumps({"text": str(i), "img": images[i % len(images)]}, ensure_ascii=False)
        for i in range(n)
    ]


# -- /stream -------------------------------------------------------------------


def test_original_stream_keeps_its_format(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/stream?n=3&interval=0", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    body = response.content.decode()
    assert body.endswith("\n")
    lines = body.split("\n")[:-1]
    assert len(lines) == 3
    for i, line in enumerate(lines):
        value = json.loads(line)
        assert list(value) == ["text", "img"], "key order of the original"
        assert value["text"] == str(i)
        # Byte-exact: the original wrote json.dumps(..., ensure_ascii=False).
        assert line == json.dumps({"text": str(i), "img": value["img"]}, ensure_ascii=False)
        assert base64.b64decode(value["img"], validate=True) == FRAMES[i % len(FRAMES)]


def test_original_stream_with_n_0_is_empty(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/stream?n=0&interval=0", timeout=5)
    assert response.status_code == 200
    assert response.content == b""


@pytest.mark.parametrize(("query", "field"), [("n=-1", "n"), ("interval=-1", "interval")])
def test_bad_stream_parameters_are_422_naming_the_field(
    server: LiveServer, query: str, field: str
) -> None:
    response = httpx.get(f"{server.url}/stream?{query}", timeout=5)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    assert [d["loc"] for d in detail] == [["query", field]]


@pytest.mark.parametrize(
    "way",
    [
        {"json": {"n": 3, "interval": 0}},
        {"data": {"n": "3", "interval": "0"}},
        {"params": {"n": 3, "interval": 0}},
        {"params": {"n": 3}, "json": {"interval": 0, "unknown": "ignored, as by the original"}},
    ],
)
def test_stream_takes_a_post_as_the_original_client_sends_it(
    local_client: httpx.Client, way: dict[str, Any]
) -> None:
    response = local_client.post("/stream", **way)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text.splitlines() == original_lines(3)


def test_stream_post_errors_say_where(local_client: httpx.Client) -> None:
    bad_body = local_client.post("/stream", json={"n": -1, "interval": 0})
    assert bad_body.status_code == 422
    assert [d["loc"] for d in bad_body.json()["detail"]] == [["body", "n"]]
    bad_query = local_client.post("/stream", params={"interval": "x"})
    assert bad_query.status_code == 422
    assert [d["loc"] for d in bad_query.json()["detail"]] == [["query", "interval"]]
    assert local_client.post("/stream", json=[1]).status_code == 422
    not_json = local_client.post(
        "/stream", content=b"{", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400
    xml = local_client.post("/stream", content=b"<n/>", headers={"content-type": "text/xml"})
    assert xml.status_code == 415 and "JSON or a form" in xml.json()["detail"]


# -- /uploadfile/, /downloadfile/ ----------------------------------------------


def test_original_upload_and_download(client: httpx.Client) -> None:
    uploaded = client.post("/uploadfile/", files={"file": ("haha", DATA)})
    assert uploaded.status_code == 200  # as the original answered
    meta = uploaded.json()
    assert meta["filename"] == "haha" and meta["size"] == len(DATA)
    assert meta["sha256"] == sha(DATA)
    # The original client: requests.post(url + "/downloadfile", params={"filename": ...}),
    # and it reads the body only on a 200.
    response = client.post("/downloadfile", params={"filename": "haha"})
    assert response.status_code == 200
    assert response.content == DATA
    assert response.headers["content-disposition"].startswith("attachment;")


def test_original_download_takes_the_name_from_anywhere(local_client: httpx.Client) -> None:
    old = local_client.post("/uploadfile", files={"file": ("same.txt", b"old")}).json()
    new = local_client.post("/uploadfile/", files={"file": ("same.txt", b"new")}).json()
    assert old["id"] != new["id"]
    ways: list[dict[str, Any]] = [
        {"params": {"filename": "same.txt"}},
        {"data": {"filename": "same.txt"}},
        {"json": {"filename": "same.txt"}},
        {"files": {"filename": (None, "same.txt")}},
    ]
    for way in ways:
        response = local_client.post("/downloadfile/", **way)
        assert response.status_code == 200, way
        assert response.content == b"new", "the newest file of that name"
    by_id = local_client.post("/downloadfile/", json={"filename": old["id"]})
    assert by_id.content == b"old"


def test_original_download_errors(local_client: httpx.Client) -> None:
    missing = local_client.post("/downloadfile/", params={"filename": "nope.txt"})
    assert missing.status_code == 404
    assert "no file named 'nope.txt'" in missing.json()["detail"]
    for way in ({}, {"json": {}}, {"json": {"other": 1}}, {"data": {"x": "y"}}):
        response = local_client.post("/downloadfile/", **way)
        assert response.status_code == 422, way
        assert "filename" in response.json()["detail"]
    assert local_client.post("/downloadfile/", json={"filename": 3}).status_code == 422
    assert local_client.post("/downloadfile/", json=[1]).status_code == 422
    bad_json = local_client.post(
        "/downloadfile/", content=b"{", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400
    huge = local_client.post("/downloadfile/", json={"filename": "x" * (1 << 20)})
    assert huge.status_code == 413


def test_original_upload_takes_one_file(local_client: httpx.Client) -> None:
    response = local_client.post(
        "/uploadfile/", files=[("file", ("a", b"1")), ("file", ("b", b"2"))]
    )
    assert response.status_code == 413
    assert local_client.get("/files").json() == [], "the first one was taken back"
    assert local_client.post("/uploadfile/", data={"x": "y"}).status_code in (415, 422)


def test_original_file_routes_round_trip(server: LiveServer, storage: LocalStorage) -> None:
    data = b"\x00\x01 original bytes " * 1000
    uploaded = httpx.post(f"{server.url}/uploadfile/", files={"file": ("haha", data)}, timeout=10)
    assert uploaded.status_code == 200
    meta = uploaded.json()
    assert meta["filename"] == "haha"
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    # Stored under an id made by the server, never under the client's name.
    assert [p.name for p in (storage.root / "files").iterdir()] == [meta["id"]]
    # The original client's call, verbatim: no trailing slash, the name in params=.
    response = httpx.post(f"{server.url}/downloadfile", params={"filename": "haha"}, timeout=10)
    assert response.status_code == 200
    assert response.content == data


@pytest.mark.parametrize("name", ["/etc/passwd", __file__, "../pyproject.toml", "test.png"])
def test_original_download_never_reads_a_path(
    server: LiveServer, storage: LocalStorage, name: str
) -> None:
    response = httpx.post(f"{server.url}/downloadfile/", json={"filename": name}, timeout=10)
    assert response.status_code == 404
    assert "no file named" in response.json()["detail"]


# -- the original client, unchanged ----------------------------------------------


def test_original_client_works_against_every_original_route(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = RequestHandler()
    # Its stream() helper POSTs (a 405 before), with any of requests' ways to send.
    for way in ({"json": {"n": 4, "interval": 0}}, {"data": {"n": 4, "interval": 0}}):
        handler.stream(f"{server.url}/stream", params={"n": 4}, **way)
        assert capsys.readouterr().out.splitlines() == original_lines(4), way
    # The original server's own route is a GET: read the way requests streams it.
    with requests.get(f"{server.url}/stream", params={"n": 4, "interval": 0}, stream=True) as got:
        assert got.status_code == 200
        assert [line.decode() for line in got.iter_lines()] == original_lines(4)
    # An upload as FastAPI's UploadFile takes it: requests' multipart `files=`.
    with requests.post(
        f"{server.url}/uploadfile/", files={"file": ("haha", DATA)}, timeout=10
    ) as uploaded:
        assert uploaded.status_code == 200
        assert uploaded.json()["filename"] == "haha"
    # The README's own call, verbatim: no trailing slash, the name in params=.
    text = handler.post(f"{server.url}/downloadfile", params={"filename": "haha"})
    raw = requests.post(f"{server.url}/downloadfile", params={"filename": "haha"}, timeout=10)
    assert raw.status_code == 200 and raw.content == DATA
    assert text == raw.text
    assert handler.post(f"{server.url}/downloadfile", params={"filename": "nope"}) == ""
    assert capsys.readouterr().out == "", "no request failed"
