"""Chromium's own EventSource against the server, cut through a proxy: the scenarios
of tests/eventsource.py (which Node's `eventsource` runs in tests/server)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page

from tests import eventsource as es
from tests.conftest import LiveServer
from tests.proxy import Proxy
from tests.web.conftest import Console

RECORD = """([url, types]) => {
  window.__seen = [];
  const seen = window.__seen;
  const source = new EventSource(url);
  window.__source = source;
  source.addEventListener('open', () => seen.push({type: 'open', readyState: source.readyState}));
  for (const type of new Set(['message', ...types])) {
    source.addEventListener(type, (event) => {
      if (type === 'error' && event.data === undefined) return;
      seen.push({type, id: event.lastEventId, data: event.data});
    });
  }
  source.addEventListener('error', (event) => {
    if (event.data === undefined) seen.push({type: 'error', readyState: source.readyState});
  });
}"""

# The shared fixtures (tests/eventsource.py), by name, as pytest finds them.
started, app, server = es.started, es.app, es.server


class ChromiumEventSource:
    """`new EventSource(url)` in a page of the URL's own origin (no CORS involved)."""

    def __init__(self, page: Page, url: str) -> None:
        self.page = page
        origin = urlsplit(url)
        page.goto(f"{origin.scheme}://{origin.netloc}/healthz")
        page.evaluate(RECORD, [url, es.TYPES])

    def seen(self) -> list[dict[str, Any]]:
        return json.loads(self.page.evaluate("JSON.stringify(window.__seen)"))

    def close(self) -> None:
        self.page.evaluate("window.__source.close()")


@pytest.fixture
def open_source(page: Page, console: Console) -> Callable[[str], ChromiumEventSource]:
    # Chromium reports the cut connection, and the favicon /healthz does not have.
    console.allowed += ["ERR_INCOMPLETE_CHUNKED_ENCODING", "404 (Not Found)"]
    return lambda url: ChromiumEventSource(page, url)


def test_live_channel_dropped_before_its_first_event_misses_nothing(
    open_source: es.Open, server: LiveServer, app: es.Counting, proxy: type[Proxy]
) -> None:
    es.live_channel_drop_before_first_event(server, app, proxy(server.port), open_source)


def test_eventsource_stops_after_a_run_ends(
    open_source: es.Open, server: LiveServer, app: es.Counting, proxy: type[Proxy]
) -> None:
    es.finished_run_stops(server, app, proxy(server.port), open_source)


def test_eventsource_on_a_stream_resumes_its_run(
    open_source: es.Open,
    server: LiveServer,
    app: es.Counting,
    proxy: type[Proxy],
    started: list[str],
) -> None:
    es.stream_resumes_same_run(server, app, proxy(server.port), open_source, started)
