"""W9: the memory a tidewire server holds per retained event, and whether it gives it back.

One `tidewire serve bench.apps.memory:tw` (the demo stream and channels; runs forgotten
3 s after they end, channel events trimmed after 8 s). After a warm-up, its RSS (psutil) is
read before and after each step:

1. channels: 100 channels x 1,000 small events (~100 B of JSON each), published as text
   frames over `WS /channels/{name}/ws`, each channel's own connection, which drains the
   events it is sent back (a WebSocket publisher is also a subscriber: the server keeps
   each event's WebSocket text too). Confirmed by reading event 1,000 of every channel.
2. runs: 10 detached runs of the demo (`?n=10000&interval=0&detach=true`, text + base64
   PNG per event), one after another, each until `GET /runs/{id}` says finished.
3. expiry: once the runs are forgotten (`GET /runs/{id}` is 404) and the channels' events
   are older than their max age, one more publish to each channel trims its history; RSS
   again: how much of the growth went back to the operating system.

Bytes per event = RSS growth of the step ÷ the events it retained; the event's own size is
its NDJSON line as read back.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from websockets.sync.client import connect

from . import report
from .harness import Ctx, Servers
from .servers import Server, tidewire

PER_CHANNEL = 1_000  # = the app's channel_max_len: every event published is retained
PER_RUN = 10_000  # = Settings.run_history: every event of a run is retained
RUN_TTL, CHANNEL_AGE = 3.0, 8.0  # the app's run_ttl and channel_max_age, in seconds
NDJSON = "application/x-ndjson"


def _get(port: int, path: str, accept: str = "application/json") -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _post(port: int, path: str, body: bytes = b"{}") -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _event_line(port: int, path: str) -> bytes:
    """The first event (not a heartbeat) of an NDJSON read of `path`."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept": NDJSON})
    with urllib.request.urlopen(req, timeout=30) as r:
        while line := r.readline():
            if line.strip():
                return line
    raise RuntimeError(f"{path}: no event")


def _settle(server: Server) -> int:
    """RSS once the server has been left alone for a moment (its sockets closed, tasks done)."""
    time.sleep(1.5)
    return server.rss()


def publish_channels(port: int, prefix: str, channels: int, per: int) -> int:
    """Publish `per` events to each of `channels` channels over WebSockets; the size of one
    retained event's NDJSON line, read back from the last channel."""
    for c in range(channels):
        name = f"{prefix}-{c}"
        with connect(f"ws://127.0.0.1:{port}/channels/{name}/ws", max_size=None) as ws:
            for i in range(per):
                ws.send(json.dumps({"seq": i, "channel": name, "text": "w9 " + "x" * 48}))
            # Closing at once would lose the frames the server has not read yet (uvicorn
            # answers a close before them): wait until the last one comes back published.
            for _ in range(per):
                last = ws.recv(timeout=30)
        if json.loads(last)["id"] != str(per):
            raise RuntimeError(f"{name}: event {per} is not {last[:80]!r}")
    return len(_event_line(port, f"/channels/{name}/events?after={per - 1}"))


def demo_runs(port: int, runs: int, per: int) -> tuple[list[str], int]:
    """Run the demo detached `runs` times, one after another; their ids, and the size of one
    retained event's NDJSON line."""
    ids = []
    for _ in range(runs):
        run = _post(port, f"/streams/demo?n={per}&interval=0&detach=true")["run"]
        ids.append(run)
        deadline = time.monotonic() + 60
        while _get(port, f"/runs/{run}")["state"] == "running":
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {run} still running after 60 s")
            time.sleep(0.1)
    line = _event_line(port, f"/runs/{ids[-1]}/events?after={per - 1}")
    return ids, len(line)


def forgotten(port: int, run: str) -> bool:
    try:
        _get(port, f"/runs/{run}")
    except urllib.error.HTTPError as exc:
        return exc.code == 404
    return False


