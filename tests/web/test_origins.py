"""Origins in a real browser: a page on another port, allowed or not.

The page is served by a second server; `http://127.0.0.1:<its port>` is
allowed, `http://localhost:<its port>` (the same page, another origin) is not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tests.conftest import LiveServer
from tidewire import Settings, Tidewire
from tidewire.storage.local import LocalStorage


async def blank(_: Any) -> HTMLResponse:
    return HTMLResponse("<!doctype html><title>another site</title>")


@pytest.fixture
def sites(serve: Callable[..., LiveServer], tmp_path: Path) -> tuple[LiveServer, LiveServer]:
    """(the page's server, tidewire allowing the page's 127.0.0.1 origin)."""
    pages = serve(Starlette(routes=[Route("/", blank)]))
    settings = Settings(allow_origins=(pages.url,))
    return pages, serve(Tidewire(settings=settings, storage=LocalStorage(tmp_path)))


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(15_000)
    yield context.new_page()
    context.close()


# fetch() from the page: the status and body, or the error the browser gave.
FETCH = """async ([url, init]) => {
    try {
        const response = await fetch(url, init);
        return {status: response.status, body: await response.text(),
                run: response.headers.get('Tidewire-Run')};
    } catch (e) { return {error: String(e)}; }
}"""

# A WebSocket from the page: "open" (and what a published message brought), or "refused".
SOCKET = """(url) => new Promise((resolve) => {
    const ws = new WebSocket(url);
    ws.onopen = () => { resolve('open'); ws.close(); };
    ws.onerror = () => resolve('refused');
})"""


def published(server: LiveServer, channel: str) -> list[Any]:
    """What the channel holds: read from the start until it idles."""
    seen: list[Any] = []
    try:
        with httpx.stream(
            "GET", f"{server.url}/channels/{channel}/events?after=0", timeout=0.5
        ) as response:
            seen.extend(json.loads(line)["data"] for line in response.iter_lines() if line)
    except httpx.ReadTimeout:
        pass
    return seen


def test_an_allowed_origin_may_use_the_server(
    page: Page, sites: tuple[LiveServer, LiveServer]
) -> None:
    pages, tw = sites
    page.goto(pages.url)
    # application/json: the browser asks first (a preflight), then sends.
    init = {
        "method": "POST",
        "headers": {"content-type": "application/json"},
        "body": '{"hello": 1}',
        "credentials": "include",
    }
    result = page.evaluate(FETCH, [f"{tw.url}/channels/room/events", init])
    assert result.get("status") == 201, result
    listed = page.evaluate(FETCH, [f"{tw.url}/streams", {}])
    assert listed.get("status") == 200, listed
    assert page.evaluate(SOCKET, f"{tw.ws_url}/channels/room/ws") == "open"
    assert published(tw, "room") == [{"hello": 1}]


def test_a_foreign_origin_can_neither_change_nor_read(
    page: Page, sites: tuple[LiveServer, LiveServer]
) -> None:
    pages, tw = sites
    page.goto(pages.url.replace("127.0.0.1", "localhost"))
    # The preflight is refused: the POST is never sent.
    init = {"method": "POST", "headers": {"content-type": "application/json"}, "body": "1"}
    result = page.evaluate(FETCH, [f"{tw.url}/channels/room/events", init])
    assert "error" in result, result
    # text/plain needs no preflight: the browser sends it; the server refuses it.
    init = {"method": "POST", "headers": {"content-type": "text/plain"}, "body": "2"}
    result = page.evaluate(FETCH, [f"{tw.url}/channels/room/events", init])
    assert "error" in result, result
    # So does an HTML form, which no CORS rule stops.
    page.set_content(
        f"""<form method=post action="{tw.url}/channels/room/events" enctype=text/plain>
            <input name='{{"x":' value='3}}'></form>"""
    )
    with page.expect_navigation():
        page.evaluate("document.forms[0].submit()")
    assert "not allowed" in (page.text_content("body") or "")
    page.goto(pages.url.replace("127.0.0.1", "localhost"))
    # Reads: answered, but not to this page.
    assert "error" in page.evaluate(FETCH, [f"{tw.url}/streams", {}])
    assert page.evaluate(SOCKET, f"{tw.ws_url}/channels/room/ws") == "refused"
    assert published(tw, "room") == []
