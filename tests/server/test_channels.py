"""Channels over a real server: publish over HTTP and WebSocket, subscribe on every transport."""

from __future__ import annotations

import asyncio
import base64
import gc
import itertools
import json
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal
from urllib.parse import quote

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.conftest import QUICK, LiveServer, wait_for
from tests.wire import Envelope, nth, parse_sse
from tidewire import Settings, Tidewire
from tidewire.broker import Broker

Serve = Callable[..., LiveServer]
#: The default limit of a publish, which most tests here run with.
MAX_PUBLISH_BYTES = Settings().max_event_bytes
Transport = Literal["ndjson", "sse", "ws"]
TRANSPORTS: list[Transport] = ["ndjson", "sse", "ws"]

#: How long a WebSocket reader waits for a frame before it calls the channel idle
#: (WebSocket heartbeats are protocol pings, invisible here).
WS_IDLE = 0.3

#: Most tests share one server (each on channels of its own) with quick heartbeats:
#: "read until idle" waits for one. Tests of heartbeats themselves use QUICK.
FAST = Settings(heartbeat=0.15, disconnect_grace=0.3, close_timeout=2.0)

_names = itertools.count(1)

#: One client for all publishing: a new httpx client per request costs more than the request.
HTTP = httpx.Client(timeout=10)


def start(
    serve: Serve, settings: Settings = QUICK, broker: Broker | None = None
) -> tuple[Tidewire, LiveServer]:
    tw = Tidewire(settings=settings, broker=broker)
    return tw, serve(tw)


def seq(id: str) -> int:
    """The count of an event id, from either broker ("7" or "1700000000000-7")."""
    return int(id.rpartition("-")[2])


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[Tidewire, LiveServer]]:
    tw = Tidewire(settings=FAST)

    @tw.router.post("/shout")
    async def shout(channel: str, word: str) -> dict[str, str]:
        return {"id": await tw.publish(channel, {"word": word}, event="shout")}

    @tw.stream
    async def announce(channel: str, text: str = "hi") -> AsyncIterator[dict[str, str]]:
        yield {"published": await tw.publish(channel, {"text": text})}

    server = LiveServer(tw.app).start()
    yield tw, server
    server.stop()


@pytest.fixture
def server(shared: tuple[Tidewire, LiveServer]) -> LiveServer:
    return shared[1]


@pytest.fixture
def ch() -> str:
    """A channel name no other test uses."""
    return f"test-{next(_names)}"


def events_url(server: LiveServer, channel: str, query: str = "") -> str:
    return f"{server.url}/channels/{channel}/events{query}"


def ws_url(server: LiveServer, channel: str, query: str = "") -> str:
    return f"{server.ws_url}/channels/{channel}/ws{query}"


def publish(
    server: LiveServer, channel: str, value: Any, event: str | None = None, **kw: Any
) -> str:
    """POST one event; `value` is sent as JSON unless `kw` gives the body (content, data, files)."""
    params = {"event": event} if event else None
    body = kw or {
        "content": json.dumps(value).encode(),
        "headers": {"content-type": "application/json"},
    }
    response = HTTP.post(events_url(server, channel), params=params, **body)
    assert response.status_code == 201, response.text
    body_json = response.json()
    assert set(body_json) == {"id"} and isinstance(body_json["id"], str)
    return str(body_json["id"])


