"""A real `tidewire serve` on the in-memory broker, restarted: an id kept from
before never names an event of the new process.

Memory logs begin again at 1 in a new process; ids carry the broker's epoch
(broker/memory.py `new_epoch`), so a client resuming with an id from before
the restart gets a `gap` saying so, then everything retained now, on every
transport, not the events after the new process's 57th as if they followed
the old one's.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
from websockets.sync.client import connect

from tests.server.test_serving import Serve, serve_process
from tests.server.test_transport import closed_with, sse_blocks

__all__ = ["serve_process"]  # the fixture, used below

N = 60


def publish_all(server: Serve, channel: str, tag: str) -> list[str]:
    """N events on `channel`; their ids."""
    with httpx.Client(base_url=server.url, timeout=10) as http:
        ids = []
        for i in range(1, N + 1):
            response = http.post(f"/channels/{channel}/events", json={"n": i, "tag": tag})
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
    return ids


def read_ndjson(
    url: str, *, headers: dict[str, str] | None = None, n: int = N + 1
) -> list[dict[str, object]]:
    """The first `n` events of a subscription (by default a `gap`, then N)."""
    events: list[dict[str, object]] = []
    with httpx.stream("GET", url, headers=headers, timeout=10) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.strip():
                events.append(json.loads(line))
                if len(events) == n:
                    break
    return events


def read_sse(url: str, *, headers: dict[str, str]) -> list[dict[str, object]]:
    """The same over SSE, as `{id, event, data}`."""
    headers = {**headers, "accept": "text/event-stream"}
    with httpx.stream("GET", url, headers=headers, timeout=10) as response:
        assert response.status_code == 200, response.read()
        blocks = sse_blocks(response.iter_text(), lambda blocks: len(blocks) == N + 1)
    events = []
    for block in blocks:
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append(
            {"id": fields["id"], "event": fields["event"], "data": json.loads(fields["data"])}
        )
    return events


def read_ws(url: str) -> list[dict[str, object]]:
    with connect(url) as ws:
        frames = [json.loads(str(ws.recv(timeout=10))) for _ in range(N + 1)]
        ws.close()
    closed_with(ws)
    return frames


def test_an_id_from_before_a_restart_gets_a_gap_then_all_retained_on_every_transport(
    serve_process: Callable[..., Serve],
) -> None:
    before = serve_process()
    kept = publish_all(before, "news", "before")[56]  # what a client saw last: the 57th
    before.stop()

    after = serve_process()  # the same app, in a new process: its logs begin again
    ids = publish_all(after, "news", "after")
    assert kept not in ids, "no id of the new process names an event of the old one"
    url = f"{after.url}/channels/news/events"
    ws_url = f"{after.ws_url}/channels/news/ws"
    received = {
        "ndjson ?after": read_ndjson(f"{url}?after={kept}"),
        "ndjson Last-Event-ID": read_ndjson(url, headers={"last-event-id": kept}),
        "sse Last-Event-ID": read_sse(url, headers={"last-event-id": kept}),
        "ws ?after": read_ws(f"{ws_url}?after={kept}"),
    }
    for how, events in received.items():
        gap, *rest = events
        # Told first; the gap's id is where it read on from (the start), which
        # EventSource keeps: a resume from there gets the rest without another.
        assert gap["event"] == "gap", how
        assert gap["data"] == {"missed": 0, "restarted": True}, how
        assert [e["id"] for e in rest] == ids, how
        assert [e["data"] for e in rest] == [{"n": i, "tag": "after"} for i in range(1, N + 1)]
        again = read_ndjson(f"{url}?after={gap['id']}", n=N)
        assert [e["id"] for e in again] == ids, how

    # `0` is still "from the start" of this process's log, with no gap.
    assert [e["id"] for e in read_ndjson(f"{url}?after=0", n=N)] == ids
