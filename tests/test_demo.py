"""The built-in demo: the `demo` stream and the original service's routes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import LiveServer
from tests.wire import read_ndjson, read_sse, read_ws
from tidewire.demo import png, tw
from tidewire.storage.local import LocalStorage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer(tw.app).start()
    yield live
    live.stop()


def check_png(raw: bytes) -> tuple[int, int]:
    """Check a PNG's structure (signature, chunk CRCs, IHDR first, IEND last); its size."""
    assert raw.startswith(PNG_SIGNATURE)
    pos, kinds = len(PNG_SIGNATURE), []
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos : pos + 4])
        kind = raw[pos + 4 : pos + 8]
        body = raw[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", raw[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        kinds.append(kind)
        pos += 12 + length
    assert pos == len(raw)
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height = struct.unpack(">II", raw[16:24])
    return width, height


def test_png_encoder_makes_a_valid_image() -> None:
    # 2 x 3 RGB pixels: a row is 6 bytes.
    rows = [
        bytes([y * 40, x * 80, 7]) + bytes([y * 40, (x + 1) * 80, 9])
        for x, y in [(0, 0), (1, 1), (2, 2)]
    ]
    raw = png(2, 3, rows)
    assert check_png(raw) == (2, 3)
    # The pixel data decompresses to the rows, each behind its filter byte.
    idat_at = raw.index(b"IDAT")
    (length,) = struct.unpack(">I", raw[idat_at - 4 : idat_at])
    assert zlib.decompress(raw[idat_at + 4 : idat_at + 4 + length]) == b"".join(
        b"\x00" + row for row in rows
    )


def test_streams_lists_demo_with_a_schema(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/streams", timeout=5)
    assert response.status_code == 200
    [demo] = [s for s in response.json() if s["name"] == "demo"]
    assert demo["description"]
    params = demo["params"]
    assert params["type"] == "object"
    n, interval = params["properties"]["n"], params["properties"]["interval"]
    assert n["type"] == "integer" and n["minimum"] == 0
    assert isinstance(n["default"], int)
    assert interval["type"] == "number" and interval["minimum"] == 0
    assert "n" not in params.get("required", []), "n has a default"


def check_demo_events(events: list[dict[str, Any]], n: int) -> None:
    assert [e["event"] for e in events] == ["message"] * n + ["end"]
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(set(ids)), "ids strictly increase"
    for i, event in enumerate(events[:-1]):
        data = event["data"]
        assert set(data) == {"text", "img"}
        assert data["text"] == str(i)
        tagged = data["img"]["$blob"]
        assert tagged["type"] == "image/png"
        raw = base64.b64decode(tagged["data"], validate=True)
        assert tagged["size"] == len(raw)
        assert check_png(raw)[0] > 0


def test_demo_stream_on_ndjson(server: LiveServer) -> None:
    events = read_ndjson(f"{server.url}/streams/demo?n=5&interval=0")
    check_demo_events(events, 5)


def test_demo_stream_same_on_every_transport(server: LiveServer) -> None:
    url = "/streams/demo?n=3&interval=0"
    ndjson = read_ndjson(server.url + url)
    sse = read_sse(server.url + url)
    ws = read_ws(server.ws_url + "/streams/demo/ws?n=3&interval=0")
    for events in (ndjson, sse, ws):
        check_demo_events(events, 3)
    # Different runs, so the same content (ids are per run).
    strip = [[(e["event"], e["data"]) for e in run] for run in (ndjson, sse, ws)]
    assert strip[0] == strip[1] == strip[2]


def test_demo_images_change_from_event_to_event(server: LiveServer) -> None:
    events = read_ndjson(f"{server.url}/streams/demo?n=3&interval=0")
    images = [e["data"]["img"]["$blob"]["data"] for e in events[:-1]]
    assert len(set(images)) == 3


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
        assert check_png(base64.b64decode(value["img"], validate=True))[0] > 0


def test_original_stream_and_demo_stream_send_the_same_images(server: LiveServer) -> None:
    original = httpx.get(f"{server.url}/stream?n=3&interval=0", timeout=10).text.splitlines()
    demo = read_ndjson(f"{server.url}/streams/demo?n=3&interval=0")
    assert [json.loads(line)["img"] for line in original] == [
        e["data"]["img"]["$blob"]["data"] for e in demo[:-1]
    ]


def test_original_stream_with_n_0_is_empty(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/stream?n=0&interval=0", timeout=5)
    assert response.status_code == 200
    assert response.content == b""


def test_healthz(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/healthz", timeout=5)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


@pytest.mark.parametrize("path", ["/streams/demo", "/stream"])
@pytest.mark.parametrize(("query", "field"), [("n=-1", "n"), ("interval=-1", "interval")])
def test_bad_parameters_are_422_naming_the_field(
    server: LiveServer, path: str, query: str, field: str
) -> None:
    response = httpx.get(f"{server.url}{path}?{query}", timeout=5)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    assert [d["loc"] for d in detail] == [["query", field]]


def test_bad_parameter_over_websocket_is_refused(server: LiveServer) -> None:
    with pytest.raises(InvalidStatus) as denied:
        connect(f"{server.ws_url}/streams/demo/ws?n=-1", open_timeout=5)
    assert denied.value.response.status_code == 422
    assert json.loads(denied.value.response.body)["detail"][0]["loc"] == ["query", "n"]


@pytest.fixture(scope="module")
def demo_storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStorage]:
    """The demo's storage, in a temporary folder rather than ./data."""
    storage = LocalStorage(tmp_path_factory.mktemp("demo") / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(tw.__dict__, "storage", storage)  # what the cached property holds
        yield storage
    asyncio.run(storage.aclose())


def test_original_file_routes_round_trip(server: LiveServer, demo_storage: LocalStorage) -> None:
    data = b"\x00\x01 original bytes " * 1000
    uploaded = httpx.post(f"{server.url}/uploadfile/", files={"file": ("haha", data)}, timeout=10)
    assert uploaded.status_code == 200
    meta = uploaded.json()
    assert meta["filename"] == "haha"
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    # Stored under an id made by the server, never under the client's name.
    assert [p.name for p in (demo_storage.root / "files").iterdir()] == [meta["id"]]
    # The original client's call, verbatim: no trailing slash, the name in params=.
    response = httpx.post(f"{server.url}/downloadfile", params={"filename": "haha"}, timeout=10)
    assert response.status_code == 200
    assert response.content == data


@pytest.mark.parametrize("name", ["/etc/passwd", __file__, "../pyproject.toml", "test.png"])
def test_original_download_never_reads_a_path(
    server: LiveServer, demo_storage: LocalStorage, name: str
) -> None:
    response = httpx.post(f"{server.url}/downloadfile/", json={"filename": name}, timeout=10)
    assert response.status_code == 404
    assert "no file named" in response.json()["detail"]
