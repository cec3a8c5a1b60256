"""Streams and runs over a real server: transports, resume, cancel, errors, backpressure."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gc
import json
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.conftest import QUICK, LiveServer, wait_for
from tests.wire import log_id, read_ndjson, read_sse, read_ws
from tidewire import Blob, Message, Settings, Tidewire
from tidewire.broker import Broker
from tidewire.events import decode_blobs


class Probe:
    """What the test generators report about themselves."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.started = threading.Event()


def make(settings: Settings = QUICK, broker: Broker | None = None) -> tuple[Tidewire, Probe]:
    tw = Tidewire(settings=settings, broker=broker)
    probe = Probe()

    @tw.stream
    async def count(n: int = 5, interval: float = 0.0) -> AsyncIterator[dict[str, int]]:
        """Count from 0."""
        for i in range(n):
            if interval:
                await asyncio.sleep(interval)
            yield {"i": i}

    @tw.stream
    async def padded(n: int = 5, pad: int = 1000) -> AsyncIterator[dict[str, Any]]:
        for i in range(n):
            yield {"i": i, "pad": "x" * pad}

    @tw.stream
    def count_sync(n: int = 5, interval: float = 0.0) -> Iterator[dict[str, int]]:
        for i in range(n):
            if interval:
                time.sleep(interval)
            yield {"i": i}

    @tw.stream
    async def forever() -> AsyncIterator[int]:
        probe.started.set()
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.01)
        finally:
            probe.closed.set()

    @tw.stream
    def forever_sync() -> Iterator[int]:
        probe.started.set()
        try:
            i = 0
            while True:
                yield i
                i += 1
                time.sleep(0.01)
        finally:
            probe.closed.set()

    @tw.stream
    async def fails(upto: int = 2) -> AsyncIterator[int]:
        for i in range(upto):
            yield i
        raise ValueError("boom")

    @tw.stream
    def fails_sync(upto: int = 2) -> Iterator[int]:
        yield from range(upto)
        raise KeyError("missing")

    @tw.stream
    async def mixed() -> AsyncIterator[Any]:
        yield b"\x00\xffraw"
        yield Blob(b"\x89PNG fake", "image/png")
        yield Message({"done": 50}, event="progress")
        yield {"nested": [b"\x01\x02"]}

    @tw.stream
    async def echo(data: Any = None) -> AsyncIterator[Any]:
        yield data

    @tw.stream
    async def too_deep(depth: int = 300) -> AsyncIterator[Any]:
        yield "before"
        yield nested(depth)

    @tw.stream
    def too_deep_sync(depth: int = 300) -> Iterator[Any]:
        yield "before"
        yield nested(depth)

    @tw.stream
    async def idle() -> AsyncIterator[int]:
        await asyncio.sleep(3600)
        yield 0

    @tw.stream
    def rendezvous(parties: int = 100) -> Iterator[str]:
        # Every run waits here until `parties` runs are in this line at once:
        # impossible if sync generators shared a pool of fewer threads.
        barrier = probe.__dict__.setdefault("barrier", threading.Barrier(parties, timeout=20))
        barrier.wait()
        yield "met"

    return tw, probe


def event_id(tw: Tidewire, run: str, n: int) -> str:
    """The id of the `n`-th event of `run` (`<run id>.<the log's id>`)."""
    return f"{run}.{log_id(tw.broker, n)}"


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def read_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def detach(server: LiveServer, stream: str, **params: Any) -> str:
    response = httpx.post(f"{server.url}/streams/{stream}?detach=true", json=params)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["events"] == f"/runs/{body['run']}/events"
    assert body["ws"] == f"/runs/{body['run']}/ws"
    return str(body["run"])


def finished(server: LiveServer, run: str) -> dict[str, Any]:
    def done() -> bool:
        return httpx.get(f"{server.url}/runs/{run}").json()["state"] != "running"

    wait_for(done, 10, "the run did not end")
    info: dict[str, Any] = httpx.get(f"{server.url}/runs/{run}").json()
    return info


def read(server: LiveServer, transport: str, path: str, **kw: Any) -> list[dict[str, Any]]:
    if transport == "ndjson":
        return read_ndjson(server.url + path, **kw)
    if transport == "sse":
        return read_sse(server.url + path, **kw)
    return read_ws(server.ws_url + path.replace("/events", "/ws"), **kw)


TRANSPORTS = ["ndjson", "sse", "ws"]


