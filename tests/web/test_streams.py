"""The streams panel: every transport shows the demo's events and images, stop, resume."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from playwright.sync_api import Page

from tests.conftest import LiveServer, wait_for
from tests.proxy import Proxy
from tests.web.conftest import Console, open_page
from tests.wire import seq

TRANSPORTS = ["ndjson", "sse", "ws"]


def start(page: Page, transport: str, n: int, interval: float) -> None:
    page.select_option("#stream-name", "demo")
    page.get_by_label("N", exact=True).fill(str(n))
    page.get_by_label("Interval").fill(str(interval))
    page.click(f"label[for=t-{transport}]")
    page.get_by_role("button", name="Start").click()


def shown(page: Page) -> list[dict[str, Any]]:
    """The events the page lists: id, type, and the demo's text."""
    return page.eval_on_selector_all(
        "#events li[data-event]",
        """rows => rows.map(row => ({
            id: row.dataset.id,
            event: row.dataset.event,
            text: row.querySelector('[data-key=text] .value')?.textContent ?? null,
        }))""",
    )


def wait_events(page: Page, count: int) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('#events li[data-event]').length >= n", arg=count
    )


def check_sequence(events: list[dict[str, Any]], n: int) -> None:
    """Events 1..n then end: every one once, in order, nothing missing."""
    assert [e["event"] for e in events] == ["message"] * n + ["end"]
    assert len({e["id"].rpartition(".")[0] for e in events}) == 1, "one run"
    assert [seq(e["id"]) for e in events] == list(range(1, n + 2))
    assert [e["text"] for e in events[:-1]] == [str(i) for i in range(n)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_each_transport_shows_the_demos_events_and_images(
    page: Page, server: LiveServer, transport: str
) -> None:
    open_page(page, server.url + "/")
    start(page, transport, n=6, interval=0.01)
    page.wait_for_selector('#events li[data-event="end"]')
    check_sequence(shown(page), 6)
    # Every image was decoded by the browser: the demo's frames are 32 x 32 PNGs.
    widths = page.eval_on_selector_all(
        "#events li img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : -1)"
    )
    assert widths == [32] * 6
    assert page.eval_on_selector("#now-img", "i => i.naturalWidth") == 32
    assert page.text_content("#now-text") == "5"
    assert page.text_content("#st-state") == "ended: end"
    assert page.text_content("#st-events") == "7"
    assert page.is_enabled("#start") and page.is_disabled("#stop")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stop_cancels_the_run_on_the_server(page: Page, server: LiveServer, transport: str) -> None:
    open_page(page, server.url + "/")
    start(page, transport, n=100_000, interval=0.02)
    wait_events(page, 3)
    run = page.text_content("#st-run")
    assert run and run != "—"
    assert httpx.get(f"{server.url}/runs/{run}", timeout=5).json()["state"] == "running"
    page.get_by_role("button", name="Stop").click()
    page.wait_for_selector('#events li[data-event="cancelled"]')
    record = httpx.get(f"{server.url}/runs/{run}", timeout=5).json()
    assert record["state"] == "cancelled"
    assert record["ended"] is not None
    assert page.text_content("#st-state") == "ended: cancelled"
    events = shown(page)
    assert events[-1]["event"] == "cancelled"
    ids = [seq(e["id"]) for e in events]
    assert ids == list(range(1, len(ids) + 1))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_dropped_connection_resumes_with_nothing_lost_or_repeated(
    page: Page, server: LiveServer, proxy: type[Proxy], console: Console, transport: str
) -> None:
    # The browser reports the connections it saw cut; that is the point here.
    console.allowed += ["net::ERR_", "WebSocket connection to"]
    p = proxy(server.port)
    open_page(page, p.url + "/")
    n = 40
    start(page, transport, n=n, interval=0.04)
    wait_events(page, 8)
    p.cut()
    page.wait_for_selector('#events li[data-event="end"]', timeout=20_000)
    check_sequence(shown(page), n)
    # The user sees that it happened, and from where it went on.
    assert int(page.text_content("#st-reconnects") or 0) >= 1
    markers = page.eval_on_selector_all("#events li.marker", "ms => ms.map(m => m.textContent)")
    assert any(m.startswith("Reconnected (1): resumed after #") for m in markers), markers
    assert p.connections >= 2  # it really connected again
    widths = page.eval_on_selector_all("#events li img", "imgs => imgs.map(i => i.naturalWidth)")
    assert widths == [32] * n


def test_a_bad_parameter_is_refused_with_a_message_naming_it(
    page: Page, server: LiveServer, console: Console
) -> None:
    console.allowed.append("status of 422")  # the browser logs every 4xx response
    open_page(page, server.url + "/")
    alert = page.locator("#stream-error")
    # The form checks what the schema says (minimum 0) before anything is sent …
    start(page, "ndjson", n=-1, interval=0)
    alert.wait_for()
    assert (alert.text_content() or "").startswith("n: ")
    assert page.text_content("#st-state") == "idle"
    # … and shows the server's own 422 for what only the server refuses.
    page.get_by_label("N", exact=True).evaluate("i => i.removeAttribute('min')")
    page.get_by_role("button", name="Start").click()
    page.wait_for_function("() => document.querySelector('#st-state').dataset.state === 'failed'")
    assert (alert.text_content() or "").startswith("start demo: 422")  # as docs/browser.md says
    assert "n: " in (alert.text_content() or "")
    assert page.is_enabled("#start")


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_leaving_the_page_cancels_the_detached_run_it_started(
    page: Page, server: LiveServer, transport: str
) -> None:
    open_page(page, server.url + "/")
    start(page, transport, n=100_000, interval=0.02)
    wait_events(page, 2)
    run = page.text_content("#st-run")
    page.goto("about:blank")  # pagehide: the page sends DELETE /runs/{id} with keepalive

    def state() -> str:
        return str(httpx.get(f"{server.url}/runs/{run}", timeout=5).json()["state"])

    wait_for(lambda: state() == "cancelled", message=f"run {run} is still {state()}")
