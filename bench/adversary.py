"""W8: an adversary publishes a lot and reads nothing; the server's RSS stays near its budget.

One `tidewire serve` (the demo app) with `TIDEWIRE_MAX_RETAINED_BYTES` = 32 MiB. After a
warm-up, 5 stalled SSE subscribers (`?after=0`, 4 KiB receive buffers, never read) and then
1,000 publishes of 112 KiB over 200 channels (the issue's 900 KiB x 1,000 over 256 MiB,
scaled by 1/8: 3.4x the budget is published). RSS (psutil, the server's processes) before
and after, beside the budget; the retained history is trimmed oldest-first from the
biggest channels, so growth past the budget is buffers and allocator slack.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

from . import report
from .harness import Ctx, Servers
from .servers import tidewire

BUDGET = 32 << 20
PUBLISHES, SIZE, CHANNELS, STALLED = 1_000, 112 << 10, 200, 5


def w8(ctx: Ctx) -> dict[str, Any]:
    if ctx.tidewire is not None:
        return {"error": f"tidewire not run: {ctx.tidewire}", "rows": []}
    with Servers(ctx, "w8") as srv:
        server = tidewire("tidewire", None, ctx.work)
        server.extra_env = {"TIDEWIRE_MAX_RETAINED_BYTES": str(BUDGET)}
        tw = srv.start(server)
        conn = http.client.HTTPConnection("127.0.0.1", tw.port, timeout=30)
        body = json.dumps("p" * (SIZE - 2)).encode()
        headers = {"Content-Type": "application/json"}

        def publish(channel: str) -> None:
            conn.request("POST", f"/channels/{channel}/events", body, headers)
            answer = conn.getresponse()
            answer.read()
            if answer.status != 201:
                raise RuntimeError(f"publish: {answer.status}")

        for i in range(20):
            publish(f"warm{i}")
        time.sleep(1.5)
        before = tw.rss()
        stalled = []
        for c in range(STALLED):
            sock = socket.create_connection(("127.0.0.1", tw.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            request = f"GET /channels/c{c}/events?after=0 HTTP/1.1\r\nHost: x\r\n"
            sock.sendall((request + "Accept: text/event-stream\r\n\r\n").encode())
            stalled.append(sock)
        t0 = time.monotonic()
        peak = before
        for i in range(PUBLISHES):
            publish(f"c{i % CHANNELS}")
            if i % 100 == 0:
                peak = max(peak, tw.rss())
        seconds = time.monotonic() - t0
        peak = max(peak, tw.rss())
        time.sleep(1.5)
        after = tw.rss()
        for sock in stalled:
            sock.close()
        conn.close()
    rows = [
        {
            "server": "tidewire (memory broker)",
            "published_mb": PUBLISHES * SIZE / 2**20,
            "budget_mb": BUDGET / 2**20,
            "growth_mb": (after - before) / 2**20,
            "peak_growth_mb": (peak - before) / 2**20,
            "seconds": seconds,
            "problems": [],
        }
    ]
    params = {"publishes": PUBLISHES, "size": SIZE, "channels": CHANNELS, "stalled": STALLED}
    return {"params": params, "rows": rows, "checks": [], "notes": []}


report.TITLES["w8"] = "W8 adversary: RSS growth under publishes 3.4x the retained budget"
report.EXPLAIN["w8"] = (
    "One `tidewire serve`, max_retained_bytes 32 MiB; 5 SSE subscribers that never read, "
    "then 1,000 publishes of 112 KiB over 200 channels. Growth = RSS after (1.5 s of quiet) "
    "minus before; peak = the highest RSS seen while publishing."
)
report.COLUMNS["w8"] = [
    ("server", lambda r: r["server"]),
    ("published MB", lambda r: report._n(r["published_mb"], 1)),
    ("budget MB", lambda r: report._n(r["budget_mb"], 1)),
    ("RSS growth MB", lambda r: report._n(r["growth_mb"], 1)),
    ("peak growth MB", lambda r: report._n(r["peak_growth_mb"], 1)),
    ("s", lambda r: report._n(r["seconds"], 1)),
]