class Subscriber(threading.Thread):
    """Subscribe to a channel in a thread, on one transport.

    Reads until `limit` events came, or (with `until_idle`) until the channel
    goes quiet: a heartbeat on NDJSON and SSE, no frame for a while on WebSocket
    (with a `limit` too, a WebSocket reads that many first, however long it takes).
    `ready` is set once the server answered, i.e. once the start position is fixed.
    """

    def __init__(
        self,
        server: LiveServer,
        channel: str,
        transport: Transport,
        *,
        query: str = "",
        headers: dict[str, str] | None = None,
        limit: int | None = None,
        until_idle: bool = False,
    ) -> None:
        super().__init__(daemon=True)
        self.server, self.channel, self.transport = server, channel, transport
        self.query, self.headers = query, dict(headers or {})
        self.limit, self.until_idle = limit, until_idle
        self.ready = threading.Event()
        self.events: list[Envelope] = []
        self.comments: list[str] = []
        self.response_headers: httpx.Headers | None = None
        self.error: BaseException | None = None
        self._close: Callable[[], object] | None = None

    def run(self) -> None:
        try:
            if self.transport == "ws":
                self._ws()
            else:
                self._http()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()

    def _full(self) -> bool:
        return self.limit is not None and len(self.events) >= self.limit

    def _http(self) -> None:
        url = events_url(self.server, self.channel, self.query)
        headers = dict(self.headers)
        if self.transport == "sse":
            headers["accept"] = "text/event-stream"
        with httpx.stream("GET", url, headers=headers, timeout=10) as response:
            assert response.status_code == 200, response.read()
            self._close = response.close
            self.response_headers = response.headers
            self.ready.set()
            if self.transport == "ndjson":
                for line in response.iter_lines():
                    if not line.strip():
                        if self.until_idle:
                            return
                        continue
                    self.events.append(json.loads(line))
                    if self._full():
                        return
                return
            buffer = ""
            for text in response.iter_text():
                buffer += text.replace("\r\n", "\n")
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    events, comments = parse_sse(block + "\n\n")
                    self.events.extend(events)
                    self.comments.extend(comments)
                    if self._full() or (self.until_idle and comments):
                        return

    def _ws(self) -> None:
        url = ws_url(self.server, self.channel, self.query)
        with connect(url, additional_headers=self.headers, open_timeout=10) as ws:
            self._close = ws.close
            self.ready.set()
            while True:
                # With both `limit` and `until_idle`: the first `limit` events
                # are waited for as long as they take, then any more until idle.
                idle = self.until_idle and (self.limit is None or self._full())
                if self._full() and not idle:
                    return
                try:
                    frame = ws.recv(timeout=WS_IDLE if idle else 10)
                except TimeoutError:
                    if idle:
                        return
                    raise
                assert isinstance(frame, str), "events are text frames"
                self.events.append(json.loads(frame))

    def begin(self) -> Subscriber:
        self.start()
        assert self.ready.wait(10), "the subscription did not open"
        if self.error is not None:
            raise self.error
        return self

    def result(self, timeout: float = 15) -> list[Envelope]:
        return collect([self], timeout)[0]


def collect(subs: list[Subscriber], timeout: float = 15) -> list[list[Envelope]]:
    """Wait for subscribers; any still waiting are disconnected and fail the test."""
    deadline = time.monotonic() + timeout
    for sub in subs:
        sub.join(max(0.0, deadline - time.monotonic()))
    stuck = [sub for sub in subs if sub.is_alive()]
    for sub in stuck:
        if sub._close is not None:
            sub._close()  # so that the server can stop
    if stuck:
        pytest.fail(
            "subscribers still waiting: "
            + "; ".join(f"{sub.transport} got {sub.events}" for sub in stuck)
        )
    for sub in subs:
        if sub.error is not None:
            raise sub.error
    return [sub.events for sub in subs]


def read_all(
    server: LiveServer,
    channel: str,
    transport: Transport,
    query: str = "?after=0",
    headers: dict[str, str] | None = None,
) -> list[Envelope]:
    """Everything a new subscriber gets until the channel is idle."""
    sub = Subscriber(server, channel, transport, query=query, headers=headers, until_idle=True)
    return sub.begin().result()


def read_on_all(
    server: LiveServer,
    channel: str,
    query: str = "?after=0",
    headers: dict[str, str] | None = None,
) -> list[Envelope]:
    """`read_all` on the three transports, checked identical; returns the events.

    NDJSON and SSE tell when they are idle (a heartbeat, written after what was
    ready); a WebSocket cannot (its pings are invisible here), so it reads as
    many events as they got, then waits `WS_IDLE` for any extra: a loaded
    machine slows it down but never cuts it short.
    """
    subs = {
        t: Subscriber(server, channel, t, query=query, headers=headers, until_idle=True).begin()
        for t in ("ndjson", "sse")
    }
    got = dict(zip(subs, collect(list(subs.values())), strict=True))
    assert got["sse"] == got["ndjson"], "SSE differs from NDJSON"
    count = len(got["ndjson"])
    ws = Subscriber(
        server, channel, "ws", query=query, headers=headers, limit=count, until_idle=True
    )
    got["ws"] = ws.begin().result()
    assert got["ws"] == got["ndjson"], "WebSocket differs from NDJSON"
    return got["ndjson"]


def blob(raw: bytes, kind: str) -> dict[str, Any]:
    return {"$blob": {"type": kind, "size": len(raw), "data": base64.b64encode(raw).decode()}}


# ---------------------------------------------------------------- publish and replay


def test_publish_and_replay_history_identically_on_all_transports(
    server: LiveServer, ch: str
) -> None:
    payloads: list[tuple[Any, str | None]] = [
        ({"n": 1, "text": "héllo 漢字"}, None),
        ([1, 2, {"deep": None}], "progress"),
        ("just a string", None),
        (3.25, "x.y-z:1"),
        (None, None),
    ]
    ids = [publish(server, ch, data, event) for data, event in payloads]
    assert len(set(ids)) == len(ids)

    events = read_on_all(server, ch)
    assert events == [
        {"id": id_, "event": event or "message", "data": data}
        for id_, (data, event) in zip(ids, payloads, strict=True)
    ]


