"""What caches may keep, and what is compressed: `Cache-Control` on every kind of
answer, gzip for JSON and text files when asked, never for a stream or a range."""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidewire import Settings, Tidewire
from tidewire.storage.local import LocalStorage

from ..conftest import LiveServer

TEXT = ("tidewire " * 4000).encode()  # 36 kB of very compressible text


@pytest.fixture
def server(serve: Callable[..., LiveServer], tmp_path: Path) -> LiveServer:
    tw = Tidewire(settings=Settings(heartbeat=0.3), storage=LocalStorage(tmp_path / "data"))

    @tw.stream(name="count")
    async def count(n: int = 50) -> Any:
        for i in range(n):
            yield {"i": i, "text": "x" * 100}

    return serve(tw)


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as made:
        yield made


@pytest.fixture
def stored(client: httpx.Client) -> dict[str, Any]:
    response = client.put("/files/notes.txt", content=TEXT, headers={"content-type": "text/plain"})
    assert response.status_code == 201, response.text
    for i in range(30):  # a listing long enough to be worth compressing
        client.put(f"/files/small-{i}.txt", content=b"x").raise_for_status()
    return dict(response.json())


def test_live_and_listing_answers_are_not_stored(
    client: httpx.Client, stored: dict[str, Any]
) -> None:
    run = client.post("/streams/count?detach=true").json()["run"]
    for path in ("/healthz", "/streams", "/files", f"/files/{stored['id']}/meta", f"/runs/{run}"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers.get("cache-control") == "no-store", path


def test_downloads_are_revalidated(client: httpx.Client, stored: dict[str, Any]) -> None:
    response = client.get(f"/files/{stored['id']}")
    assert response.headers.get("cache-control") == "no-cache"
    assert response.headers.get("etag")
    again = client.get(
        f"/files/{stored['id']}", headers={"if-none-match": response.headers["etag"]}
    )
    assert again.status_code == 304


def test_json_and_text_files_are_gzipped_when_asked(
    client: httpx.Client, stored: dict[str, Any]
) -> None:
    listing = client.get("/files", headers={"accept-encoding": "gzip"})
    assert listing.headers.get("content-encoding") == "gzip"
    assert len(listing.json()) == 31
    download = client.get(f"/files/{stored['id']}", headers={"accept-encoding": "gzip"})
    assert download.headers.get("content-encoding") == "gzip"
    assert download.content == TEXT  # httpx decodes it
    # Not asked: as stored.
    plain = client.get(f"/files/{stored['id']}", headers={"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert plain.content == TEXT


def test_ranges_are_never_gzipped(client: httpx.Client, stored: dict[str, Any]) -> None:
    response = client.get(
        f"/files/{stored['id']}", headers={"accept-encoding": "gzip", "range": "bytes=0-9999"}
    )
    assert response.status_code == 206
    assert "content-encoding" not in response.headers
    assert response.content == TEXT[:10000]


@pytest.mark.parametrize("accept", ["application/x-ndjson", "text/event-stream"])
def test_streams_are_never_gzipped(client: httpx.Client, accept: str) -> None:
    headers = {"accept-encoding": "gzip", "accept": accept}
    with client.stream("GET", "/streams/count", headers=headers) as response:
        assert "content-encoding" not in response.headers
        raw = b"".join(response.iter_raw())
    with pytest.raises(gzip.BadGzipFile):
        gzip.decompress(raw)
    assert raw.count(b'"i":') == 50
