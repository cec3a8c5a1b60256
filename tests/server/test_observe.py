"""The request middleware: request ids, errors counted as 500, access records."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import QUICK, LiveServer
from tests.test_metrics import scrape, value
from tidewire import Tidewire
from tidewire.server.observe import request_id_from

Serve = Callable[..., LiveServer]


def test_a_sane_request_id_is_kept_and_others_are_replaced(serve: Serve) -> None:
    server = serve(Tidewire(settings=QUICK))
    url = f"{server.url}/healthz"
    assert httpx.get(url, headers={"x-request-id": "abc-123_X"}).headers["x-request-id"] == (
        "abc-123_X"
    )
    for bad in ("has space", "x" * 65, "tab\there", ""):
        made = httpx.get(url, headers={"x-request-id": bad}).headers["x-request-id"]
        assert made != bad and 0 < len(made) <= 64, bad
    one, two = (httpx.get(url).headers["x-request-id"] for _ in range(2))
    assert one != two


@pytest.mark.parametrize(
    ("raw", "kept"), [(b"a" * 64, True), (b"a" * 65, False), (b"\x7f", False), (b"\xff", False)]
)
def test_request_ids_are_visible_ascii_up_to_64(raw: bytes, kept: bool) -> None:
    assert (request_id_from([(b"x-request-id", raw)]) == raw.decode("latin-1")) is kept


def test_streams_and_websockets_carry_the_request_id(serve: Serve) -> None:
    tw = Tidewire(settings=QUICK)
    server = serve(tw)
    headers = {"x-request-id": "stream-1"}
    with httpx.stream("GET", f"{server.url}/channels/o1/events", headers=headers) as response:
        assert response.headers["x-request-id"] == "stream-1"
    ws_url = f"{server.ws_url}/channels/o1/ws"
    with connect(ws_url, additional_headers={"x-request-id": "ws-1"}) as ws:
        assert ws.response.headers["x-request-id"] == "ws-1"
    samples = scrape(server.url)
    route = {"route": "/channels/{name}/ws"}
    assert value(samples, "tidewire_http_requests_total", **route, status="101") >= 1


def test_an_unhandled_error_is_counted_and_answered_with_its_id(serve: Serve) -> None:
    tw = Tidewire(settings=QUICK)

    @tw.app.get("/boom/{what}")
    async def boom(what: str) -> Any:
        raise RuntimeError("broken")

    server = serve(tw)
    route = {"route": "/boom/{what}", "status": "500"}
    before = value(scrape(server.url), "tidewire_http_requests_total", **route)
    response = httpx.get(f"{server.url}/boom/x", headers={"x-request-id": "err-1"})
    assert response.status_code == 500 and response.json() == {"detail": "internal server error"}
    assert response.headers["x-request-id"] == "err-1"
    assert value(scrape(server.url), "tidewire_http_requests_total", **route) == before + 1


def test_access_records_say_who_what_and_how_long(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(Tidewire(settings=QUICK))
    with caplog.at_level(logging.INFO, logger="tidewire.access"):
        response = httpx.post(
            f"{server.url}/channels/o2/events?access_token=SECRET1", json=1,
            headers={"x-request-id": "acc-1"},
        )  # fmt: skip
        assert response.status_code == 201
    [record] = [r for r in caplog.records if getattr(r, "access", {}).get("request_id") == "acc-1"]
    access = record.access  # type: ignore[attr-defined]
    assert access["method"] == "POST" and access["status"] == 201
    assert access["route"] == "/channels/{name}/events" and access["path"] == "/channels/o2/events"
    assert access["identity"] == "addr:127.0.0.1" and access["duration_ms"] > 0
    assert "SECRET1" not in record.getMessage()