def test_live_subscriber_gets_later_events_only(server: LiveServer, ch: str) -> None:
    publish(server, ch, "before-1")
    publish(server, ch, "before-2")
    subs = [Subscriber(server, ch, t, limit=3).begin() for t in TRANSPORTS]
    ids = [publish(server, ch, {"after": i}) for i in range(3)]
    expected = [{"id": id_, "event": "message", "data": {"after": i}} for i, id_ in enumerate(ids)]
    for sub, events in zip(subs, collect(subs), strict=True):
        assert events == expected, sub.transport


def test_live_subscriber_of_an_empty_channel(server: LiveServer, ch: str) -> None:
    subs = [Subscriber(server, ch, t, limit=1).begin() for t in TRANSPORTS]
    id_ = publish(server, ch, {"first": True})
    for events in collect(subs):
        assert events == [{"id": id_, "event": "message", "data": {"first": True}}]


def test_channels_are_separate(server: LiveServer, ch: str) -> None:
    publish(server, ch + "a", 1)
    publish(server, ch + "b", 2)
    assert [e["data"] for e in read_all(server, ch + "a", "ndjson")] == [1]
    assert [e["data"] for e in read_all(server, ch + "b", "ndjson")] == [2]


def test_event_query_names_the_type(server: LiveServer, ch: str) -> None:
    sub = Subscriber(server, ch, "sse", limit=1).begin()
    id_ = publish(server, ch, {"pct": 50}, event="progress")
    assert sub.result() == [{"id": id_, "event": "progress", "data": {"pct": 50}}]


def test_reserved_or_bad_event_type_is_422(server: LiveServer, ch: str) -> None:
    for kind in ["end", "error", "cancelled", "gap", "unavailable", "two\nlines", "x" * 201]:
        response = httpx.post(events_url(server, ch), params={"event": kind}, json={"a": 1})
        assert response.status_code == 422, kind
        assert response.json()["detail"], kind
    good = publish(server, ch, "ok")
    assert read_all(server, ch, "ndjson") == [{"id": good, "event": "message", "data": "ok"}]


BAD_NAMES = ["a%20b", "%2E%2E", ".hidden", "-x", "x" * 201, "x" * 300, "%C3%A9", "a%0Ab"]


def test_invalid_channel_name_is_422_with_a_message(server: LiveServer) -> None:
    for name in BAD_NAMES:
        posted = httpx.post(events_url(server, name), json={"a": 1})
        assert posted.status_code == 422, name
        assert "channel name" in posted.json()["detail"], name

        got = httpx.get(events_url(server, name, "?after=0"), timeout=5)
        assert got.status_code == 422, name
        assert "channel name" in got.json()["detail"], name

        with pytest.raises(InvalidStatus) as denied:
            connect(ws_url(server, name), open_timeout=5)
        assert denied.value.response.status_code == 422, name
        assert b"channel name" in denied.value.response.body, name


def test_path_traversal_never_names_a_channel(server: LiveServer) -> None:
    for path in ("/channels/../x/events", "/channels/..%2Fx/events", "/channels/a%2Fb/events"):
        response = httpx.post(server.url + path, json={"a": 1})
        assert response.status_code in (404, 422), path


def test_longest_channel_name_is_accepted(server: LiveServer) -> None:
    name = "a" + "b._:-" * 39 + "z" * 4
    assert len(name) == 200
    id_ = publish(server, name, "long")
    assert read_all(server, name, "ndjson") == [{"id": id_, "event": "message", "data": "long"}]


