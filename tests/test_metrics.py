"""`GET /metrics`: values that move with traffic, the metrics token, and two workers summed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import QUICK, LiveServer, wait_for, wait_until_serving
from tests.test_cli import free_port
from tidewire import Settings, Tidewire

Serve = Callable[..., LiveServer]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text, by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(url: str, **headers: str) -> Samples:
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def counting_app(settings: Settings = QUICK) -> Tidewire:
    tw = Tidewire(settings=settings)

    @tw.stream
    async def count(n: int = 3) -> Any:
        for i in range(n):
            yield {"i": i}

    return tw


@pytest.fixture
def server(serve: Serve) -> LiveServer:
    return serve(counting_app(Settings(heartbeat=0.2, channel_max_len=5)))


# Metrics live in the process, and other tests in it count too: each check
# here is of how much a value moved, over traffic of this test's own.


def test_a_stream_counts_its_events_its_run_and_its_request(server: LiveServer) -> None:
    before = scrape(server.url)
    response = httpx.get(f"{server.url}/streams/count?n=5")
    assert response.status_code == 200 and len(response.text.splitlines()) == 6
    after = scrape(server.url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("tidewire_events_total", kind="run") == 6  # five, and `end`
    assert moved("tidewire_runs", state="finished") == 1
    route = {"route": "/streams/{name}"}
    assert moved("tidewire_http_requests_total", **route, status="200") == 1
    # A stream's time to its first byte, not its whole length, and only there.
    assert moved("tidewire_stream_start_seconds_count", **route) == 1
    assert moved("tidewire_http_request_duration_seconds_count", **route) == 0


def test_a_publish_counts_one_event_and_a_timed_request(server: LiveServer) -> None:
    before = scrape(server.url)
    for i in range(3):
        assert httpx.post(f"{server.url}/channels/m1/events", json=i).status_code == 201
    after = scrape(server.url)
    route = {"route": "/channels/{name}/events"}
    for name, labels, n in [
        ("tidewire_events_total", {"kind": "channel"}, 3),
        ("tidewire_http_requests_total", {**route, "status": "201"}, 3),
        ("tidewire_http_request_duration_seconds_count", route, 3),
        ("tidewire_http_request_duration_seconds_bucket", {**route, "le": "+Inf"}, 3),
    ]:
        assert value(after, name, **labels) - value(before, name, **labels) == n, name


def test_open_subscriptions_are_counted_by_transport_and_kind(server: LiveServer) -> None:
    sse = {"transport": "sse", "kind": "channel"}
    base = value(scrape(server.url), "tidewire_connections", **sse)
    with httpx.Client(timeout=10) as client:
        headers = {"accept": "text/event-stream"}
        with client.stream("GET", f"{server.url}/channels/m2/events", headers=headers) as r:
            assert r.status_code == 200
            wait_for(lambda: value(scrape(server.url), "tidewire_connections", **sse) == base + 1)
    # Closed by the client: the server sees it go and counts it out.
    wait_for(lambda: value(scrape(server.url), "tidewire_connections", **sse) == base)


def test_a_reader_told_of_a_gap_is_counted(server: LiveServer) -> None:
    ids = [httpx.post(f"{server.url}/channels/m3/events", json=i).json()["id"] for i in range(9)]
    before = value(scrape(server.url), "tidewire_gaps_total")
    with httpx.stream("GET", f"{server.url}/channels/m3/events?after={ids[0]}") as response:
        first = json.loads(next(response.iter_lines()))
    assert first["event"] == "gap"  # 5 retained of 9: 3 missed
    assert value(scrape(server.url), "tidewire_gaps_total") - before == 1


def test_upload_and_download_bytes(server: LiveServer) -> None:
    body = os.urandom(3000)
    before = scrape(server.url)
    info = httpx.put(f"{server.url}/files/m4.bin", content=body).json()
    whole = httpx.get(f"{server.url}/files/{info['id']}")
    part = httpx.get(f"{server.url}/files/{info['id']}", headers={"range": "bytes=0-99"})
    head = httpx.head(f"{server.url}/files/{info['id']}")
    assert (whole.content, part.status_code, head.status_code) == (body, 206, 200)
    after = scrape(server.url)
    up = value(after, "tidewire_upload_bytes_total") - value(before, "tidewire_upload_bytes_total")
    down = value(after, "tidewire_download_bytes_total") - value(
        before, "tidewire_download_bytes_total"
    )
    assert (up, down) == (3000, 3100)  # HEAD sends none


def test_routes_are_labelled_by_template_never_by_path(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/files/{'7' * 22}").status_code == 404
    assert httpx.get(f"{server.url}/no/such/path-xyzzy").status_code == 404
    # A lean route (a plain Starlette one, for streams) is named too.
    assert httpx.get(f"{server.url}/channels/m5/events?after=zz").status_code == 400
    text = httpx.get(f"{server.url}/metrics").text
    samples = parse(text)
    route = "/channels/{name}/events"
    assert value(samples, "tidewire_http_requests_total", route=route, status="400")
    assert value(samples, "tidewire_http_requests_total", route="/files/{file_id}", status="404")
    assert value(samples, "tidewire_http_requests_total", route="unmatched", status="404")
    assert "7" * 22 not in text and "xyzzy" not in text


def test_the_metrics_token_closes_metrics(serve: Serve) -> None:
    token = "metrics-token-0123456789"
    server = serve(counting_app(Settings(metrics_token=token)))
    url = f"{server.url}/metrics"
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": token}):
        refused = httpx.get(url, headers=headers)
        assert refused.status_code == 401, headers
        assert "metrics token" in refused.json()["detail"]
        assert refused.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(url, headers={"authorization": f"Bearer {token}"}).status_code == 200


def test_metrics_are_open_without_a_token_even_with_access_control(serve: Serve) -> None:
    # DESIGN.md, "Access control": /metrics is open unless --metrics-token is set.
    server = serve(counting_app(Settings(auth_secret="s" * 32)))
    assert httpx.get(f"{server.url}/streams/count").status_code == 401
    assert httpx.get(f"{server.url}/metrics").status_code == 200


# ------------------------------------------------------------------ two workers


@pytest.fixture
def two_workers(redis_server: Any, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`tidewire serve --workers 2`; yields its URL and the folder its private
    metrics folder is made in (TMPDIR)."""
    port = free_port()
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(TMPDIR=str(temp), PYTHONUNBUFFERED="1", TIDEWIRE_MAX_CONNECTIONS_PER_CLIENT="1000")
    args = ["--workers", "2", "--broker", redis_server.url, "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidewire", "serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url)
        yield url, temp
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
    assert not list(temp.glob("tidewire-metrics-*")), "the metrics folder outlived the server"


def _per_worker(folder: Path, name: str, **labels: str) -> dict[str, float]:
    """One metric's value in each worker's counter file (by pid)."""
    values: dict[str, float] = {}
    for path in folder.glob("counter_*.db"):
        merged = MultiProcessCollector.merge([str(path)], accumulate=True)
        for family in merged:
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    values[path.stem.rpartition("_")[2]] = s.value
    return values


def test_two_workers_are_summed(two_workers: tuple[str, Path]) -> None:
    url, temp = two_workers
    [folder] = temp.glob("tidewire-metrics-*")
    channel = {"kind": "channel"}
    published = 0
    # New connections until both workers have published some: the kernel
    # hands each to whichever worker accepts first.
    while (
        len([v for v in _per_worker(folder, "tidewire_events_total", **channel).values() if v]) < 2
    ):
        assert published < 400, "one worker took every connection"
        with httpx.Client() as client:
            assert client.post(f"{url}/channels/w/events", json=published).status_code == 201
        published += 1
    per_worker = _per_worker(folder, "tidewire_events_total", **channel)
    assert sum(per_worker.values()) == published and len(per_worker) >= 2

    # Held subscriptions, on both workers too (each on a connection of its own).
    stop = threading.Event()
    opened: list[httpx.Response] = []

    def subscribe() -> None:
        with (
            httpx.Client(timeout=30) as client,
            client.stream("GET", f"{url}/channels/w/events") as response,
        ):
            opened.append(response)
            stop.wait(30)

    readers = [threading.Thread(target=subscribe) for _ in range(6)]
    for reader in readers:
        reader.start()
    ndjson = {"transport": "ndjson", "kind": "channel"}
    try:
        wait_for(lambda: len(opened) == 6, timeout=10)
        # Whichever worker answers, it answers for both.
        for _ in range(8):
            with httpx.Client() as client:
                samples = parse(client.get(f"{url}/metrics").text)
            assert value(samples, "tidewire_events_total", **channel) == published
            assert value(samples, "tidewire_connections", **ndjson) == 6
            route = {"route": "/channels/{name}/events", "status": "201"}
            assert value(samples, "tidewire_http_requests_total", **route) == published
    finally:
        stop.set()
        for reader in readers:
            reader.join(10)


def test_a_killed_worker_stops_counting_in_live_gauges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from tidewire import metrics

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    key = mmap_key(
        "tidewire_connections",
        "tidewire_connections",
        ["transport", "kind"],
        ["sse", "channel"],
        "open streams",
    )
    for pid, open_streams in ((gone.pid, 5.0), (os.getpid(), 2.0)):
        db = MmapedDict(str(tmp_path / f"gauge_livesum_{pid}.db"))
        db.write_value(key, open_streams, 0.0)
        db.close()
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    samples = parse(metrics.exposition().decode())
    # Only the live process's 2: the dead one's 5 would be summed forever.
    assert value(samples, "tidewire_connections", transport="sse", kind="channel") == 2
    assert not (tmp_path / f"gauge_livesum_{gone.pid}.db").exists()


def test_a_bad_log_format_is_refused_clearly() -> None:
    from tests.test_cli import run_cli

    result = run_cli("serve", "--log-format", "xml")
    assert result.returncode == 2
    # The error names where the value came from: the flag.
    assert "--log-format" in result.stderr and "'text' or 'json'" in result.stderr
