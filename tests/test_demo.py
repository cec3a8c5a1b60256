"""The built-in demo: the `demo` stream, and the original `/stream` showing its frames."""

from __future__ import annotations

import base64
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
from tests.wire import read_ndjson, read_sse, read_ws, seq
from tidewire.demo import png, tw

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
    # `<run id>.<epoch>-<n>` on the memory broker: one run, numbers that increase.
    runs = {e["id"].partition(".")[0] for e in events}
    ids = [seq(e["id"]) for e in events]
    assert len(runs) == 1
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


def test_original_stream_and_demo_stream_send_the_same_images(server: LiveServer) -> None:
    original = httpx.get(f"{server.url}/stream?n=3&interval=0", timeout=10).text.splitlines()
    demo = read_ndjson(f"{server.url}/streams/demo?n=3&interval=0")
    assert [json.loads(line)["img"] for line in original] == [
        e["data"]["img"]["$blob"]["data"] for e in demo[:-1]
    ]


def test_healthz(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/healthz", timeout=5)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


@pytest.mark.parametrize("path", ["/streams/demo"])
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
