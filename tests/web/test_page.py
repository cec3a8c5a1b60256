"""The page as a whole: how it is served, keyboard use, labels, a phone-sized screen."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page

from tests.conftest import LiveServer
from tests.web.conftest import LONG_NAMES, Console, actions_out_of_view, open_page, store_files
from tests.wire import nth

PANELS = ["Streams", "Channels", "Files"]


def test_the_page_and_its_files_are_served(server: LiveServer) -> None:
    page = httpx.get(f"{server.url}/", timeout=5)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="web/app.js">' in page.text
    for path in ("app.js", "tidewire.js", "vendor/axios-1.21.1/axios.min.js"):
        script = httpx.get(f"{server.url}/web/{path}", timeout=5)
        assert script.status_code == 200, path
        assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    style = httpx.get(f"{server.url}/web/style.css", timeout=5)
    assert style.headers["content-type"] == "text/css; charset=utf-8"
    # Our own files are revalidated; the vendored ones are named by version, cached for good.
    assert style.headers["cache-control"] == "no-cache"
    vendored = httpx.get(f"{server.url}/web/vendor/tus-js-client-4.3.1/tus.min.js", timeout=5)
    assert "immutable" in vendored.headers["cache-control"]
    again = httpx.get(
        f"{server.url}/web/style.css", headers={"if-none-match": style.headers["etag"]}, timeout=5
    )
    assert again.status_code == 304
    # Licences ship with the libraries.
    for package in ("axios-1.21.1", "tus-js-client-4.3.1"):
        licence = httpx.get(f"{server.url}/web/vendor/{package}/LICENSE", timeout=5)
        assert licence.status_code == 200 and "Permission is hereby granted" in licence.text


@pytest.mark.parametrize(
    "path", ["/web/nothing.js", "/web/../app.py", "/web/%2e%2e/app.py", "/web/.hidden", "/web/"]
)
def test_nothing_else_is_served(server: LiveServer, path: str) -> None:
    response = httpx.get(f"{server.url}{path}", timeout=5)
    assert response.status_code == 404
    assert "detail" in response.json()


def test_tabs_work_from_the_keyboard(page: Page, server: LiveServer) -> None:
    open_page(page, server.url + "/")
    streams = page.get_by_role("tab", name="Streams")
    streams.focus()
    page.keyboard.press("ArrowRight")
    channels = page.get_by_role("tab", name="Channels")
    assert channels.get_attribute("aria-selected") == "true"
    assert page.evaluate("() => document.activeElement.id") == "tab-channels"
    assert page.is_visible("#panel-channels") and page.is_hidden("#panel-streams")
    page.keyboard.press("End")
    assert page.evaluate("() => document.activeElement.id") == "tab-files"
    page.keyboard.press("ArrowRight")  # wraps around
    assert streams.get_attribute("aria-selected") == "true"
    # Only the selected tab is in the tab order; Tab moves into the panel.
    assert [page.get_attribute(f"#tab-{p.lower()}", "tabindex") for p in PANELS] == [
        "0",
        "-1",
        "-1",
    ]
    # A run started with the keyboard alone.
    page.focus("#start")
    page.keyboard.press("Enter")
    page.wait_for_selector('#events li[data-event="message"]')
    page.keyboard.press("Tab")  # Start is disabled while running: focus moves to Stop
    assert page.evaluate("() => document.activeElement.id") == "stop"
    page.keyboard.press("Enter")
    page.wait_for_selector('#events li[data-event="cancelled"]')


def test_every_control_has_a_label(page: Page, server: LiveServer) -> None:
    open_page(page, server.url + "/")
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button, a[href]')]
            .filter((el) => {
                const name = el.getAttribute('aria-label')
                    || [...(el.labels || [])].map((l) => l.textContent).join('')
                    || (el.tagName === 'BUTTON' || el.tagName === 'A' ? el.textContent : '');
                return !name.trim();
            })
            .map((el) => el.outerHTML.slice(0, 80))"""
    )
    assert unlabelled == []


