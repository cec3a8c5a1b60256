"""`GET /files?name=`: the newest file of exactly that name, for clients that know files by name."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tidewire import Tidewire
from tidewire.storage import from_url
from tidewire.storage.local import LocalStorage

from ..conftest import QUICK, LiveServer
from ..s3_server import s3_bucket_fixture, s3_server_fixture  # noqa: F401


@pytest.fixture(params=["local", "s3"])
def client(
    request: pytest.FixtureRequest, serve: Callable[..., LiveServer], tmp_path: Path
) -> Iterator[httpx.Client]:
    if request.param == "local":
        storage: Any = LocalStorage(tmp_path / "data")
    else:
        s3 = request.getfixturevalue("s3_server")
        storage = from_url(s3.url(request.getfixturevalue("s3_bucket")))
    live = serve(Tidewire(settings=QUICK, storage=storage))
    with httpx.Client(base_url=live.url, timeout=10) as http:
        yield http


def put(client: httpx.Client, name: str, data: bytes) -> dict[str, Any]:
    response = client.put(f"/files/{quote(name, safe='')}", content=data)
    assert response.status_code == 201, response.text
    meta: dict[str, Any] = response.json()
    return meta


def named(client: httpx.Client, name: str) -> list[dict[str, Any]]:
    response = client.get("/files", params={"name": name})
    assert response.status_code == 200, response.text
    files: list[dict[str, Any]] = response.json()
    return files


def test_the_newest_file_of_exactly_that_name(client: httpx.Client) -> None:
    put(client, "report.txt", b"first")
    put(client, "other.txt", b"other")
    newest = put(client, "report.txt", b"second")
    put(client, "report.txt.bak", b"not this one")
    put(client, "Report.txt", b"nor this one")

    assert named(client, "report.txt") == [newest]
    assert named(client, "REPORT.TXT") == []  # exact: not by case
    assert named(client, "report") == []  # nor by prefix
    assert named(client, "nothing.txt") == []
    # Without ?name= the listing is as it was.
    assert len(client.get("/files").json()) == 5


def test_any_label_is_looked_up_safely(client: httpx.Client) -> None:
    for name in ("../../etc/passwd", "ünïcødé ✓.txt", "%2e%2e", "a'; DROP TABLE files; --"):
        meta = put(client, name, name.encode())
        assert meta["name"] == name
        assert named(client, name) == [meta]


def test_bad_requests(client: httpx.Client) -> None:
    put(client, "x", b"x")
    response = client.get("/files", params={"name": "x", "cursor": "0" * 22})
    assert response.status_code == 400 and "cursor" in response.json()["detail"]
    for bad in ("", "n" * 256):
        response = client.get("/files", params={"name": bad})
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["query", "name"]
