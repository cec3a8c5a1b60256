"""Prometheus metrics: the metric objects, where they are counted cheaply, and `GET /metrics`.

Every metric docs/operations.md lists is defined here, once per process,
and counted where the thing happens: a connection when its stream opens and
closes, an event once when it is published (never per subscriber that
receives it: a channel may fan out to 10,000), a gap once per reader told.
Gauges that describe state (retained bytes) are sampled every `SAMPLE`
seconds and before each scrape rather than kept up to date on the hot path.

With `tidewire serve --workers N`, each worker counts in files under
`PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess mode, which
the supervisor switches on before the workers start) and `GET /metrics`,
whichever worker answers it, sums them all: counters over every worker that
ever ran (they never go back), gauges over the live ones (`livesum`).

`GET /metrics` is open, as `/healthz` is, unless `metrics_token` is set: then
it needs `Authorization: Bearer <metrics_token>` (DESIGN.md, "Access
control"). A scrape shows route names and how busy the server is, not data;
a server reachable by strangers should still set the token
(docs/operations.md), and `tidewire serve` warns when access control is on
without one.
"""

from __future__ import annotations

import asyncio
import glob
import hmac
import os
import re
from collections.abc import AsyncIterator, MutableMapping
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, HTTPException, Request
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import Response

if TYPE_CHECKING:
    from .app import Tidewire
    from .broker import Broker

__all__ = [
    "CONNECTIONS",
    "DOWNLOAD_BYTES",
    "EVENTS",
    "GAPS",
    "HTTP_DURATION",
    "HTTP_REQUESTS",
    "MULTIPROC_ENV",
    "RETAINED_BYTES",
    "RUNS",
    "STREAM_START",
    "UPLOAD_BYTES",
    "add_metrics_route",
    "connections",
    "count_download",
    "multiprocess_dir",
    "sample_forever",
    "uploaded",
    "worker_exited",
]

#: The variable that switches prometheus_client to its multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds between samples of the state gauges (retained bytes).
SAMPLE = 5.0

Transport = Literal["ndjson", "sse", "ws"]
LogKind = Literal["run", "channel"]

CONNECTIONS = Gauge(
    "tidewire_connections",
    "Open streams, subscriptions and WebSockets, by transport and by what they follow.",
    ["transport", "kind"],
    multiprocess_mode="livesum",
)
RUNS = Gauge(
    "tidewire_runs",
    "Runs this server executes, by state; ended ones stay until run_ttl expires them.",
    ["state"],
    multiprocess_mode="livesum",
)
EVENTS = Counter(
    "tidewire_events",
    "Events appended: yielded by runs (their final event included) or published to channels.",
    ["kind"],
)
GAPS = Counter(
    "tidewire_gaps",
    "gap notices sent to readers: a subscriber that fell behind, or asked from a trimmed "
    "or unknown position.",
)
RETAINED_BYTES = Gauge(
    "tidewire_retained_bytes",
    "Bytes of event history held in memory (a Redis broker: this process's copies).",
    multiprocess_mode="livesum",
)
UPLOAD_BYTES = Counter(
    "tidewire_upload_bytes", "Request body bytes received by file uploads (all kinds)."
)
DOWNLOAD_BYTES = Counter(
    "tidewire_download_bytes", "Response body bytes of file downloads sent by this server."
)
HTTP_REQUESTS = Counter(
    "tidewire_http_requests",
    "HTTP requests and WebSocket handshakes answered, by route template and status.",
    ["route", "status"],
)
HTTP_DURATION = Histogram(
    "tidewire_http_request_duration_seconds",
    "Time from a request to the end of its answer; streams and WebSockets excluded.",
    ["route"],
)
STREAM_START = Histogram(
    "tidewire_stream_start_seconds",
    "Time from a streaming request (NDJSON, SSE, WebSocket) to its first byte (or accept).",
    ["route"],
)

