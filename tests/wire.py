"""Readers for the three transports, written independently of tidewire's own decoders,
so that the tests check the wire format rather than tidewire against itself."""

from __future__ import annotations

import json
from typing import Any

import httpx
from websockets.sync.client import connect

FINAL = {"end", "error", "cancelled"}
Envelope = dict[str, Any]


def parse_sse(text: str) -> tuple[list[Envelope], list[str]]:
    """Events and comment lines of a complete SSE body."""
    events, comments = [], []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line)
            elif line:
                name, _, value = line.partition(": ")
                fields.setdefault(name, []).append(value)
        if "data" in fields:
            events.append(
                {
                    "id": fields["id"][-1],
                    "event": fields.get("event", ["message"])[-1],
                    "data": json.loads("\n".join(fields["data"])),
                }
            )
    return events, comments


def read_ndjson(
    url: str, limit: int | None = None, headers: dict[str, str] | None = None, **kw: Any
) -> list[Envelope]:
    """Envelopes of an NDJSON stream, until it ends or `limit` were read."""
    events: list[Envelope] = []
    with httpx.stream("GET", url, headers=headers, timeout=30, **kw) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.strip():
                continue  # heartbeat
            events.append(json.loads(line))
            if limit is not None and len(events) >= limit:
                break
    return events


def read_sse(url: str, headers: dict[str, str] | None = None, **kw: Any) -> list[Envelope]:
    """Envelopes of an SSE stream that ends by itself."""
    all_headers = {"accept": "text/event-stream", **(headers or {})}
    response = httpx.get(url, headers=all_headers, timeout=30, **kw)
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_sse(response.text)[0]


def read_ws(
    url: str, limit: int | None = None, headers: dict[str, str] | None = None
) -> list[Envelope]:
    """Envelopes of a WebSocket, one per text frame, until the server closes or `limit`."""
    events: list[Envelope] = []
    with connect(url, additional_headers=headers, open_timeout=10) as ws:
        for frame in ws:
            events.append(json.loads(frame))
            if events[-1]["event"] in FINAL or (limit is not None and len(events) >= limit):
                break
    return events


def nth(id: str, n: int) -> str:
    """The id of the `n`-th event of the log that `id` (an id a server sent) is from.

    Ids are opaque to clients; the tests know the in-memory broker's shape,
    `<epoch>-<seq>` (a run's: `<run id>.<epoch>-<seq>`), and name positions
    from an id they were sent, never from a hard-coded epoch.
    """
    head, dash, _ = id.rpartition("-")
    return f"{head}{dash}{n}"


def log_id(broker: Any, n: int) -> str:
    """The id of the `n`-th event of any log of the in-memory `broker`."""
    return f"{broker.epoch}-{n}"


def seq(id: str) -> int:
    """The number of the event `id` names in its log, on either broker (`7`, `<epoch>-7`,
    `1700000000000-7`, `<run id>.<epoch>-7`)."""
    return int(id.rpartition("-")[2].rpartition(".")[2])
