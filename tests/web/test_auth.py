"""The page and tidewire.js against a real server with access control on.

The server is the demo with `auth_secret`: it verifies every token and
checks every permission. A `Witness` in front of it (tests/client/witness.py)
only records where each request carried its token and what the server
answered. Playwright's request events show the same from the browser's side.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, Request

from tests.client.witness import SECRET, Seen, Witness, mint
from tests.conftest import LiveServer
from tests.web.conftest import SETTINGS, Console, js, open_page
from tests.web.test_streams import TRANSPORTS, check_sequence, shown, start
from tidewire import Tidewire
from tidewire.demo import demo
from tidewire.storage.local import LocalStorage

FILE_ID = "0c9f4m2k1v8r3n5p7q6s4t"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
#: Served without a token: the page and its scripts.
OPEN = ("/", "/favicon.ico")


@pytest.fixture
def gate(serve: Callable[..., LiveServer], tmp_path: Path) -> tuple[LiveServer, Witness]:
    tw = Tidewire(
        settings=dataclasses.replace(SETTINGS, auth_secret=SECRET),
        storage=LocalStorage(tmp_path / "data"),
    )
    tw.stream(name="demo")(demo)
    witness = Witness(tw.app)
    return serve(witness), witness


@pytest.fixture
def server(gate: tuple[LiveServer, Witness]) -> LiveServer:
    return gate[0]


def api_calls(seen: list[Seen]) -> list[Seen]:
    """The API requests among what the server saw (not the page and its scripts)."""
    return [s for s in seen if s.path not in OPEN and not s.path.startswith("/web/")]


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
    page: Page, gate: tuple[LiveServer, Witness]
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
    seen = api_calls(g.seen)
    assert seen and not g.refused(), g.refused()
    assert {s.token for s in seen} == {token}
    # Where headers can be set, the header; where they cannot, the query.
    by_query = {(s.kind, s.path.split("/")[-1]) for s in seen if s.query}
    assert ("websocket", "ws") in by_query and ("http", "events") in by_query
    for s in seen:
        assert (s.header is None) == (s.query is not None), s
    methods = {(s.method, s.path.split("/")[1]) for s in seen if s.header}
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
    page: Page, gate: tuple[LiveServer, Witness]
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
    assert api_calls(g.seen) and {s.token for s in api_calls(g.seen)} == {second}
    assert not g.refused()


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


def test_without_a_token_the_page_says_so_and_the_field_makes_it_work(
    page: Page, gate: tuple[LiveServer, Witness], console: Console, tmp_path: Path
) -> None:
    server, g = gate
    console.allowed.append("status of 401")  # the browser reports the refused requests
    page.goto(server.url + "/")
    page.wait_for_selector("html[data-ready]", state="attached")
    error = page.locator("#stream-error")
    error.wait_for()
    said = error.text_content() or ""
    assert "401" in said and "needs a token" in said, said
    assert g.refused() and {s.status for s in g.refused()} == {401}

    page.locator("#access summary").click()
    page.get_by_label("Access token").fill(mint(sub="page"))
    page.get_by_role("button", name="Use").click()
    open_page(page, server.url + "/")
    assert page.locator("#stream-error").is_hidden()
    g.seen.clear()

    # Streams, on every transport.
    for transport in TRANSPORTS:
        start(page, transport, n=2, interval=0.01)
        page.wait_for_selector('#events li[data-event="end"]')
        check_sequence(shown(page), 2)

    # Channels: subscribe and publish from the page, on every transport.
    page.get_by_role("tab", name="Channels").click()
    for transport in TRANSPORTS:
        page.get_by_label("Channel", exact=True).fill(f"room-{transport}")
        page.get_by_label("Transport", exact=True).select_option(transport)
        page.click("#subscribe")  # "Subscribe", then "Switch"
        page.wait_for_function("() => document.querySelector('#ch-state').dataset.state === 'open'")
        page.get_by_label("Message", exact=True).fill(f"hello over {transport}")
        page.get_by_role("button", name="Publish").click()
        page.wait_for_selector(f'#messages li[data-event] >> text="hello over {transport}"')

    # Files: upload, then download through the page's link.
    page.get_by_role("tab", name="Files").click()
    src = tmp_path / "notes.txt"
    src.write_bytes(b"the notes, kept behind a token")
    page.set_input_files("#file-input", [src])
    page.wait_for_selector('.upload[data-name="notes.txt"][data-state="done"]')
    file_id = page.get_attribute('.upload[data-name="notes.txt"]', "data-file-id")
    row = page.locator(f'#files-body tr[data-id="{file_id}"]')
    with page.expect_download() as download:
        row.get_by_role("link", name="Download notes.txt").click()
    assert Path(download.value.path()).read_bytes() == src.read_bytes()

    assert not g.refused(), g.refused()
    assert {s.kind for s in api_calls(g.seen)} == {"http", "websocket"}


def test_an_img_loads_a_file_by_its_access_token_url(
    page: Page, gate: tuple[LiveServer, Witness], console: Console
) -> None:
    """`fileUrl` and `blobUrl` put the token in the URL: an <img> sends no header."""
    server, g = gate
    console.allowed.append("status of 401")  # the <img> without a token, below
    token = mint(sub="page")
    stored = httpx.put(
        f"{server.url}/files/dot.png",
        content=PNG,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"},
    )
    assert stored.status_code == 201, stored.text
    file_id = stored.json()["id"]
    open_page(page, f"{server.url}/?token={token}")
    loaded = js(
        page,
        """async (fileId) => {
            const tw = await import('./web/tidewire.js');
            const load = (src) => new Promise((resolve) => {
                const img = new Image();
                img.onload = () => resolve({ src, width: img.naturalWidth });
                img.onerror = () => resolve({ src, width: -1 });
                img.src = src;
            });
            const blob = { $blob: { type: 'image/png', url: `/files/${fileId}` } };
            return [
                await load(tw.fileUrl(fileId)),
                await load(tw.blobUrl(blob)),
                await load(tw.blobUrl(blob, { token: null })),
            ];
        }""",
        file_id,
    )
    with_file_url, with_blob_url, without = loaded
    assert with_file_url["width"] == 1 and f"access_token={token}" in with_file_url["src"]
    assert with_blob_url["width"] == 1 and f"access_token={token}" in with_blob_url["src"]
    assert without["width"] == -1 and "access_token" not in without["src"]
    images = [s for s in g.seen if s.path == f"/files/{file_id}"]
    # The same URL twice: the browser may take the second from its cache.
    assert {(s.status, s.query) for s in images} == {(200, token), (401, None)}