def test_the_three_transports_give_identical_events(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw)
    run = detach(server, "mixed")
    seen = {t: read(server, t, f"/runs/{run}/events") for t in TRANSPORTS}
    assert seen["ndjson"] == seen["sse"] == seen["ws"]
    events = seen["ndjson"]
    # A run's event ids name the run: `<run id>.<the log's id>`.
    assert [e["id"] for e in events] == [event_id(tw, run, i) for i in range(1, 6)]
    assert [e["event"] for e in events] == ["message", "message", "progress", "message", "end"]
    data = [decode_blobs(e["data"]) for e in events]
    assert data[0] == b"\x00\xffraw"
    assert data[1] == b"\x89PNG fake" and data[1].type == "image/png"
    assert data[2] == {"done": 50}
    assert data[3] == {"nested": [b"\x01\x02"]}
    assert events[0]["data"]["$blob"] == {
        "type": "application/octet-stream",
        "size": 5,
        "data": base64.b64encode(b"\x00\xffraw").decode(),
    }


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_starting_a_run_on_each_transport(serve: Any, transport: str) -> None:
    tw, _ = make()
    server = serve(tw)
    if transport == "ws":
        events = read_ws(f"{server.ws_url}/streams/count/ws?n=3")
    elif transport == "sse":
        events = read_sse(f"{server.url}/streams/count?n=3")
    else:
        events = read_ndjson(f"{server.url}/streams/count?n=3")
    run = events[0]["id"].partition(".")[0]
    assert events == [
        {"id": event_id(tw, run, 1), "event": "message", "data": {"i": 0}},
        {"id": event_id(tw, run, 2), "event": "message", "data": {"i": 1}},
        {"id": event_id(tw, run, 3), "event": "message", "data": {"i": 2}},
        {"id": event_id(tw, run, 4), "event": "end", "data": None},
    ]


def test_parameters_come_from_query_form_or_json(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw)
    url = f"{server.url}/streams/count"
    by_query = httpx.post(url, params={"n": "2"})
    by_form = httpx.post(url, data={"n": "2"})
    by_json = httpx.post(url, json={"n": 2})
    for response in (by_query, by_form, by_json):
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.text.splitlines() if line]
        assert [e["data"] for e in lines] == [{"i": 0}, {"i": 1}, None]


def test_headers_of_a_stream(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw)
    for accept, kind in [
        ("*/*", "application/x-ndjson"),
        ("text/event-stream", "text/event-stream"),
    ]:
        response = httpx.get(f"{server.url}/streams/count", headers={"accept": accept})
        assert response.headers["content-type"].startswith(kind)
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert "content-length" not in response.headers
        run = response.headers["tidewire-run"]
        assert httpx.get(f"{server.url}/runs/{run}").json()["stream"] == "count"