@pytest.mark.parametrize("panel", PANELS)
def test_usable_at_375_px(page: Page, server: LiveServer, panel: str) -> None:
    if panel == "Files":
        store_files(server, LONG_NAMES)
    page.set_viewport_size({"width": 375, "height": 740})
    open_page(page, server.url + "/")
    page.get_by_role("tab", name=panel).click()
    if panel == "Streams":
        page.get_by_label("N", exact=True).fill("12")
        page.get_by_role("button", name="Start").click()
        page.wait_for_selector('#events li[data-event="end"]', timeout=20_000)
    if panel == "Files":
        page.wait_for_function(
            f"() => document.querySelectorAll('#files-body tr').length == {len(LONG_NAMES)}"
        )
    # Nothing sticks out sideways: no horizontal scrolling of the page.
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    for tab in PANELS:
        box = page.get_by_role("tab", name=tab).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375
        assert box["height"] >= 32  # big enough to tap
    if panel == "Files":
        # Every file's Download and Delete in view, without scrolling sideways.
        assert actions_out_of_view(page, LONG_NAMES) == []
        # The last one can be deleted.
        page.get_by_role("button", name=f"Delete {LONG_NAMES[-1]}").click()
        page.wait_for_function(
            f"() => document.querySelectorAll('#files-body tr').length == {len(LONG_NAMES) - 1}"
        )


def snippets(doc: str = "docs/browser.md", after: str = "") -> list[str]:
    """The ```html examples of a doc (those after the heading `after`), as written there."""
    text = (Path(__file__).parents[2] / doc).read_text()
    if after:
        text = text.split(after, 1)[1]
    return re.findall(r"```html\n(.*?)```", text, re.S)


def until(page: Page, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition on what Playwright reports (its events arrive while it waits)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        page.wait_for_timeout(20)


def test_the_docs_snippets_work_as_written(
    page: Page, server: LiveServer, console: Console
) -> None:
    console.allowed.append("status of 404")  # /favicon.ico of /healthz
    receive, axios_alone = snippets()
    assert len(receive.strip().splitlines()) <= 12
    logs: list[str] = []
    page.on("console", lambda m: logs.append(m.text) if m.type == "log" else None)
    page.goto(server.url + "/healthz")  # any page of the server's origin
    page.set_content(receive)
    page.wait_for_function("() => document.querySelectorAll('#out img').length == 20")
    assert page.eval_on_selector_all("#out img", "is => is.map(i => i.complete)") == [True] * 20
    assert page.text_content("#out") == "".join(str(i) for i in range(20))
    until(page, lambda: any(line.endswith("ended with end") for line in logs))

    logs.clear()
    page.set_content(axios_alone)
    until(page, lambda: len(logs) >= 7)
    assert logs[0].startswith("run ")
    run = logs[0].split()[1]
    # A run's event ids name the run: `<run id>.<log id>` (docs/http.md).
    first = logs[1].split()[0]  # the epoch of the in-memory log is the server's
    expected = [f"{nth(first, i)} message {i - 1}" for i in range(1, 6)]
    expected.append(f"{nth(first, 6)} end undefined")
    assert logs[1:] == expected and first.startswith(f"{run}.")


def test_the_readme_snippet_works_as_written(page: Page, server: LiveServer) -> None:
    snippet = snippets("README.md", after="## Receive it in a browser")[0]
    assert len(snippet.strip().splitlines()) <= 12
    # Served from the server's origin without its page's CSP, as a user's own page would be.
    url = f"{server.url}/readme.html"
    page.route(url, lambda route: route.fulfill(content_type="text/html", body=snippet))
    with page.expect_console_message(lambda m: m.text.startswith("run ")) as said:
        page.goto(url)
    assert re.fullmatch(r"run \S+ ended with end", said.value.text)
    images = page.locator("#out img")
    assert images.count() == 5
    for i in range(5):
        assert images.nth(i).evaluate("img => img.decode().then(() => img.naturalWidth)") > 0
    texts = page.locator("#out").evaluate(
        "out => [...out.childNodes].filter(n => n.nodeType === Node.TEXT_NODE).map(n => n.data)"
    )
    assert texts == ["0", "1", "2", "3", "4"]
