"""`Session`, the client's stream logic without I/O: bytes in, events and decisions out."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tidewire.client._session import Backoff, Session, Target
from tidewire.client.exceptions import (
    ConnectError,
    Disconnected,
    HTTPStatusError,
    ProtocolError,
    RunFailed,
    StreamGap,
    status_error,
)


def identity(value: Any) -> Any:
    return value


def run_session(transport: Any = "ndjson", **kwargs: Any) -> Session:
    start = Target("POST", "/streams/demo", json={"n": 3})
    return Session(transport, identity, start=start, **kwargs)


def test_a_run_starts_once_then_resumes_at_its_events_after_the_last_id() -> None:
    s = run_session()
    assert s.target() == Target("POST", "/streams/demo", json={"n": 3})
    s.opened({"tidewire-run": "abc"})
    assert s.run_id == "abc"
    s.feed(b'{"id":"1","event":"message","data":1}\n')
    assert s.target() == Target("GET", "/runs/abc/events", {"after": "1"})


def test_the_resume_target_follows_the_transport() -> None:
    sse = Session("sse", identity, run_id="r1", after="7")
    assert sse.target() == Target(
        "GET", "/runs/r1/events", {"after": "7"}, headers={"accept": "text/event-stream"}
    )
    ws = Session("ws", identity, channel="news/2", after=None)
    assert ws.target() == Target("WS", "/channels/news%2F2/ws", {})


def test_a_channel_resumes_from_where_live_began_even_before_any_event() -> None:
    s = Session("ndjson", identity, channel="news")
    s.opened({"tidewire-after": "41"})
    assert s.target().params == {"after": "41"}


def test_ndjson_lines_may_span_chunks_and_heartbeats_are_skipped() -> None:
    s = Session("ndjson", identity, channel="c")
    assert s.feed(b'{"id":"1","event":"message","da') == []
    events = s.feed(b'ta":{"a":1}}\n\n{"id":"2","event":"x","data":"s"}\n')
    assert [(e.id, e.event, e.data) for e in events] == [
        ("1", "message", {"a": 1}),
        ("2", "x", "s"),
    ]


def test_sse_events_and_the_retry_delay_are_understood() -> None:
    s = Session("sse", identity, channel="c")
    events = s.feed(b'retry: 100\n\nid: 5\nevent: message\ndata: {"a":\n')
    assert events == []
    (event,) = s.feed(b"data: 2}\n\n: ping\n\n")
    assert (event.id, event.data) == ("5", {"a": 2})
    # The server asked for 100 ms: the first retry waits at most that.
    assert s.dropped(ConnectError("down")) <= 0.1


def test_an_event_already_delivered_is_not_delivered_again() -> None:
    s = Session("ws", identity, channel="c")
    assert len(s.feed('{"id":"1","event":"message","data":null}')) == 1
    assert s.feed('{"id":"1","event":"message","data":null}') == []
    assert s.last_id == "1"


def test_a_notice_without_id_is_not_an_event() -> None:
    s = Session("ndjson", identity, channel="c")
    notice = b'{"event":"unavailable","data":{"message":"redis down"}}\n'
    assert s.feed(notice) == []
    assert s.last_id is None
    sse = Session("sse", identity, channel="c")
    sse.feed(b"id: 3\ndata: 1\n\n")
    assert sse.feed(b'event: unavailable\ndata: {"message":"x"}\n\n') == []
    assert sse.last_id == "3"


@pytest.mark.parametrize(
    ("transport", "notice"),
    [
        ("ndjson", b'{"event":"unavailable","data":{"draining":true}}\n'),
        ("sse", b'event: unavailable\ndata: {"draining":true}\n\n'),
        ("ws", '{"event":"unavailable","data":{"draining":true}}'),
    ],
)
def test_the_unavailable_notice_makes_the_next_reconnect_immediate(
    transport: Any, notice: bytes | str
) -> None:
    # A backoff that would wait at least 5 s: only the notice can make it 0.
    s = Session(transport, identity, run_id="r", backoff=Backoff(initial=10.0, maximum=10.0))
    first = '{"id":"r.1","event":"message","data":1}'
    s.feed(
        first
        if transport == "ws"
        else b"id: r.1\ndata: 1\n\n"
        if transport == "sse"
        else first.encode() + b"\n"
    )
    assert s.feed(notice) == []
    assert s.dropped(None) == 0.0
    assert s.target().params == {"after": "r.1"}
    # Once: a connection that then fails again waits as usual.
    assert s.dropped(ConnectError("down")) >= 5.0


def test_end_and_cancelled_finish_a_run_and_error_raises_run_failed() -> None:
    s = Session("ws", identity, run_id="r")
    (end,) = s.feed('{"id":"2","event":"end","data":null}')
    assert end.event == "end" and s.done
    failing = Session("ws", identity, run_id="r")
    with pytest.raises(RunFailed) as info:
        failing.feed('{"id":"3","event":"error","data":{"type":"KeyError","message":"k"}}')
    assert (info.value.run_id, info.value.type, info.value.message) == ("r", "KeyError", "k")
    assert failing.done


def test_a_gap_raises_by_default_or_is_yielded() -> None:
    gap = '{"id":"9","event":"gap","data":{"missed":4}}'
    with pytest.raises(StreamGap) as info:
        Session("ws", identity, channel="c").feed(gap)
    assert (info.value.missed, info.value.after) == (4, "9")
    (event,) = Session("ws", identity, channel="c", on_gap="yield").feed(gap)
    assert event.data == {"missed": 4}
    assert not info.value.restarted


def test_a_gap_after_a_restart_says_so_rather_than_a_count() -> None:
    gap = '{"id":"5-0","event":"gap","data":{"missed":0,"restarted":true}}'
    with pytest.raises(StreamGap) as info:
        Session("ndjson", identity, channel="c").feed((gap + "\n").encode())
    assert info.value.restarted and info.value.after == "5-0"
    assert "restarted" in str(info.value) and "0 events" not in str(info.value)


def test_bytes_that_are_not_the_contract_raise_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="not a tidewire event"):
        Session("ndjson", identity, channel="c").feed(b"<html>\n")
    with pytest.raises(ProtocolError):
        Session("sse", identity, channel="c").feed(b"data: {nope\n\n")


def test_backoff_grows_with_jitter_up_to_its_maximum() -> None:
    b = Backoff(initial=1.0, maximum=4.0)
    delays = [b.next() for _ in range(6)]
    for delay, cap in zip(delays, [1, 2, 4, 4, 4, 4], strict=True):
        assert cap / 2 <= delay <= cap


def test_retries_give_up_with_disconnected_and_reset_once_events_flow() -> None:
    s = Session("ndjson", identity, channel="c", retries=2, backoff=Backoff(initial=0.01))
    s.dropped(ConnectError("a"))
    s.dropped(ConnectError("b"))
    # Events flow again: the count of failures in a row starts over.
    s.opened({})
    s.feed(b'{"id":"1","event":"message","data":1}\n')
    assert s.dropped(None) <= 0.01
    s.dropped(ConnectError("c"))
    with pytest.raises(Disconnected) as info:
        s.dropped(ConnectError("d"))
    assert info.value.attempts == 2 and info.value.last_id == "1"
    assert s.reconnects == 5


def test_a_client_error_is_not_retried_but_a_503_is() -> None:
    s = Session("ndjson", identity, channel="c")
    gone = HTTPStatusError(404, "no run", method="GET", url="/runs/x/events")
    with pytest.raises(HTTPStatusError):
        s.dropped(gone)
    busy = HTTPStatusError(503, "broker down", method="GET", url="/runs/x/events")
    assert s.dropped(busy) > 0


def test_bad_arguments_are_refused_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="ndjson, sse, ws"):
        Session("grpc", identity, channel="c")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'raise' or 'yield'"):
        Session("ws", identity, channel="c", on_gap="skip")  # type: ignore[arg-type]


def test_a_503_with_retry_after_waits_at_least_that_long_but_never_over_a_minute() -> None:
    s = Session("ndjson", identity, channel="c")
    draining = HTTPStatusError(503, "draining", method="GET", url="/x", retry_after=3)
    # The backoff alone would wait under 0.5 s on a first failure.
    assert 3.0 <= s.dropped(draining) <= 3.5
    greedy = HTTPStatusError(503, "later", method="GET", url="/x", retry_after=86_400)
    assert s.dropped(greedy) == 60.0
    assert s.dropped(HTTPStatusError(503, "busy", method="GET", url="/x")) < 3.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("2", 2.0),
        (" 7 ", 7.0),
        (None, None),
        ("soon", None),
        ("-1", None),
        ("1.5", None),
        ("Wed, 21 Oct 2026 07:28:00 GMT", None),
        ("9" * 40, None),
    ],
)
def test_retry_after_is_read_as_whole_seconds_only(
    header: str | None, seconds: float | None
) -> None:
    headers = {} if header is None else {"retry-after": header}
    request = httpx.Request("GET", "http://t/x")
    response = httpx.Response(503, headers=headers, json={"detail": "draining"}, request=request)
    error = status_error(response)
    assert error.retry_after == seconds and error.detail == "draining"
