"""The page resumes on the `unavailable` notice, at once, on another server.

Two servers share one Redis behind a balancer that polls `/readyz`. The page
starts the demo on the first, which then drains: every transport must resume
on the second and show every event once. Both servers ask EventSource to wait
30 s before it reconnects (`retry:`): only resuming on the notice itself can
make the SSE case finish in time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page

from tests.balancer import Balancer
from tests.conftest import LiveServer
from tests.redis_server import RedisServer
from tests.web.conftest import SETTINGS, Console, open_page
from tests.web.test_streams import TRANSPORTS, shown, start, wait_events
from tidewire import Tidewire
from tidewire.broker.redis import RedisBroker
from tidewire.demo import demo
from tidewire.storage.local import LocalStorage


def drainable(redis: RedisServer, prefix: str, data: Path) -> Tidewire:
    settings = dataclasses.replace(SETTINGS, sse_retry_ms=30_000)
    tw = Tidewire(
        broker=RedisBroker(redis.url, prefix=prefix), storage=LocalStorage(data), settings=settings
    )
    tw.stream(name="demo")(demo)
    tasks: list[asyncio.Task[None]] = []

    @tw.app.post("/test/drain")
    async def drain() -> None:
        tasks.append(asyncio.get_running_loop().create_task(tw.drain()))

    return tw


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_page_resumes_on_the_notice_on_another_server(
    page: Page,
    serve: Callable[..., LiveServer],
    start_redis: Callable[..., RedisServer],
    balancer: type[Balancer],
    console: Console,
    tmp_path: Path,
    transport: str,
) -> None:
    # A resume that reaches the draining server before the balancer knows
    # gets a 503, which the browser reports.
    console.allowed += ["503", "net::ERR_", "WebSocket connection to"]
    redis = start_redis(aof=False)
    prefix = f"web-{time.time_ns()}:"
    a = serve(drainable(redis, prefix, tmp_path / "data"))
    b = serve(drainable(redis, prefix, tmp_path / "data"))
    front = balancer([a.url, b.url])
    front.wait_ready()
    front.pin(a.url)
    open_page(page, front.url + "/")
    n = 60
    start(page, transport, n=n, interval=0.05)
    wait_events(page, 8)
    front.pin(None)
    httpx.post(f"{a.url}/test/drain", timeout=10).raise_for_status()

    page.wait_for_selector('#events li[data-event="end"]', timeout=20_000)
    events: list[dict[str, Any]] = shown(page)
    assert [e["event"] for e in events] == ["message"] * n + ["end"]
    assert [e["text"] for e in events[:-1]] == [str(i) for i in range(n)]
    assert len({e["id"] for e in events}) == n + 1  # none twice
    assert int(page.text_content("#st-reconnects") or 0) >= 1
    assert front.sent[b.url] >= 1  # it went on from the other server