def test_invalid_json_is_400(server: LiveServer, ch: str) -> None:
    response = httpx.post(
        events_url(server, ch), content=b'{"a": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "JSON" in response.json()["detail"]


@pytest.mark.parametrize("depth", [255, 300, 1025])
def test_json_nested_too_deep_to_send_on_is_422(server: LiveServer, ch: str, depth: int) -> None:
    # orjson reads 1,024 levels but writes only 254: such data once made a 500.
    for body in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        response = HTTP.post(
            events_url(server, ch), content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, response.text
        assert "nested deeper than 254 levels is not accepted" in response.json()["detail"]
    # Nothing was published; data as deep as may be sent goes through.
    id_ = publish(server, ch, None, content=b"[" * 254 + b"]" * 254)
    [event] = read_all(server, ch, "ndjson")
    assert event["id"] == id_


def test_unsupported_content_type_is_415(server: LiveServer, ch: str) -> None:
    for kind in ["application/xml", "image/png", "application/octet-stream"]:
        response = httpx.post(
            events_url(server, ch), content=b"<a/>", headers={"content-type": kind}
        )
        assert response.status_code == 415, kind
        assert kind in response.json()["detail"]


def test_text_plain_publishes_a_string(server: LiveServer, ch: str) -> None:
    text = 'line one\nline "two" é'
    id_ = publish(server, ch, None, content=text.encode(), headers={"content-type": "text/plain"})
    assert read_all(server, ch, "sse") == [{"id": id_, "event": "message", "data": text}]


def test_json_suffix_content_type_is_json(server: LiveServer, ch: str) -> None:
    id_ = publish(
        server,
        ch,
        None,
        content=b'{"k": [1]}',
        headers={"content-type": "application/vnd.thing+json; charset=utf-8"},
    )
    assert read_all(server, ch, "ndjson") == [{"id": id_, "event": "message", "data": {"k": [1]}}]


def test_multipart_publishes_fields_and_files_as_blobs(server: LiveServer, ch: str) -> None:
    raw = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    id_ = publish(
        server,
        ch,
        None,
        data={"caption": "a cat"},
        files={"photo": ("cat.png", raw, "image/png")},
    )
    [event] = read_on_all(server, ch)
    assert event == {
        "id": id_,
        "event": "message",
        "data": {"caption": "a cat", "photo": blob(raw, "image/png")},
    }
    assert base64.b64decode(event["data"]["photo"]["$blob"]["data"]) == raw


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        # Exactly the limit, in bytes: a JSON string of 1 MiB, and the same as text.
        ("application/json", b'"' + b"x" * (MAX_PUBLISH_BYTES - 2) + b'"'),
        ("text/plain", "é".encode() * (MAX_PUBLISH_BYTES // 2)),
    ],
)
def test_a_publish_over_1_mib_is_413(server: LiveServer, ch: str, kind: str, body: bytes) -> None:
    assert MAX_PUBLISH_BYTES == 1 << 20 and len(body) == MAX_PUBLISH_BYTES
    id_ = publish(server, ch, None, content=body, headers={"content-type": kind})
    over = HTTP.post(events_url(server, ch), content=body + b" ", headers={"content-type": kind})
    assert over.status_code == 413, over.text[:200]
    assert "at most" in over.json()["detail"]
    # Nothing was published by the refused request.
    events = read_all(server, ch, "ndjson")
    assert [e["id"] for e in events] == [id_]
    assert len(events[0]["data"]) == (
        MAX_PUBLISH_BYTES - 2 if kind == "application/json" else MAX_PUBLISH_BYTES // 2
    )


def test_a_form_chunked_or_declared_publish_over_1_mib_is_413(server: LiveServer, ch: str) -> None:
    over = b"x" * (MAX_PUBLISH_BYTES + 1)

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it comes
        yield b'"'
        yield from (b"x" * 4096 for _ in range(MAX_PUBLISH_BYTES // 4096))

    attempts: dict[str, dict[str, Any]] = {
        "multipart file": {"files": {"f": ("big.bin", over, "application/octet-stream")}},
        "multipart field": {"data": {"f": over.decode()}, "files": {"g": ("a", b"y")}},
        "urlencoded field": {"data": {"f": over.decode()}},
        "chunked JSON": {"content": chunked(), "headers": {"content-type": "application/json"}},
    }
    for name, body in attempts.items():
        response = HTTP.post(events_url(server, ch), **body)
        assert response.status_code == 413, (name, response.text[:200])
        assert "at most" in response.json()["detail"], name
    assert read_all(server, ch, "ndjson") == [], "nothing was published"
    # A file just under the limit is published (as a blob).
    under = b"y" * (MAX_PUBLISH_BYTES - 1024)
    publish(server, ch, None, files={"f": ("ok.bin", under, "application/octet-stream")})


def test_a_websocket_frame_over_1_mib_in_bytes_closes_1009(server: LiveServer, ch: str) -> None:
    # Half as many characters as the limit has bytes, each of two bytes in UTF-8: over it.
    text = "é" * (MAX_PUBLISH_BYTES // 2 + 1)
    with connect(ws_url(server, ch), max_size=None, open_timeout=5) as ws:
        ws.send(text)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
        assert ws.close_code == 1009
    assert read_all(server, ch, "ndjson") == [], "nothing was published"


def test_urlencoded_form_publishes_fields(server: LiveServer, ch: str) -> None:
    id_ = publish(server, ch, None, data={"a": "1", "b": "two words"})
    assert read_all(server, ch, "ndjson") == [
        {"id": id_, "event": "message", "data": {"a": "1", "b": "two words"}}
    ]


# ---------------------------------------------------------------- WebSocket publishing


def test_websocket_frames_are_published(server: LiveServer, ch: str) -> None:
    watchers = [Subscriber(server, ch, t, limit=3).begin() for t in TRANSPORTS]
    raw = b"\x00\xff binary \x01"
    with connect(ws_url(server, ch), open_timeout=5) as ws:
        ws.send('{"x": 1, "y": [true]}')
        ws.send("not json at all")
        ws.send(raw)
        # The sender is subscribed too, live from when it connected.
        own = [json.loads(ws.recv(timeout=5)) for _ in range(3)]

    assert [e["data"] for e in own] == [
        {"x": 1, "y": [True]},
        "not json at all",
        blob(raw, "application/octet-stream"),
    ]
    assert all(e["event"] == "message" for e in own)
    ids = [seq(e["id"]) for e in own]
    assert ids == sorted(ids) and len(set(ids)) == 3
    for watcher, events in zip(watchers, collect(watchers), strict=True):
        assert events == own, watcher.transport
    assert base64.b64decode(own[2]["data"]["$blob"]["data"]) == raw


@pytest.mark.parametrize("depth", [255, 1025])
def test_a_websocket_frame_nested_too_deep_closes_with_1007(
    server: LiveServer, ch: str, depth: int
) -> None:
    with connect(ws_url(server, ch), open_timeout=5) as ws:
        ws.send("[" * depth + "]" * depth)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
    assert ws.close_code == 1007
    assert ws.close_reason == "data nested deeper than 254 levels is not accepted"
    assert read_all(server, ch, "ndjson") == []  # nothing was published


# ---------------------------------------------------------------- gap, resume


def test_gap_when_behind_the_retained_history(serve: Serve) -> None:
    _, server = start(serve, Settings(heartbeat=0.15, channel_max_len=10))
    ids = [publish(server, "g", {"i": i}) for i in range(50)]

    events = read_on_all(server, "g", "?after=" + ids[4])  # had the first 5
    gap, retained = events[0], events[1:]
    assert gap["event"] == "gap"
    assert gap["data"] == {"missed": 35}
    assert retained == [{"id": ids[i], "event": "message", "data": {"i": i}} for i in range(40, 50)]

    # Resuming from the gap (as EventSource would, with its id) loses nothing more.
    again = read_on_all(server, "g", headers={"last-event-id": gap["id"]})
    assert again == retained


def test_after_0_on_a_trimmed_channel_counts_what_was_trimmed(serve: Serve, broker: Broker) -> None:
    """`?after=0` asks for everything: what is no longer retained is a gap, never silence."""
    _, server = start(serve, Settings(heartbeat=0.15, channel_max_len=3), broker)
    ids = [publish(server, "t", i) for i in range(8)]
    events = read_on_all(server, "t")
    gap, real = events[0], events[1:]
    assert gap["event"] == "gap" and gap["data"] == {"missed": 5}
    assert seq(gap["id"]) == 5
    assert real == [{"id": ids[i], "event": "message", "data": i} for i in (5, 6, 7)]
    # Resuming from the gap's id gets the retained events, and no second gap.
    assert read_on_all(server, "t", "", headers={"last-event-id": gap["id"]}) == real


def test_a_gap_of_exactly_one(serve: Serve, broker: Broker) -> None:
    _, server = start(serve, Settings(heartbeat=0.15, channel_max_len=3), broker)
    ids = [publish(server, "one", i) for i in range(4)]  # the first is trimmed
    events = read_on_all(server, "one")
    # A gap's id is where to resume: just past what was missed (on Redis, with the
    # time part of the next id, so compare the counts).
    gap = events[0]
    assert (gap["event"], gap["data"], seq(gap["id"])) == ("gap", {"missed": 1}, seq(ids[0]))
    assert events[1:] == [{"id": ids[i], "event": "message", "data": i} for i in (1, 2, 3)]

    ids.append(publish(server, "one", 4))  # the second is trimmed too
    # A reader that had the first missed only the second.
    events = read_on_all(server, "one", "", headers={"last-event-id": ids[0]})
    gap = events[0]
    assert (gap["event"], gap["data"], seq(gap["id"])) == ("gap", {"missed": 1}, seq(ids[1]))
    assert events[1:] == [{"id": ids[i], "event": "message", "data": i} for i in (2, 3, 4)]
    # One that missed nothing gets no gap at all.
    assert read_on_all(server, "one", "?after=" + ids[1]) == events[1:]


def test_resume_with_after_and_last_event_id(server: LiveServer, ch: str) -> None:
    ids = [publish(server, ch, i) for i in range(6)]
    from_after = read_on_all(server, ch, "?after=" + ids[1])
    assert [e["data"] for e in from_after] == [2, 3, 4, 5]
    # Last-Event-ID (what EventSource sends back) wins over ?after=.
    both = read_on_all(server, ch, "?after=" + ids[1], headers={"last-event-id": ids[3]})
    assert [e["data"] for e in both] == [4, 5]
    assert [e["id"] for e in both] == ids[4:]


def test_resume_at_the_head_then_live(server: LiveServer, ch: str) -> None:
    ids = [publish(server, ch, i) for i in range(3)]
    subs = [
        Subscriber(server, ch, t, headers={"last-event-id": ids[-1]}, limit=1).begin()
        for t in TRANSPORTS
    ]
    new = publish(server, ch, "new")
    for events in collect(subs):
        assert events == [{"id": new, "event": "message", "data": "new"}]


def test_bad_position_is_400(server: LiveServer, ch: str) -> None:
    publish(server, ch, 1)
    # int() reads "+0", "0_0" and "0x0"... as numbers: no id looks like them.
    for bad in ["abc", "-1", "1.5", "+0", "0_0", "0x0"]:
        for where in ["header", "query"]:
            headers = {"last-event-id": bad} if where == "header" else {}
            params = {"after": bad} if where == "query" else {}
            for accept in ("application/x-ndjson", "text/event-stream"):
                response = httpx.get(
                    events_url(server, ch),
                    headers={**headers, "accept": accept},
                    params=params,
                    timeout=5,
                )
                assert response.status_code == 400, (bad, where, accept)
                assert isinstance(response.json()["detail"], str)
            query = f"?after={bad}" if where == "query" else ""
            with pytest.raises(InvalidStatus) as denied:
                connect(ws_url(server, ch, query), additional_headers=headers, open_timeout=5)
            assert denied.value.response.status_code == 400, (bad, where)


def test_a_position_int_would_take_is_400_in_the_query_too(server: LiveServer, ch: str) -> None:
    """Spaces and non-ASCII digits cannot be sent in a header, but can in `?after=`."""
    publish(server, ch, 1)
    for bad in [" 0", "0 ", "\u0660", "\uff10", "0\n"]:
        for accept in ("application/x-ndjson", "text/event-stream"):
            response = httpx.get(
                events_url(server, ch), params={"after": bad}, headers={"accept": accept}
            )
            assert response.status_code == 400, (bad, accept, response.text)
            assert repr(bad) in response.json()["detail"], bad
        with pytest.raises(InvalidStatus) as denied:
            connect(ws_url(server, ch, "?after=" + quote(bad)), open_timeout=5)
        assert denied.value.response.status_code == 400, bad


def test_an_id_ahead_of_the_log_reads_on_from_the_head(server: LiveServer, ch: str) -> None:
    """A client resuming with an id past the newest event (made up) must get what is
    published from now on, not hang, and be told (a `gap`) that the id was ahead of
    the log, with the id it reads on from. (An id from before a restart: test_restart.py.)"""
    old = publish(server, ch, "old")
    ahead = nth(old, 999)
    subs = [
        Subscriber(server, ch, t, headers={"last-event-id": ahead}, limit=3).begin()
        for t in TRANSPORTS
    ]
    ids = [publish(server, ch, f"new-{i}") for i in range(2)]
    for events in collect(subs):  # not hanging is the point; a loaded machine may be slow
        assert [(e["id"], e["data"]) for e in events] == [
            (old, {"missed": 0, "ahead": ahead}),
            (ids[0], "new-0"),
            (ids[1], "new-1"),
        ]


# ---------------------------------------------------------------- publishing from server code


def test_publish_from_server_code_reaches_subscribers(server: LiveServer, ch: str) -> None:
    # The shared server has a route and a stream that call `tw.publish` (see `shared`).
    subs = [Subscriber(server, ch, t, limit=2).begin() for t in TRANSPORTS]

    shouted = httpx.post(f"{server.url}/shout", params={"channel": ch, "word": "hey"}, timeout=5)
    assert shouted.status_code == 200
    shout_id = shouted.json()["id"]

    run = httpx.get(f"{server.url}/streams/announce", params={"channel": ch, "text": "yo"})
    lines = [json.loads(line) for line in run.text.splitlines() if line.strip()]
    assert [e["event"] for e in lines] == ["message", "end"]
    announce_id = lines[0]["data"]["published"]

    expected = [
        {"id": shout_id, "event": "shout", "data": {"word": "hey"}},
        {"id": announce_id, "event": "message", "data": {"text": "yo"}},
    ]
    for sub, events in zip(subs, collect(subs), strict=True):
        assert events == expected, sub.transport


def test_publish_from_server_code_refuses_reserved_types_and_bad_names() -> None:
    tw = Tidewire(settings=QUICK)

    async def body() -> None:
        with pytest.raises(ValueError, match="reserved"):
            await tw.publish("ok", 1, event="end")
        with pytest.raises(ValueError, match="channel name"):
            await tw.publish("not ok", 1)
        first = await tw.publish("ok", 1)
        second = await tw.publish("ok", 2)
        batch = await tw.broker.read("channel:ok", "0", limit=10, timeout=0)
        assert [(e.id, e.data) for e in batch.events] == [(first, 1), (second, 2)]

    asyncio.run(body())


# ---------------------------------------------------------------- heartbeats, headers


def test_sse_idle_subscription_sends_ping_comments(serve: Serve) -> None:
    _, server = start(serve, QUICK)
    received = b""
    started = time.monotonic()
    with httpx.stream(
        "GET", events_url(server, "quiet"), headers={"accept": "text/event-stream"}, timeout=5
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for chunk in response.iter_raw():
            received += chunk
            if received.count(b": ping") >= 2:
                break
    elapsed = time.monotonic() - started
    events, comments = parse_sse(received.decode())
    assert events == []
    assert comments[:2] == [": ping", ": ping"]
    assert received.startswith(b"retry: ")  # how soon EventSource comes back
    assert 0.4 <= elapsed < 4, "two heartbeats of 0.3 s each"


def test_ndjson_idle_subscription_sends_blank_lines(serve: Serve) -> None:
    _, server = start(serve, QUICK)
    received = b""
    started = time.monotonic()
    with httpx.stream("GET", events_url(server, "quiet"), timeout=5) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        for chunk in response.iter_raw():
            received += chunk
            if len(received) >= 2:
                break
    elapsed = time.monotonic() - started
    assert received == b"\n\n"
    assert 0.4 <= elapsed < 4


def test_heartbeats_do_not_disturb_events(server: LiveServer, ch: str) -> None:
    subs = [Subscriber(server, ch, t, limit=2).begin() for t in ("ndjson", "sse")]
    first = publish(server, ch, 1)
    time.sleep(0.4)  # a couple of heartbeats in between
    second = publish(server, ch, 2)
    for events in collect(subs):
        assert [e["id"] for e in events] == [first, second]
    assert ": ping" in subs[1].comments


def test_subscription_headers(server: LiveServer, ch: str) -> None:
    for accept in ["application/x-ndjson", "text/event-stream", "*/*", "text/html"]:
        with httpx.stream(
            "GET", events_url(server, ch), headers={"accept": accept}, timeout=5
        ) as response:
            assert response.status_code == 200
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            sse = accept == "text/event-stream"
            expected = "text/event-stream" if sse else "application/x-ndjson"
            assert response.headers["content-type"].startswith(expected), accept
            assert "content-length" not in response.headers


# ---------------------------------------------------------------- slow subscribers


def test_publishing_never_waits_for_a_slow_subscriber(serve: Serve) -> None:
    _, server = start(serve, Settings(heartbeat=0.3, channel_max_len=100, publish_rate=1e6))
    # 5,000 events of 4 KB: 20 MB, far more than the socket buffers between the
    # server and a subscriber that does not read, so its writes stall.
    total, padding = 5_000, "x" * 4_000
    with (
        httpx.Client(timeout=15) as slow_client,
        slow_client.stream("GET", events_url(server, "busy")) as slow,
    ):
        assert slow.status_code == 200
        published: list[str] = []
        with httpx.Client(timeout=5) as client:
            for i in range(total):
                r = client.post(events_url(server, "busy"), json={"i": i, "pad": padding})
                assert r.status_code == 201, r.text
                published.append(r.json()["id"])
        ids = [seq(id_) for id_ in published]
        assert ids == sorted(set(ids)), "ids strictly increase"

        # A new reader gets the retained tail, contiguous and complete.
        fresh = read_all(server, "busy", "ndjson")
        tail = [e for e in fresh if e["event"] != "gap"]
        assert [seq(e["id"]) for e in tail] == ids[-100:]
        assert [e["data"]["i"] for e in tail] == list(range(total - 100, total))
        assert len(fresh) - len(tail) <= 1

        # The slow subscriber, reading at last: what it missed is counted in a
        # gap event, never lost silently.
        got, missed, previous = 0, 0, 0
        for line in slow.iter_lines():
            if not line.strip():
                continue
            event = json.loads(line)
            if event["event"] == "gap":
                missed += event["data"]["missed"]
                continue
            assert seq(event["id"]) > previous
            previous = seq(event["id"])
            got += 1
            if event["id"] == published[-1]:
                break
        assert missed > 0, "the stalled subscriber must have fallen behind"
        assert got + missed == total


def test_a_retained_event_costs_about_its_size_not_4_kb(serve: Serve) -> None:
    # orjson's results hold a buffer of >= 4 KB whatever their length; kept
    # as they came, events of ~100 bytes held ~4.6 KB each here.
    n, channels = 20_000, 4
    tw = Tidewire(settings=Settings(channel_max_len=n, publish_rate=1e6, publish_burst=n))
    server = serve(tw)
    frames = [json.dumps({"seq": i, "text": "x" * 80}) for i in range(n // channels)]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for c in range(channels):
            with connect(f"{server.ws_url}/channels/mem-{c}/ws", max_size=None) as ws:
                for frame in frames:
                    ws.send(frame)
                # Each event comes back (the publisher subscribes too) once published.
                for _ in frames:
                    last = json.loads(ws.recv(timeout=30))
            assert seq(last["id"]) == len(frames)
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    wire = len(json.dumps(last, separators=(",", ":")))
    assert 100 < wire < 160
    # The event, its id, its data, and the WebSocket text it was sent as.
    assert retained / n < 1_500


@pytest.mark.parametrize("fmt", ["ndjson", "sse"])
def test_subscribers_at_the_head_are_fed_by_the_broker_every_event_once_in_order(
    serve: Serve, fmt: str
) -> None:
    """Under `tidewire serve`'s protocol a subscriber that has caught up is a tap
    (broker.Tap): the broker writes each batch to its socket. They get what a
    task reading for each would have: every event once, in order, each with
    its id, heartbeats while nothing comes, a gap when they fall behind."""
    tw, server = start(serve, Settings(heartbeat=0.3, disconnect_grace=0.3))
    accept = {"ndjson": "application/x-ndjson", "sse": "text/event-stream"}[fmt]
    count = 5
    got: list[list[bytes]] = [[] for _ in range(count)]
    ready = threading.Barrier(count + 1)

    def subscribe(i: int) -> None:
        headers = {"accept": accept}
        with httpx.stream("GET", events_url(server, "fed"), headers=headers, timeout=10) as r:
            lines = r.iter_lines()
            if fmt == "sse":
                while next(lines):  # the block of the starting position
                    pass
            ready.wait()
            last = False
            for line in lines:
                got[i].append(line.encode())
                last = last or '"n":59' in line
                if last and (fmt == "ndjson" or not line):  # SSE: the whole block
                    return

    threads = [threading.Thread(target=subscribe, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    ready.wait()
    log = tw.broker._logs["channel:fed"]  # type: ignore[attr-defined]
    wait_for(lambda: len(log.taps) == count, message="the subscribers were not tapped")
    time.sleep(0.7)  # heartbeats while tapped and idle
    for n in range(60):
        publish(server, "fed", {"n": n})
        if n % 20 == 0:
            time.sleep(0.05)
    for thread in threads:
        thread.join(10)
    for lines in got:
        if fmt == "ndjson":
            assert lines[0] == b"", "no heartbeat (an empty line) while idle"
            events = [json.loads(line) for line in lines if line]
            assert [e["data"]["n"] for e in events] == list(range(60))
            assert [seq(e["id"]) for e in events] == list(range(1, 61))
        else:
            sse, comments = parse_sse(b"\n".join(lines).decode() + "\n\n")
            assert ": ping" in comments, "no heartbeat while idle"
            events = [e for e in sse if e["event"] == "message"]
            assert [e["data"]["n"] for e in events] == list(range(60))
            assert [seq(e["id"]) for e in events] == list(range(1, 61))
    wait_for(lambda: not log.taps, message="the taps were not let go")


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_subscribers_under_another_protocol_read_every_event_without_taps(
    serve: Serve, http: str
) -> None:
    """Under a protocol other than `tidewire serve`'s (uvicorn's own here; any other
    server alike) there is no request cycle to write to (`chunked_cycle` is None): each
    subscriber's task reads and writes through `send`, and gets every event once, in order."""
    tw = Tidewire(settings=Settings(heartbeat=0.3, disconnect_grace=0.3))
    server = serve(tw, http=http)
    got: list[list[int]] = [[], []]
    ready = threading.Barrier(len(got) + 1)

    def subscribe(i: int) -> None:
        with httpx.stream("GET", events_url(server, "plain"), timeout=10) as r:
            ready.wait()
            for line in r.iter_lines():
                if line:
                    got[i].append(json.loads(line)["data"]["n"])
                if got[i][-1:] == [29]:
                    return

    threads = [threading.Thread(target=subscribe, args=(i,)) for i in range(len(got))]
    for thread in threads:
        thread.start()
    ready.wait()
    for n in range(30):
        publish(server, "plain", {"n": n})
        log = tw.broker._logs["channel:plain"]  # type: ignore[attr-defined]
        assert not log.taps, "a subscriber was tapped with no cycle to write to"
    for thread in threads:
        thread.join(10)
    assert got == [list(range(30))] * len(got)


def test_a_head_of_a_subscription_answers_its_headers_and_ends(server: LiveServer, ch: str) -> None:
    httpx.post(events_url(server, ch), json="before").raise_for_status()
    with httpx.Client(base_url=server.url, timeout=5) as http:
        got = http.head(f"/channels/{ch}/events")
        assert got.status_code == 200 and got.content == b""
        assert got.headers["content-type"] == "application/x-ndjson"
        # The same connection answers the next request (it hung, followed for ever).
        assert http.get("/healthz").status_code == 200