def w9(ctx: Ctx) -> dict[str, Any]:
    if ctx.tidewire is not None:
        return {"error": f"tidewire not run: {ctx.tidewire}", "rows": []}
    channels, per_channel = ctx.sizes.w9_channels, PER_CHANNEL
    runs, per_run = ctx.sizes.w9_runs, PER_RUN
    rows: list[dict[str, Any]] = []
    with Servers(ctx, "w9") as srv:
        server = tidewire("tidewire", "bench.apps.memory:tw", ctx.work)
        server.extra_env = {"BENCH_RUN_TTL": str(RUN_TTL), "BENCH_CHANNEL_AGE": str(CHANNEL_AGE)}
        tw = srv.start(server)
        port = tw.port
        # Warm-up: imports, first-request caches, the demo's frames, thread pools.
        publish_channels(port, "warm", 2, 200)
        demo_runs(port, 1, 200)
        start = _settle(tw)

        t0 = time.monotonic()
        size = publish_channels(port, "w9", channels, per_channel)
        published = time.monotonic()
        after_channels = _settle(tw)
        rows.append(
            row(
                f"channels: {channels} x {per_channel:,} publishes (WebSocket)",
                channels * per_channel,
                size,
                start,
                after_channels,
                published - t0,
            )
        )

        t0 = time.monotonic()
        ids, size = demo_runs(port, runs, per_run)
        ran = time.monotonic() - t0
        after_runs = _settle(tw)
        rows.append(
            row(
                f"runs: {runs} detached demo runs x {per_run:,}",
                runs * per_run,
                size,
                after_channels,
                after_runs,
                ran,
            )
        )

        # Expiry: the runs are forgotten run_ttl after they end; channel events past their
        # max age go when the channel is next written to.
        deadline = time.monotonic() + 30
        while not all(forgotten(port, run) for run in ids):
            if time.monotonic() > deadline:
                raise RuntimeError("the runs were not forgotten within 30 s")
            time.sleep(0.2)
        time.sleep(max(0.0, published + CHANNEL_AGE + 0.5 - time.monotonic()))
        for c in range(channels):
            _post(port, f"/channels/w9-{c}/events", b'{"trim": true}')
        expired = _settle(tw)
    grown = after_runs - start
    returned = (after_runs - expired) / grown if grown > 0 else float("nan")
    rows.append(
        {
            "server": "after expiry: runs forgotten, channels trimmed",
            "events": 0,
            "event_bytes": None,
            "rss_before_mb": after_runs / 2**20,
            "rss_after_mb": expired / 2**20,
            "bytes_per_event": None,
            "returned_pct": 100 * returned,
            "seconds": None,
            "problems": [],
        }
    )
    params = {
        "channels": channels,
        "events_per_channel": per_channel,
        "runs": runs,
        "events_per_run": per_run,
    }
    notes = [
        f"RSS at the start (after the warm-up): {start / 2**20:.1f} MB",
        "a WebSocket publisher is also a subscriber: its channel events keep their "
        "WebSocket text as well as their data",
    ]
    return {"params": params, "rows": rows, "checks": [], "notes": notes}


def row(
    name: str, events: int, size: int, before: int, after: int, seconds: float
) -> dict[str, Any]:
    return {
        "server": name,
        "events": events,
        "event_bytes": size,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "bytes_per_event": (after - before) / events,
        "returned_pct": None,
        "seconds": seconds,
        "problems": [],
    }


# --- the report's table (report.py keys its tables by workload) -----------------------------

report.TITLES["w9"] = "W9 memory per retained event: channel and run histories, and after expiry"
report.EXPLAIN["w9"] = (
    "One `tidewire serve` (the demo stream, channels of 1,000 events). B/event = the "
    "server's RSS growth over the step ÷ the events it retained, after 1.5 s of quiet; "
    "event size = its NDJSON line. After expiry: RSS once every run is forgotten and every "
    "channel trimmed; returned = the share of the two steps' growth given back to the "
    "operating system."
)
report.COLUMNS["w9"] = [
    ("step", lambda r: r["server"]),
    ("events retained", lambda r: report._n(r["events"])),
    ("event size B", lambda r: report._n(r["event_bytes"])),
    ("RSS before MB", lambda r: report._n(r["rss_before_mb"], 1)),
    ("RSS after MB", lambda r: report._n(r["rss_after_mb"], 1)),
    ("B/event", lambda r: report._n(r["bytes_per_event"])),
    ("returned", lambda r: "" if r["returned_pct"] is None else report._n(r["returned_pct"]) + "%"),
    ("s", lambda r: report._n(r["seconds"], 1)),
]
