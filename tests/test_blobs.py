"""Blobs over the inline limit travel as files: stored once, fetched by URL."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import QUICK, LiveServer
from tests.wire import read_ndjson, read_sse
from tidewire import Blob, Message, Settings, Tidewire
from tidewire.events import LargeBlob, dump_data, large_blobs
from tidewire.storage.local import LocalStorage

BIG = os.urandom(300 << 10)  # over the default limit of 256 KiB
SMALL = b"\x89PNG small"


def test_dump_data_refuses_a_large_blob_until_told_where_it_is() -> None:
    blob = Blob(BIG, "image/png")
    data = {"img": blob, "more": [SMALL]}
    assert dump_data(data).startswith(b'{"img":{"$blob":{"type":"image/png","size":307200,"data":')
    with pytest.raises(LargeBlob):
        dump_data(data, inline_limit=1000)
    assert large_blobs(data, 1000) == [blob]
    encoded = dump_data(data, inline_limit=1000, urls={id(blob): "/files/abc"})
    assert encoded.startswith(
        b'{"img":{"$blob":{"type":"image/png","size":307200,"url":"/files/abc"}},"more":[{"$blob"'
    )


def make(tmp_path: Path, settings: Settings = QUICK) -> Tidewire:
    tw = Tidewire(storage=LocalStorage(tmp_path), settings=settings)

    @tw.stream
    async def pictures() -> AsyncIterator[object]:
        yield {"big": Blob(BIG, "image/png"), "small": Blob(SMALL, "image/png")}
        yield Message(BIG, event="raw")

    @tw.stream
    def sync_pictures() -> Iterator[object]:
        yield {"big": Blob(BIG, "image/jpeg")}

    return tw


def fetch(server: LiveServer, blob: dict[str, object]) -> httpx.Response:
    assert set(blob) == {"type", "size", "url"}
    return httpx.get(f"{server.url}{blob['url']}")


def test_a_large_blob_in_a_run_is_stored_and_sent_as_a_url(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    server = serve(make(tmp_path))
    events = read_ndjson(f"{server.url}/streams/pictures")
    first, raw = events[0]["data"], events[1]["data"]
    assert first["small"]["$blob"]["data"]  # small ones stay inline
    big = first["big"]["$blob"]
    assert big["type"] == "image/png" and big["size"] == len(BIG)
    response = fetch(server, big)
    assert response.content == BIG
    assert response.headers["content-type"] == "image/png"
    assert fetch(server, raw["$blob"]).content == BIG
    assert events[1]["event"] == "raw"
    # Watchers on another transport get the same URL: stored once.
    run_id = httpx.post(f"{server.url}/streams/pictures?detach=true").json()["run"]
    again = read_sse(f"{server.url}/runs/{run_id}/events")
    assert again[0]["data"]["big"]["$blob"]["url"] != big["url"]  # a new run, a new file
    watched = read_sse(f"{server.url}/runs/{run_id}/events")
    assert watched[0]["data"]["big"]["$blob"]["url"] == again[0]["data"]["big"]["$blob"]["url"]
    for event in read_ndjson(f"{server.url}/streams/sync_pictures")[:1]:
        assert fetch(server, event["data"]["big"]["$blob"]).content == BIG


def test_a_large_file_published_to_a_channel_is_sent_as_a_url(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    server = serve(make(tmp_path))
    published = httpx.post(
        f"{server.url}/channels/photos/events",
        files={"photo": ("p.png", BIG, "image/png")},
        data={"caption": "hi"},
    )
    assert published.status_code == 201
    [event] = read_ndjson(f"{server.url}/channels/photos/events?after=0", limit=1)
    assert event["data"]["caption"] == "hi"
    assert fetch(server, event["data"]["photo"]["$blob"]).content == BIG


def test_without_a_limit_every_blob_is_inline(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    settings = Settings(heartbeat=QUICK.heartbeat, inline_blob_limit=None)
    server = serve(make(tmp_path, settings))
    [first, *_] = read_ndjson(f"{server.url}/streams/pictures")
    assert len(first["data"]["big"]["$blob"]["data"]) > len(BIG)
    assert httpx.get(f"{server.url}/files").json() == []