def test_unknown_stream_is_404_and_bad_parameter_is_422(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw)
    missing = httpx.get(f"{server.url}/streams/nope")
    assert missing.status_code == 404
    assert "nope" in missing.json()["detail"]
    bad = httpx.get(f"{server.url}/streams/count", params={"n": "many"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["query", "n"]
    bad_body = httpx.post(f"{server.url}/streams/count", json={"interval": "soon"})
    assert bad_body.status_code == 422
    assert bad_body.json()["detail"][0]["loc"] == ["body", "interval"]
    assert httpx.post(f"{server.url}/streams/count", json=[1]).status_code == 422
    not_json = httpx.post(
        f"{server.url}/streams/count", content=b"{", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400
    other = httpx.post(
        f"{server.url}/streams/count", content=b"x", headers={"content-type": "text/csv"}
    )
    assert other.status_code == 415
    assert httpx.get(f"{server.url}/runs/nope").status_code == 404
    # A WebSocket handshake is refused with the same status and JSON.
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{server.ws_url}/streams/nope/ws")
    assert refused.value.response.status_code == 404
    assert b"nope" in refused.value.response.body
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{server.ws_url}/streams/count/ws?n=x")
    assert refused.value.response.status_code == 422
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{server.ws_url}/runs/nope/ws")
    assert refused.value.response.status_code == 404


def test_list_streams_gives_json_schemas(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw)
    streams = {s["name"]: s for s in httpx.get(f"{server.url}/streams").json()}
    count = streams["count"]
    assert count["description"] == "Count from 0."
    assert count["params"]["properties"]["n"] == {"default": 5, "title": "N", "type": "integer"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_resume_from_the_middle(serve: Any, transport: str) -> None:
    tw, _ = make()
    server = serve(tw)
    run = detach(server, "count", n=20)
    finished(server, run)
    events = read(server, transport, f"/runs/{run}/events?after={log_id(tw.broker, 10)}")
    assert [e["id"] for e in events] == [event_id(tw, run, i) for i in range(11, 22)]
    assert events[0]["data"] == {"i": 10}
    assert events[-1]["event"] == "end"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_last_event_id_wins_over_after(serve: Any, transport: str) -> None:
    tw, _ = make()
    server = serve(tw)
    run = detach(server, "count", n=10)
    finished(server, run)
    after, last_id = log_id(tw.broker, 2), log_id(tw.broker, 8)
    events = read(
        server, transport, f"/runs/{run}/events?after={after}", headers={"last-event-id": last_id}
    )
    assert [e["id"] for e in events] == [event_id(tw, run, i) for i in (9, 10, 11)]
    # Alone, it resumes too (a WebSocket client reconnecting sends it as a header),
    # given as the event's id or as the log's id in it.
    for last in (event_id(tw, run, 9), log_id(tw.broker, 9)):
        alone = read(server, transport, f"/runs/{run}/events", headers={"last-event-id": last})
        assert [e["id"] for e in alone] == [event_id(tw, run, 10), event_id(tw, run, 11)]


def test_resume_while_running_loses_and_repeats_nothing(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw)
    run = detach(server, "count", n=200, interval=0.002)
    first = read_ndjson(f"{server.url}/runs/{run}/events", limit=37)
    rest = read_ndjson(
        f"{server.url}/runs/{run}/events", headers={"last-event-id": first[-1]["id"]}
    )
    data = [e["data"] for e in first + rest]
    assert data[:-1] == [{"i": i} for i in range(200)]


def test_a_head_of_a_running_runs_events_answers_its_headers_and_ends(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw)
    run = detach(server, "count", n=100_000, interval=0.05)
    with httpx.Client(base_url=server.url, timeout=5) as http:
        got = http.head(f"/runs/{run}/events", headers={"accept": "text/event-stream"})
        assert got.status_code == 200 and got.content == b""
        assert got.headers["content-type"].startswith("text/event-stream")
        # The same connection answers the next request (it hung, followed for ever).
        assert http.get(f"/runs/{run}").json()["state"] == "running"
        http.delete(f"/runs/{run}").raise_for_status()


def test_bad_position_is_400(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw)
    run = detach(server, "count")
    response = httpx.get(f"{server.url}/runs/{run}/events?after=abc")
    assert response.status_code == 400
    assert "abc" in response.json()["detail"]
    finished(server, run)
    # What int() would read as 2 is no id either: the same 400 on every transport.
    for bad in ["+2", " 2", "2_0", "\u0662", "\uff12", "0x2"]:
        for accept in ("application/x-ndjson", "text/event-stream"):
            response = httpx.get(
                f"{server.url}/runs/{run}/events",
                params={"after": bad},
                headers={"accept": accept},
                timeout=5,
            )
            assert response.status_code == 400, (bad, accept, response.text)
            assert repr(bad) in response.json()["detail"], bad
        with pytest.raises(InvalidStatus) as denied:
            connect(f"{server.ws_url}/runs/{run}/ws?after={quote(bad)}", open_timeout=5)
        assert denied.value.response.status_code == 400, bad
    for bad in ["+2", "2_0", "0x2"]:  # in the header too (HTTP trims the spaces of " 2")
        response = httpx.get(f"{server.url}/runs/{run}/events", headers={"last-event-id": bad})
        assert response.status_code == 400, bad
        with pytest.raises(InvalidStatus) as denied:
            connect(
                f"{server.ws_url}/runs/{run}/ws",
                additional_headers={"last-event-id": bad},
                open_timeout=5,
            )
        assert denied.value.response.status_code == 400, bad


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_late_watcher_of_a_trimmed_run_gets_a_gap(
    serve: Any, broker: Broker, transport: str
) -> None:
    # Nobody watches while it runs, so nothing holds the generator back and
    # the log keeps only the newest `run_history` events.
    settings = dataclasses.replace(QUICK, run_window=4, run_history=8)
    tw, _ = make(settings, broker)
    server = serve(tw)
    run = detach(server, "count", n=50)
    finished(server, run)
    events = read(server, transport, f"/runs/{run}/events")
    gap, retained = events[0], events[1:]
    assert gap["event"] == "gap"
    assert gap["data"] == {"missed": 51 - 8}
    assert [e["data"] for e in retained] == [{"i": i} for i in range(43, 50)] + [None]
    assert retained[-1]["event"] == "end"
    assert [seq(e["id"]) for e in retained] == list(range(44, 52))
    assert seq(gap["id"]) == 43
    # Resuming from the gap's id (as a reconnecting client would) loses nothing more.
    again = read(server, transport, f"/runs/{run}/events", headers={"last-event-id": gap["id"]})
    assert again == retained


def seq(id: str) -> int:
    """The count of a run's event id, from either broker ("<run>.7" or
    "<run>.1700000000000-7")."""
    return int(id.rpartition(".")[2].rpartition("-")[2])


def test_a_finished_run_is_forgotten_after_run_ttl(serve: Any) -> None:
    tw, _ = make(dataclasses.replace(QUICK, run_ttl=1.0))
    server = serve(tw)
    run = detach(server, "count", n=3)
    assert finished(server, run)["state"] == "finished"  # watchable once it ended

    def gone() -> bool:
        return httpx.get(f"{server.url}/runs/{run}").status_code == 404

    wait_for(gone, 10, "a finished run must be forgotten run_ttl after it ended")
    assert httpx.get(f"{server.url}/runs/{run}/events").status_code == 404
    with pytest.raises(InvalidStatus) as denied:
        connect(f"{server.ws_url}/runs/{run}/ws", open_timeout=5)
    assert denied.value.response.status_code == 404
    # Its events and records are gone from the broker too, not only from the routes.
    wait_for(lambda: f"run:{run}" not in tw.broker._logs)  # type: ignore[attr-defined]
    assert tw.runs.here(run) is None


def test_decimals_are_sent_as_exact_strings(serve: Any) -> None:
    tw, _ = make()

    @tw.stream
    async def prices() -> AsyncIterator[Any]:
        yield {"price": Decimal("0.1"), "big": Decimal("12345678901234567890.000000001")}

    server = serve(tw)
    run = detach(server, "prices")
    for transport in TRANSPORTS:
        events = read(server, transport, f"/runs/{run}/events")
        assert events[0]["data"] == {"price": "0.1", "big": "12345678901234567890.000000001"}


@pytest.mark.parametrize("stream", ["forever", "forever_sync"])
def test_cancel_closes_the_generator(serve: Any, stream: str) -> None:
    tw, probe = make()
    server = serve(tw)
    run = detach(server, stream)
    assert probe.started.wait(5)
    with ThreadPoolExecutor(1) as pool:
        watching = pool.submit(read_ndjson, f"{server.url}/runs/{run}/events")
        time.sleep(0.1)
        response = httpx.delete(f"{server.url}/runs/{run}")
        assert response.status_code == 200
        # DELETE answers once the generator is closed: its `finally` has run.
        assert probe.closed.is_set()
        assert response.json()["state"] == "cancelled"
        events = watching.result(10)
    assert events[-1]["event"] == "cancelled"
    assert [e["data"] for e in events[:-1]] == list(range(len(events) - 1))
    assert httpx.delete(f"{server.url}/runs/{run}").status_code == 200  # idempotent


def test_deleting_a_finished_run_is_409(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw)
    run = detach(server, "count")
    finished(server, run)
    assert httpx.delete(f"{server.url}/runs/{run}").status_code == 409


@pytest.mark.parametrize("stream", ["forever", "forever_sync"])
@pytest.mark.parametrize("transport", ["ndjson", "ws"])
def test_disconnect_cancels_an_attached_run(serve: Any, stream: str, transport: str) -> None:
    tw, probe = make()
    server = serve(tw)
    if transport == "ws":
        with connect(f"{server.ws_url}/streams/{stream}/ws") as ws:
            run = ws.response.headers["tidewire-run"]
            ws.recv(timeout=5)
    else:
        with httpx.stream("GET", f"{server.url}/streams/{stream}") as response:
            run = response.headers["tidewire-run"]
            next(response.iter_lines())
    # The run waits `disconnect_grace` for its watcher to come back, then stops.
    wait_for(probe.closed.is_set, 5, "the generator was not closed")
    assert finished(server, run)["state"] == "cancelled"


def test_a_watcher_that_comes_back_within_the_grace_keeps_the_run(serve: Any) -> None:
    tw, _ = make(Settings(heartbeat=0.3, disconnect_grace=2.0))
    server = serve(tw)
    with httpx.stream("GET", f"{server.url}/streams/count?n=300&interval=0.005") as response:
        run = response.headers["tidewire-run"]
        lines = response.iter_lines()
        first = [json.loads(next(lines)) for _ in range(10)]
    rest = read_ndjson(
        f"{server.url}/runs/{run}/events", headers={"last-event-id": first[-1]["id"]}
    )
    data = [e["data"] for e in first + rest]
    assert data[:-1] == [{"i": i} for i in range(300)]
    assert rest[-1]["event"] == "end"


def test_a_detached_run_goes_on_without_watchers(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw)
    run = detach(server, "count", n=30, interval=0.01)
    read_ndjson(f"{server.url}/runs/{run}/events", limit=3)  # watch a little, then leave
    info = finished(server, run)
    assert info["state"] == "finished"
    assert info["events"] == 31


@pytest.mark.parametrize(
    ("stream", "kind", "message"),
    [("fails", "ValueError", "boom"), ("fails_sync", "KeyError", "'missing'")],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_failing_generator_ends_with_an_error_event(
    serve: Any, stream: str, kind: str, message: str, transport: str
) -> None:
    tw, _ = make()
    server = serve(tw)
    run = detach(server, stream)
    events = read(server, transport, f"/runs/{run}/events")
    assert [e["data"] for e in events[:2]] == [0, 1]
    error = {"type": kind, "message": message}
    assert events[-1] == {"id": event_id(tw, run, 3), "event": "error", "data": error}
    assert finished(server, run)["state"] == "failed"


@pytest.mark.parametrize("depth", [255, 1025])
def test_parameters_nested_too_deep_are_422(serve: Any, depth: int) -> None:
    tw, _ = make()
    server = serve(tw)
    body = '{"data": ' + "[" * depth + "]" * depth + "}"
    for query in ("", "?detach=true"):
        response = httpx.post(
            f"{server.url}/streams/echo{query}",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 422, response.text
        assert "nested deeper than 254 levels is not accepted" in response.json()["detail"]
    assert tw.runs.running == 0  # no run was started
    ok = httpx.post(f"{server.url}/streams/echo", json={"data": nested(253)})
    assert ok.status_code == 200 and nested(253) in [e["data"] for e in read_lines(ok.text)]


@pytest.mark.parametrize("stream", ["too_deep", "too_deep_sync"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_generator_yielding_data_nested_too_deep_ends_with_an_error_event(
    serve: Any, stream: str, transport: str
) -> None:
    tw, _ = make()
    server = serve(tw)
    run = detach(server, stream)
    events = read(server, transport, f"/runs/{run}/events")
    assert events == [
        {"id": event_id(tw, run, 1), "event": "message", "data": "before"},
        {
            "id": event_id(tw, run, 2),
            "event": "error",
            "data": {
                "type": "TooDeep",
                "message": "data nested deeper than 254 levels is not accepted",
            },
        },
    ]
    assert finished(server, run)["state"] == "failed"
    # The server goes on serving.
    assert httpx.get(f"{server.url}/streams/count?n=1").status_code == 200


def test_backpressure_a_slow_watcher_gets_every_event(serve: Any) -> None:
    # A short history: without backpressure the log would be trimmed under the
    # slow watcher and it would see a gap.
    settings = Settings(heartbeat=1, run_window=64, run_history=256)
    tw, _ = make(settings)
    server = serve(tw)
    total = 100_000
    expected = 0
    # About 100 MB in all: far more than socket buffers can hide.
    url = f"{server.url}/streams/padded?n={total}&pad=1000"
    with httpx.stream("GET", url, timeout=60) as response:
        run = tw.runs.here(response.headers["tidewire-run"])
        assert run is not None
        for line in response.iter_lines():
            event = json.loads(line)
            if event["event"] == "end":
                break
            assert event["event"] == "message"
            assert event["data"]["i"] == expected
            expected += 1
            if expected % 20_000 == 0 and expected < total:
                assert run.state == "running"
                time.sleep(0.3)  # the slow part: the generator must wait meanwhile
                # Bounded: the run is at most a window (plus what sits in
                # socket buffers, already delivered) ahead of this watcher.
                behind = run.events - min(run.cursors.values())
                assert behind <= settings.run_window
    assert expected == total


def test_concurrent_watchers_all_see_the_same_sequence(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw)
    run = detach(server, "count", n=2000, interval=0.0005)
    with ThreadPoolExecutor(6) as pool:
        futures = [
            pool.submit(read, server, TRANSPORTS[i % 3], f"/runs/{run}/events") for i in range(6)
        ]
        results = [f.result(30) for f in futures]
    assert len(results[0]) == 2001
    for result in results[1:]:
        assert result == results[0]


def test_sync_generators_do_not_queue_for_a_thread_pool(serve: Any) -> None:
    parties = 100  # more than Starlette's 40 threads and asyncio's default executor
    tw, _ = make(Settings(max_runs_per_client=parties))  # one client starts them all
    server = serve(tw)
    runs = [detach(server, "rendezvous", parties=parties) for _ in range(parties)]
    states = [finished(server, run)["state"] for run in runs]
    assert states == ["finished"] * parties


def test_heartbeats_while_idle(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw)
    with httpx.stream("GET", f"{server.url}/streams/idle") as response:
        lines = response.iter_lines()
        assert next(lines) == ""  # NDJSON heartbeat: an empty line
    with httpx.stream(
        "GET", f"{server.url}/streams/idle", headers={"accept": "text/event-stream"}
    ) as response:
        text = ""
        for chunk in response.iter_text():
            text += chunk
            if ": ping" in text:
                break
        # Nothing to send yet: the first block is the position, with retry:.
        assert re.match(r"retry: 2000\nevent: position\nid: [0-9a-f]{16}\.0\ndata:\n\n", text)


def test_websocket_heartbeats_are_protocol_pings(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw, ws_ping=0.2)
    # A raw client: the ping frame must reach the wire (websockets answers
    # pings by itself, out of a test's sight).
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        key = base64.b64encode(b"0123456789abcdef").decode()
        sock.sendall(
            f"GET /streams/idle/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        deadline = time.monotonic() + 5
        while len(rest) < 2 and time.monotonic() < deadline:
            rest += sock.recv(4096)
        assert rest[0] & 0x0F == 0x9, "expected a ping frame"


def test_readers_of_unused_logs_leave_nothing_behind(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw)
    for i in range(5):
        with httpx.stream("GET", f"{server.url}/channels/made-up-{i}/events") as response:
            next(response.iter_lines())  # a heartbeat, then leave
    wait_for(lambda: not any(name.startswith("channel:made-up") for name in tw.broker._logs))  # type: ignore[attr-defined]


def test_a_websocket_publish_over_the_limit_is_refused(serve: Any) -> None:
    tw, _ = make()
    server = serve(tw)
    with connect(f"{server.ws_url}/channels/big/ws", max_size=None) as ws:
        ws.send("x" * ((1 << 20) + 1))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
        assert ws.close_code == 1009
    # Nothing was published: once the subscriber is gone, so is the empty log.
    wait_for(lambda: "channel:big" not in tw.broker._logs)  # type: ignore[attr-defined]


def test_runs_beyond_max_runs_are_refused_until_some_end(serve: Any) -> None:
    tw, _ = make(Settings(heartbeat=0.3, disconnect_grace=0.3, max_runs=2))
    server = serve(tw)
    first = detach(server, "forever_sync")
    detach(server, "forever")
    refused = httpx.post(f"{server.url}/streams/count?detach=true")
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "2 runs are running" in refused.json()["detail"]
    assert httpx.get(f"{server.url}/streams/count").status_code == 503
    with pytest.raises(InvalidStatus) as denied:
        connect(f"{server.ws_url}/streams/count/ws")
    assert denied.value.response.status_code == 503
    assert httpx.delete(f"{server.url}/runs/{first}").status_code == 200
    events = read_ndjson(f"{server.url}/streams/count?n=2")
    assert events[-1]["event"] == "end"


def test_a_detached_run_retains_its_events_at_about_their_size(serve: Any) -> None:
    # orjson's results hold a buffer of >= 4 KB whatever their length; kept
    # as they came, 100,000 events of ~100 bytes held ~410 MB here.
    n = 100_000
    tw = Tidewire(settings=Settings(run_history=n))

    @tw.stream
    async def small(n: int) -> AsyncIterator[dict[str, Any]]:
        for i in range(n):
            yield {"seq": i, "text": "x" * 80}

    server = serve(tw)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        run = httpx.post(f"{server.url}/streams/small?n={n}&detach=true").json()["run"]
        wait_for(
            lambda: httpx.get(f"{server.url}/runs/{run}").json()["state"] == "finished",
            timeout=60,
        )
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    after = log_id(tw.broker, n - 1)
    [last] = read_ndjson(f"{server.url}/runs/{run}/events?after={after}", limit=1)
    assert last["data"] == {"seq": n - 1, "text": "x" * 80}
    # The event, its id and its data (~100 bytes): no 4 KB buffer each.
    assert retained / n < 1_000
