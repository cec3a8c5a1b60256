"""`Tidewire` as an app of its own and as a router inside an existing FastAPI app."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import QUICK
from tidewire import Tidewire


def test_the_router_mounts_into_an_existing_app(serve: Any) -> None:
    tw = Tidewire(settings=QUICK)
    closed = threading.Event()

    @tw.stream
    async def ticks() -> AsyncIterator[int]:
        try:
            while True:
                yield 1
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    app = FastAPI()

    @app.get("/mine")
    async def mine() -> dict[str, str]:
        await tw.publish("news", {"from": "mine"})
        return {"ok": "yes"}

    app.include_router(tw.router, prefix="/live")
    server = serve(app)
    assert httpx.get(f"{server.url}/mine").json() == {"ok": "yes"}
    with httpx.stream("GET", f"{server.url}/live/channels/news/events?after=0") as response:
        assert json.loads(next(response.iter_lines()))["data"] == {"from": "mine"}
    started = httpx.post(f"{server.url}/live/streams/ticks?detach=true").json()
    assert started["events"] == f"/live/runs/{started['run']}/events"
    with httpx.stream("GET", f"{server.url}{started['events']}") as response:
        assert json.loads(next(response.iter_lines()))["data"] == 1
    # The router brings its lifespan: stopping the server cancels running runs.
    server.stop()
    assert closed.wait(5)


def test_errors_are_json_without_a_traceback(serve: Any) -> None:
    tw = Tidewire(settings=QUICK)

    @tw.router.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    server = serve(tw)
    response = httpx.get(f"{server.url}/boom")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert "secret" not in response.text
    health = httpx.get(f"{server.url}/healthz")
    assert health.json() == {"status": "ok", "streams": 0}


def test_every_route_is_on_the_openapi_page(serve: Any) -> None:
    server = serve(Tidewire(settings=QUICK))
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert set(paths["/streams/{name}"]) == {"get", "post"}
    assert set(paths["/runs/{run_id}"]) == {"get", "delete"}
    for path in ("/runs/{run_id}/events", "/channels/{name}/events"):
        get = paths[path]["get"]
        names = {p["name"] for p in get["parameters"]}
        assert {"after", "Last-Event-ID"} <= names
        assert set(get["responses"]["200"]["content"]) == {
            "application/x-ndjson",
            "text/event-stream",  # served with `; charset=utf-8`, a parameter of this type
        }
    assert "post" in paths["/channels/{name}/events"]


def test_a_missing_extra_is_named_with_the_command_that_installs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tidewire.broker import from_url as broker_from_url
    from tidewire.storage import from_url as storage_from_url

    for module in ("tidewire.broker.redis", "tidewire.storage.s3"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    # As if not installed: neither the packages nor any of their modules import.
    for name in ["redis", "aiobotocore", *sys.modules]:
        if name.split(".")[0] in ("redis", "aiobotocore"):
            monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'tidewire\[redis\]'"):
        broker_from_url("redis://127.0.0.1:6379/0")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'tidewire\[s3\]'"):
        storage_from_url("s3://bucket")
