"""SSE as clients nobody here wrote see it: Node's `eventsource` (a WHATWG EventSource)
through a proxy that cuts connections, and httpx-sse reading the blocks.

The same scenarios run in Chromium in tests/web/test_eventsource.py.
"""

from __future__ import annotations

import httpx
from httpx_sse import connect_sse

from tests import eventsource as es
from tests.conftest import LiveServer
from tests.proxy import Proxy
from tests.wire import nth

# The shared fixtures (tests/eventsource.py), by name, as pytest finds them.
started, app, server = es.started, es.app, es.server


def test_live_channel_dropped_before_its_first_event_misses_nothing(
    server: LiveServer, app: es.Counting, proxy: type[Proxy]
) -> None:
    es.live_channel_drop_before_first_event(server, app, proxy(server.port), es.NodeEventSource)


def test_eventsource_stops_after_a_run_ends(
    server: LiveServer, app: es.Counting, proxy: type[Proxy]
) -> None:
    es.finished_run_stops(server, app, proxy(server.port), es.NodeEventSource)


def test_eventsource_on_a_stream_resumes_its_run(
    server: LiveServer, app: es.Counting, proxy: type[Proxy], started: list[str]
) -> None:
    es.stream_resumes_same_run(server, app, proxy(server.port), es.NodeEventSource, started)


def test_stream_dropped_before_its_first_event_resumes_its_run(
    server: LiveServer, app: es.Counting, proxy: type[Proxy], started: list[str]
) -> None:
    es.run_dropped_before_first_event(server, app, proxy(server.port), es.NodeEventSource, started)


def test_httpx_sse_sees_no_empty_event_before_a_runs_events(server: LiveServer) -> None:
    """`retry:` travels with the first real block, not in one of its own (which
    httpx-sse hands over as an event with no data)."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        # Detached and finished first: the first block is an event, not a position.
        run = client.post("/streams/short?detach=true").json()["run"]
        with connect_sse(client, "GET", f"/runs/{run}/events") as source:
            got = [(e.event, e.data, e.retry) for e in source.iter_sse()]
    assert [kind for kind, _, _ in got] == ["message", "message", "message", "end"], got
    assert got[0][2] == es.RETRY_MS, "the first block carries retry:"


def test_httpx_sse_live_subscription_starts_with_its_position(server: LiveServer) -> None:
    """Nothing to send yet: the first block is `retry:` with `id:` of where the
    subscription starts, so a client that loses the connection resumes from it."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        old = client.post("/channels/news/events", json="old").json()["id"]
        with connect_sse(client, "GET", "/channels/news/events") as source:
            first = next(source.iter_sse())
    assert (first.event, first.data, first.retry) == ("position", "", es.RETRY_MS)
    assert first.id == old  # after the one event already there


def test_from_a_finished_runs_end_is_204_on_ndjson_and_sse(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        run = client.post("/streams/short?detach=true").json()["run"]
        lines = client.get(f"/runs/{run}/events").text.splitlines()
        end = [line for line in lines if '"end"' in line][-1]
        last = httpx.Response(200, content=end).json()["id"]
        for accept in ("application/x-ndjson", "text/event-stream"):
            response = client.get(
                f"/runs/{run}/events", headers={"accept": accept, "last-event-id": last}
            )
            assert response.status_code == 204, (accept, response.text)
            response = client.get(f"/runs/{run}/events", params={"after": last})
            assert response.status_code == 204


def test_a_reconnect_to_a_stream_never_starts_a_run(server: LiveServer, started: list[str]) -> None:
    """Last-Event-ID on /streams/{name}: the run it names is gone, so 204, not a new run."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        response = client.get("/streams/short", headers={"last-event-id": "0123456789abcdef.3"})
        assert response.status_code == 204
        assert started == []


def test_a_position_ahead_of_the_log_is_reported(server: LiveServer) -> None:
    """A Last-Event-ID the log has not reached (made up, say) is not
    taken silently: a `gap` says so (on every transport), and a header."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        head = client.post("/channels/news/events", json="first").json()["id"]
        ahead = nth(head, 999)
        with client.stream("GET", "/channels/news/events", params={"after": ahead}) as response:
            assert ahead in response.headers.get("tidewire-warning", "")
            line = next(line for line in response.iter_lines() if line.strip())
        first = httpx.Response(200, content=line).json()
        assert first["event"] == "gap"
        assert first["data"]["ahead"] == ahead
        assert first["id"] == head  # where it reads on from: the log's newest event
        with connect_sse(
            client, "GET", "/channels/news/events", headers={"last-event-id": ahead}
        ) as source:
            event = next(source.iter_sse())
        assert (event.event, event.id) == ("gap", head)
