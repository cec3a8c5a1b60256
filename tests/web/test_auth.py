"""The page and tidewire.js with a token: sent on every transport, from `?token=` or the field.

The server is the demo behind `TokenGate` (tests/client/auth_gate.py), a
stand-in for the server's own checks: every request without a good token is
refused (401), and the gate records where each one carried it. Playwright's
request events show the same from the browser's side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, Request

from tests.client.auth_gate import TokenGate, mint
from tests.conftest import LiveServer
from tests.web.conftest import js, make_app, open_page
from tests.web.test_streams import TRANSPORTS, check_sequence, shown, start

FILE_ID = "0c9f4m2k1v8r3n5p7q6s4t"


@pytest.fixture
def gate(serve: Callable[..., LiveServer], tmp_path: Path) -> tuple[LiveServer, TokenGate]:
    g = TokenGate(make_app(tmp_path / "data").app)
    return serve(g), g


@pytest.fixture
def server(gate: tuple[LiveServer, TokenGate]) -> LiveServer:
    return gate[0]


def record(page: Page) -> list[dict[str, Any]]:
    """The requests the page makes: type, URL, and the Authorization header."""
    seen: list[dict[str, Any]] = []

    def on_request(request: Request) -> None:
        seen.append(
            {
                "type": request.resource_type,
                "url": request.url,
                "authorization": request.all_headers().get("authorization"),
            }
        )

    page.on("request", on_request)
    page.on("websocket", lambda ws: seen.append({"type": "websocket", "url": ws.url}))
    return seen


def test_the_page_sends_the_token_on_every_transport(
    page: Page, gate: tuple[LiveServer, TokenGate]
) -> None:
    server, g = gate
    token = mint(sub="page")
    requests = record(page)
    open_page(page, f"{server.url}/?token={token}")
    # Taken from the address and removed from it; kept for this tab.
    assert "token" not in page.url
    assert js(page, "() => sessionStorage.getItem('tidewire.token')") == token
    for transport in TRANSPORTS:
        page.get_by_role("tab", name="Streams").click()
        start(page, transport, n=2, interval=0.01)
        page.wait_for_selector('#events li[data-event="end"]')
        check_sequence(shown(page), 2)
    # Channels, publishing and files, through tidewire.js as the page set it up.
    result = js(
        page,
        """async (fileId) => {
            const tw = await import('./web/tidewire.js');
            const got = {};
            for (const transport of ['sse', 'ws', 'ndjson']) {
                let sub;
                const arrived = new Promise((resolve) => {
                    const onEvent = (e) => e.data?.via === transport && resolve(true);
                    sub = tw.subscribe('room', { transport, after: '0', onEvent });
                });
                await tw.publish('room', { via: transport });
                got[transport] = await arrived;
                sub.close();
            }
            const small = new File(['small file'], 'small.txt', { type: 'text/plain' });
            const multipart = await tw.upload(small, { resumable: false }).done;
            const big = new File([new Uint8Array(300000)], 'big.bin');
            const tus = await tw.upload(big, { resumable: true, chunkSize: 100000 }).done;
            const listed = (await tw.listFiles()).files.map((f) => f.id);
            const bytes = await (await fetch(tw.fileUrl(multipart.id))).text();
            const img = tw.blobUrl({ $blob: { type: 'image/png', url: `/files/${fileId}` } });
            await tw.deleteFile(multipart.id);
            return { got, listed, ids: [multipart.id, tus.id], bytes, img, size: tus.size };
        }""",
        FILE_ID,
    )
    assert result["got"] == {"sse": True, "ws": True, "ndjson": True}
    assert set(result["ids"]) <= set(result["listed"]) and result["size"] == 300_000
    assert result["bytes"] == "small file"
    assert result["img"].endswith(f"/files/{FILE_ID}?access_token={token}")

    # The server's side: everything carried this token, nothing was refused.
    assert g.seen and {s.status for s in g.seen} == {0}, [s for s in g.seen if s.status]
    assert {s.token for s in g.seen} == {token}
    # Where headers can be set, the header; where they cannot, the query.
    by_query = {(s.kind, s.path.split("/")[-1]) for s in g.seen if s.query}
    assert ("websocket", "ws") in by_query and ("http", "events") in by_query
    for s in g.seen:
        assert (s.header is None) == (s.query is not None), s
    methods = {(s.method, s.path.split("/")[1]) for s in g.seen if s.header}
    assert methods >= {
        ("GET", "streams"),
        ("POST", "streams"),
        ("POST", "channels"),
        ("POST", "files"),
        ("POST", "uploads"),
        ("PATCH", "uploads"),
        ("GET", "files"),
        ("DELETE", "files"),
    }
    # The browser's side: the EventSource and the WebSockets put it in the URL.
    assert any(r["type"] == "eventsource" and f"access_token={token}" in r["url"] for r in requests)
    sockets = [r for r in requests if r["type"] == "websocket"]
    assert sockets and all(f"access_token={token}" in r["url"] for r in sockets)
    api = [r for r in requests if r["type"] in ("fetch", "xhr")]
    assert api and all(
        r["authorization"] == f"Bearer {token}" or "access_token=" in r["url"] for r in api
    )


def test_the_token_field_sets_the_token_for_this_tab(
    page: Page, gate: tuple[LiveServer, TokenGate]
) -> None:
    server, g = gate
    first, second = mint(jti="1"), mint(jti="2")
    open_page(page, f"{server.url}/?token={first}")
    page.locator("#access summary").click()
    assert page.get_by_label("Access token").input_value() == first
    page.get_by_label("Access token").fill(second)
    page.get_by_role("button", name="Use").click()
    page.wait_for_function("t => sessionStorage.getItem('tidewire.token') === t", arg=second)
    page.wait_for_selector("html[data-ready]", state="attached")
    page.wait_for_selector("#stream-name option", state="attached")
    g.seen.clear()
    start(page, "ws", n=1, interval=0)
    page.wait_for_selector('#events li[data-event="end"]')
    assert g.seen and {s.token for s in g.seen} == {second}


def test_a_blob_pointing_elsewhere_is_refused(page: Page, server: LiveServer) -> None:
    open_page(page, f"{server.url}/?token={mint()}")
    refused = js(
        page,
        """async (fileId) => {
            const tw = await import('./web/tidewire.js');
            const out = [];
            const urls = [`http://evil.example/files/${fileId}`, `//evil.example/files/${fileId}`,
                          '/streams/demo', `/files/${fileId}/../../streams`];
            for (const url of urls) {
                try {
                    tw.blobUrl({ $blob: { type: 'image/png', url } });
                    out.push(`followed ${url}`);
                } catch (e) {
                    out.push(e.message.includes('not a file of this server'));
                }
            }
            return out;
        }""",
        FILE_ID,
    )
    assert refused == [True, True, True, True]
