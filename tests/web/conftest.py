"""Fixtures for the page's tests: Debian's Chromium driven by Playwright, and the demo app.

One browser for all the page's tests (starting Chromium is the slow part), a
new context (fresh storage, cookies) for each test. Each page records what the
browser's console says; a test fails on any error there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, sync_playwright

from tests.conftest import LiveServer
from tidewire import Settings, Tidewire
from tidewire.demo import demo
from tidewire.storage.local import LocalStorage

# Playwright's own browser builds cannot be downloaded here: Debian's Chromium it is.
CHROMIUM = os.environ.get("TIDEWIRE_CHROMIUM", "/usr/bin/chromium")
# As root in a container Chromium's sandbox cannot start; /dev/shm may be tiny.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]

# Default grace (10 s) so that an attached run outlives a forced disconnect;
# quick heartbeats so that idle streams show life.
SETTINGS = Settings(heartbeat=0.5, close_timeout=2.0)


# Package scope, not session: while Playwright's sync API is started, its event
# loop counts as running in this thread, and asyncio.run() in other tests would fail.
@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium is not installed ({CHROMIUM} is missing): run scripts/services, "
            "which installs Debian's chromium package (or set TIDEWIRE_CHROMIUM)"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def make_app(data_dir: Path) -> Tidewire:
    """The demo's stream on a fresh Tidewire whose files go to `data_dir`."""
    tw = Tidewire(settings=SETTINGS, storage=LocalStorage(data_dir))
    tw.stream(name="demo")(demo)
    return tw


@pytest.fixture
def server(serve: Callable[..., LiveServer], tmp_path: Path) -> LiveServer:
    return serve(make_app(tmp_path / "data"))


class Console:
    """What the browser said on the console, and uncaught page errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        # Messages a test expects, e.g. the browser reporting a connection it saw cut.
        self.allowed: list[str] = []

    def watch(self, page: Page) -> Page:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        return page

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in self.allowed)]


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def context(browser: Browser, console: Console, server: LiveServer) -> Iterator[BrowserContext]:
    # Closed before the server stops, so that no page sees it go and tries again.
    made = browser.new_context(viewport={"width": 1280, "height": 860})
    made.set_default_timeout(15_000)
    made.on("page", console.watch)
    yield made
    made.close()
    assert console.unexpected() == [], "errors on the browser's console"


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def open_page(page: Page, url: str) -> Page:
    """Load the page and wait until its script has set everything up."""
    page.goto(url)
    page.wait_for_selector("html[data-ready]", state="attached")
    page.wait_for_selector("#stream-name option", state="attached")  # the streams are listed
    return page


def js(page: Page, expression: str, arg: Any = None) -> Any:
    return page.evaluate(expression, arg)


# Names the files list must show without pushing anything out of view: long,
# unbroken, wide characters.
LONG_NAMES = [
    "quarterly-report-2025-final-final-v3-with-appendices-and-scanned-signatures.pdf",
    "x" * 200 + ".bin",
    "W" * 60,
    "photo €.jpg",
]


def store_files(server: LiveServer, names: list[str], size: int = 4000) -> None:
    for name in names:
        response = httpx.post(f"{server.url}/files", files={"file": (name, b"x" * size)}, timeout=5)
        assert response.status_code == 201, response.text


def actions_out_of_view(page: Page, names: list[str]) -> list[str]:
    """Each file's Download and Delete that a user could not see or tap without
    scrolling sideways (the page, or a box inside it); [] when all are in view."""
    viewport = page.viewport_size
    assert viewport
    wrong = []
    for name in names:
        for action in (
            page.get_by_role("link", name=f"Download {name}"),
            page.get_by_role("button", name=f"Delete {name}"),
        ):
            # Scrolled to vertically only: sideways, the page must not need it.
            action.evaluate("a => scrollTo(0, a.getBoundingClientRect().top + scrollY - 300)")
            box = action.bounding_box()
            if not (
                box
                and box["x"] >= 0
                and box["x"] + box["width"] <= viewport["width"]
                and box["y"] >= 0
                and box["y"] + box["height"] <= viewport["height"]
                and box["height"] >= 32  # big enough to tap
            ):
                wrong.append(f"{action}: {box}")
    scrolled = page.evaluate(
        """() => [...document.querySelectorAll('#panel-files *')]
            .filter((e) => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX)
                           && e.scrollWidth > e.clientWidth)
            .map((e) => `scrolls sideways: ${e.id || e.className}`)"""
    )
    return wrong + scrolled