# The labelled children, made once: `labels()` takes a lock and a dict lookup
# per call, and connections open and close at the rate of clients.
_CONNECTIONS = {
    (transport, kind): CONNECTIONS.labels(transport, kind)
    for transport in ("ndjson", "sse", "ws")
    for kind in ("run", "channel")
}
_EVENTS = {kind: EVENTS.labels(kind) for kind in ("run", "channel")}
RUN_STATES = ("running", "finished", "failed", "cancelled")
_RUNS = {state: RUNS.labels(state) for state in RUN_STATES}


def connections(transport: Transport, kind: LogKind) -> Gauge:
    """Open connections of one transport and kind: `inc()` at open, `dec()` at close."""
    return _CONNECTIONS[(transport, kind)]


def count_events(kind: LogKind, n: int = 1) -> None:
    _EVENTS[kind].inc(n)


def run_started() -> None:
    _RUNS["running"].inc()


def run_ended(state: str) -> None:
    _RUNS["running"].dec()
    _RUNS[state].inc()


def run_forgotten(state: str) -> None:
    _RUNS[state].dec()


async def uploaded(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`chunks` (a request body), counted into `tidewire_upload_bytes_total` as they arrive."""
    async for chunk in chunks:
        UPLOAD_BYTES.inc(len(chunk))
        yield chunk


#: The scope key that tells the request middleware (server/observe.py) to count
#: a response's body bytes as a download.
DOWNLOAD_MARK = "tidewire.download"


def count_download(scope: MutableMapping[str, Any]) -> None:
    """Count the body of the answer to this request as downloaded bytes."""
    scope[DOWNLOAD_MARK] = True


# -- state gauges -------------------------------------------------------------


def sample(broker: Broker) -> None:
    """Set the gauges that describe state (not events) from this process's broker."""
    retained = getattr(broker, "retained_bytes", None)
    if isinstance(retained, int):
        RETAINED_BYTES.set(retained)


async def sample_forever(broker: Broker, every: float = SAMPLE) -> None:
    while True:
        sample(broker)
        await asyncio.sleep(every)


# -- several processes --------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The folder of the workers' metric files, when there are several workers."""
    return os.environ.get(MULTIPROC_ENV) or None


_LIVE_FILE = re.compile(r"gauge_live\w*_(\d+)\.db$")


def _forget_dead_workers(path: str) -> None:
    """Drop the live gauges of workers that are gone.

    A worker that exits cleanly does so itself (`worker_exited`); one that was
    killed cannot, and its open connections would be summed forever.
    """
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        match = _LIVE_FILE.search(name)
        if match is None:
            continue
        pid = int(match[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, someone else's


def worker_exited() -> None:
    """A worker's last word: its live gauges (connections, runs) stop counting."""
    path = multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(os.getpid(), path)  # type: ignore[no-untyped-call]


def exposition() -> bytes:
    """The metrics of this process, or of all the workers, as Prometheus text."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest(REGISTRY)
    _forget_dead_workers(path)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


# -- the route ----------------------------------------------------------------


def add_metrics_route(router: APIRouter, tw: Tidewire) -> None:
    """`GET /metrics`: Prometheus text; who may read it is the module docstring's."""
    token = tw.settings.metrics_token
    responses: dict[int | str, dict[str, Any]] = {
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}
    }
    if token is not None:
        responses[401] = {"description": "Needs `Authorization: Bearer <metrics token>`"}

    @router.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics of all workers",
        response_class=Response,
        responses=responses,
    )
    async def metrics(request: Request) -> Response:
        if token is not None:
            sent = request.headers.get("authorization", "")
            scheme, _, value = sent.partition(" ")
            # Constant time: a scraper's token must not be guessable byte by byte.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                value.strip().encode(), token.encode()
            ):
                raise HTTPException(
                    401,
                    "this server's metrics need 'Authorization: Bearer <metrics token>'",
                    {"WWW-Authenticate": 'Bearer realm="metrics"'},
                )
        sample(tw.broker)
        return Response(exposition(), media_type=CONTENT_TYPE_LATEST)
