"""docs/deploy/nginx.conf, run for real: Debian's nginx in front of two
`tidewire serve` processes on Redis, driven with curl, httpx, websockets,
tuspy and Chromium.

The site file is used as it is, with only what it lists as site-specific
replaced (ports, paths) plus two timeouts shortened so that the tests of them
take 2 s rather than 10 and 30; each replaced directive must be in the file
exactly once, so a test cannot go on passing against a file that changed.
`main_config` plays Debian's /etc/nginx/nginx.conf, which includes it.

One nginx, one Redis and two processes serve the whole module. Tests that
count per address (quotas, limit_conn) connect from addresses of their own
(127.0.0.0/8 is all loopback): nginx reaches tidewire from 127.0.0.1, so a
test can tell the client's address from nginx's.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from playwright.sync_api import Page, sync_playwright
from tusclient import client as tus_client

from tests.conftest import wait_for, wait_until_serving
from tests.deploy.nginx_app import PUBLISH_BURST
from tests.redis_server import RedisServer
from tests.test_cli import free_port
from tests.web.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.wire import parse_sse, read_ws

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "docs" / "deploy" / "nginx.conf"
NGINX = os.environ.get("TIDEWIRE_NGINX", "/usr/sbin/nginx")
ACCEL = "/_tidewire_files/"

#: The file's timeouts, and the short ones the tests run with instead.
HEADER_TIMEOUT = ("client_header_timeout 10s;", "client_header_timeout 2s;")
BODY_TIMEOUT = ("client_body_timeout 30s;", "client_body_timeout 2s;")
#: limit_conn's number in the file: the test opens this many and one more.
PER_ADDRESS = 100
MIB = 1 << 20


def site_config(replace: dict[str, str]) -> str:
    """docs/deploy/nginx.conf with `replace`'s keys replaced on its directive
    lines (not its comments); each key must be on exactly one such line,
    except paths, which may be on several (`old` ending in `/`)."""
    lines = SITE.read_text().splitlines(keepends=True)
    for old, new in replace.items():
        hits = [
            i for i, line in enumerate(lines) if not line.lstrip().startswith("#") and old in line
        ]
        if old.endswith("/"):
            assert hits, f"{SITE} has no directive with {old!r}"
        else:
            assert len(hits) == 1, f"{SITE} should have {old!r} once, not {len(hits)} times"
        for i in hits:
            lines[i] = lines[i].replace(old, new)
    return "".join(lines)


def main_config(prefix: Path, site: Path) -> str:
    """What Debian's /etc/nginx/nginx.conf does, in a folder of the test's own."""
    # As root, nginx's workers would become `nobody`, who cannot read the test's
    # folders: they stay root (Debian's file says `user www-data`).
    user = "user root;" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
{user}
worker_processes 1;
daemon off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
events {{ worker_connections 1024; }}
http {{
    sendfile on;
    tcp_nopush on;
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log {prefix / "access.log"};
    gzip on;
{temp}
    include {site};
}}
"""


def self_signed(folder: Path) -> None:
    """fullchain.pem and privkey.pem for 127.0.0.1 and localhost, valid a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    folder.mkdir()
    (folder / "fullchain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "privkey.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@dataclass
class Deployment:
    http: str  # http://127.0.0.1:<port>, through nginx
    https: str  # the same site over TLS and HTTP/2
    upstreams: list[str]  # the tidewire processes, directly
    data: Path
    gates: Path
    prefix: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.http.rsplit(":", 1)[1])

    def client(self, address: str = "127.0.0.1", **kw: Any) -> httpx.Client:
        """A client of nginx's plain HTTP, connecting from `address`."""
        transport = httpx.HTTPTransport(local_address=address)
        return httpx.Client(base_url=self.http, transport=transport, timeout=15, **kw)

    def error_log(self) -> str:
        return (self.prefix / "error.log").read_text()


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if not Path(NGINX).exists():
        pytest.fail(
            f"nginx is not installed ({NGINX} is missing): run scripts/services, which "
            "installs Debian's nginx-light (or set TIDEWIRE_NGINX)"
        )
    tmp = tmp_path_factory.mktemp("nginx")
    prefix, data, gates = tmp / "nginx", tmp / "data", tmp / "gates"
    for folder in (prefix, data, gates):
        folder.mkdir()
    self_signed(tmp / "tls")
    with RedisServer(tmp / "redis") as redis:
        upstream_ports = [free_port(), free_port()]
        http_port, https_port = free_port(), free_port()
        deployment = Deployment(
            http=f"http://127.0.0.1:{http_port}",
            https=f"https://127.0.0.1:{https_port}",
            upstreams=[f"http://127.0.0.1:{p}" for p in upstream_ports],
            data=data,
            gates=gates,
            prefix=prefix,
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TIDEWIRE_ACCEL_REDIRECT": ACCEL}
        try:
            for port, url in zip(upstream_ports, deployment.upstreams, strict=True):
                args = ["serve", "tests.deploy.nginx_app:tw", "--port", str(port)]
                args += ["--broker", redis.url, "--data-dir", str(data)]
                args += ["--forwarded-allow-ips", "127.0.0.1", "--log-level", "warning"]
                with (tmp / f"tidewire-{port}.log").open("wb") as log:
                    process = subprocess.Popen(
                        [sys.executable, "-m", "tidewire", *args],
                        cwd=ROOT,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                deployment.processes.append(process)
                wait_until_serving(process, url, f"tidewire (log: {log.name})")

            site_file = prefix / "tidewire.conf"
            site_file.write_text(
                site_config(
                    {
                        "listen 80;": f"listen 127.0.0.1:{http_port};",
                        "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
                        "server 127.0.0.1:8001;": f"server 127.0.0.1:{upstream_ports[0]};",
                        "server 127.0.0.1:8002;": f"server 127.0.0.1:{upstream_ports[1]};",
                        "/srv/tidewire/data/files/": f"{data}/files/",
                        "/etc/ssl/tidewire/": f"{tmp / 'tls'}/",
                        HEADER_TIMEOUT[0]: HEADER_TIMEOUT[1],
                        BODY_TIMEOUT[0]: BODY_TIMEOUT[1],
                    }
                )
            )
            conf = prefix / "nginx.conf"
            conf.write_text(main_config(prefix, site_file))
            nginx = subprocess.Popen(
                [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deployment.processes.append(nginx)
            wait_until_serving(nginx, deployment.http, "nginx")
            yield deployment
        finally:
            for process in reversed(deployment.processes):
                stop(process)


# -- streams -------------------------------------------------------------------


class Curl:
    """`curl -N`, its output lines collected as they come, with the time each came."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            ["curl", "-sS", "-N", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.decode())

    def wait(self) -> int:
        """Wait for curl to end and its output to be read; its exit status."""
        status = self.process.wait(10)
        self.reader.join(10)
        return status

    def events(self) -> list[dict[str, Any]]:
        return parse_sse("".join(self.lines))[0]

    def close(self) -> None:
        stop(self.process, signal.SIGKILL)


@pytest.mark.parametrize("via", ["http/1.1", "https/2"])
def test_sse_events_pass_one_by_one(site: Deployment, via: str) -> None:
    gate = site.gates / via.replace("/", "-")
    base = site.http if via == "http/1.1" else site.https
    options = ["--http1.1"] if via == "http/1.1" else ["--http2", "-k"]
    curl = Curl(
        *options,
        "--compressed",  # asks for gzip, as browsers do
        "-H",
        "Accept: text/event-stream",
        "-w",
        "\n%{http_version}\n",
        f"{base}/streams/gated?gate={gate}&first=2",
    )
    try:
        # Both first events arrive while the generator waits at its gate: nothing
        # (proxy buffers, gzip) held them back for more.
        wait_for(lambda: len(curl.events()) >= 2, 10, f"events did not pass: {curl.lines}")
        assert [e["data"]["i"] for e in curl.events()] == [0, 1]
        assert curl.process.poll() is None and not gate.exists()
        gate.touch()
        assert curl.wait() == 0
        events = curl.events()
        assert [e["event"] for e in events] == ["message"] * 3 + ["end"]
        assert events[2]["data"]["after"] == "gate"
        assert curl.lines[-1].strip() == ("1.1" if via == "http/1.1" else "2")
    finally:
        curl.close()


def test_both_processes_serve(site: Deployment) -> None:
    # Two streams at once go to the two processes (least_conn): each names its pid.
    gate = site.gates / "both"
    curls = [
        Curl("-H", "Accept: text/event-stream", f"{site.http}/streams/gated?gate={gate}")
        for _ in range(2)
    ]
    try:
        for curl in curls:
            wait_for(lambda c=curl: len(c.events()) >= 1, 10, f"no event: {curl.lines}")
        pids = {curl.events()[0]["data"]["pid"] for curl in curls}
        assert pids == {p.pid for p in site.processes[:2]}
    finally:
        gate.touch()
        for curl in curls:
            curl.close()


def test_websockets_pass(site: Deployment) -> None:
    ws_base = site.http.replace("http://", "ws://")
    events = read_ws(f"{ws_base}/streams/ticks/ws?n=3")
    assert [e["data"] for e in events if e["event"] == "message"] == [0, 1, 2]
    assert events[-1]["event"] == "end"

    # A channel's WebSocket, with the publish going through nginx too (maybe
    # to the other process: Redis carries it across).
    from websockets.sync.client import connect

    with connect(f"{ws_base}/channels/ws-test/ws", open_timeout=10) as ws:
        with site.client("127.0.0.21") as client:
            assert client.post("/channels/ws-test/events", json={"x": 1}).status_code == 201
        frame = json.loads(ws.recv(timeout=10))
        assert frame["data"] == {"x": 1}


# -- uploads and downloads ---------------------------------------------------------


def test_uploads_pass_beyond_nginx_default_body_size(site: Deployment) -> None:
    data = os.urandom(5 * MIB)  # nginx refuses more than 1 MiB unless told otherwise
    with site.client("127.0.0.22") as client:
        put = client.put("/files/big.bin", content=data)
        assert put.status_code == 201, put.text
        assert put.json()["sha256"] == hashlib.sha256(data).hexdigest()

        # tus with tuspy, its PATCHes 3 MiB each.
        uploader = tus_client.TusClient(f"{site.http}/uploads/").uploader(
            file_stream=io.BytesIO(data), chunk_size=3 * MIB, metadata={"filename": "tus.bin"}
        )
        uploader.upload()
        head = client.head(uploader.url, headers={"tus-resumable": "1.0.0"})
        assert head.headers["upload-offset"] == str(len(data))
        meta = client.get(f"/files/{head.headers['tidewire-file']}/meta").json()
        assert meta["name"] == "tus.bin" and meta["sha256"] == hashlib.sha256(data).hexdigest()

        # Other bodies keep a small limit, refused by nginx as tidewire would: JSON.
        too_big = client.post("/channels/big/events", content=b"x" * (3 * MIB))
        assert too_big.status_code == 413
        assert too_big.headers["content-type"] == "application/json"
        assert "larger than" in too_big.json()["detail"]


def test_downloads_are_sent_by_nginx(site: Deployment) -> None:
    data = os.urandom(3 * MIB + 5)
    with site.client("127.0.0.23") as client:
        meta = client.put("/files/sent.bin", content=data).json()
        url = f"/files/{meta['id']}"
        etag = f'"{meta["sha256"]}"'

        # The file's time on disk is not its time in tidewire's index (here, as
        # after a restore from backup): the index's is the one sent, as without nginx.
        os.utime(site.data / "files" / meta["id"], (1e9, 1e9))
        # tidewire itself answers with the redirect and no bytes...
        direct = httpx.get(site.upstreams[0] + url, timeout=10)
        assert direct.headers["x-accel-redirect"] == ACCEL + meta["id"]
        assert direct.content == b""
        # ... which nginx follows, and keeps to itself.
        whole = client.get(url)
        assert whole.status_code == 200
        assert whole.content == data
        assert "x-accel-redirect" not in whole.headers
        assert whole.headers["etag"] == etag
        assert whole.headers["last-modified"] == direct.headers["last-modified"]
        assert whole.headers["content-type"] == "application/octet-stream"
        assert whole.headers["content-disposition"] == direct.headers["content-disposition"]
        assert whole.headers["x-content-type-options"] == "nosniff"
        assert whole.headers["content-security-policy"] == "sandbox"

        part = client.get(url, headers={"range": "bytes=10-19"})
        assert part.status_code == 206
        assert part.content == data[10:20]
        assert part.headers["content-range"] == f"bytes 10-19/{len(data)}"
        tail = client.get(url, headers={"range": "bytes=-5"})
        assert tail.status_code == 206 and tail.content == data[-5:]
        several = client.get(url, headers={"range": "bytes=0-1,100-101"})
        assert several.status_code == 206
        assert several.headers["content-type"].startswith("multipart/byteranges")
        assert data[:2] in several.content and data[100:102] in several.content
        # If-Range: the ETag that is sent is the one compared.
        same = client.get(url, headers={"range": "bytes=0-0", "if-range": etag})
        assert same.status_code == 206 and same.content == data[:1]
        dated = {"range": "bytes=0-0", "if-range": whole.headers["last-modified"]}
        assert client.get(url, headers=dated).status_code == 206
        changed = client.get(url, headers={"range": "bytes=0-0", "if-range": '"other"'})
        assert changed.status_code == 200 and changed.content == data
        # Conditional requests and refusals are still tidewire's.
        assert client.get(url, headers={"if-none-match": etag}).status_code == 304
        outside = client.get(url, headers={"range": f"bytes={len(data) + 10}-"})
        assert outside.status_code == 416 and "outside the file" in outside.json()["detail"]
        head = client.head(url)
        assert head.headers["content-length"] == str(len(data))
        # The internal location cannot be asked for from outside.
        assert client.get(ACCEL + meta["id"]).status_code == 404


# -- what one client may take ------------------------------------------------------------


def connect(site: Deployment, address: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", site.port), timeout=15, source_address=(address, 0)
    )


def closed_after(sock: socket.socket, trickle: bytes) -> float:
    """Send `trickle` a byte every 0.2 s until the server closes; the seconds it took."""
    start = time.monotonic()
    try:
        for byte in trickle:
            sock.sendall(bytes([byte]))
            time.sleep(0.2)
            sock.setblocking(False)
            try:
                if sock.recv(4096) == b"":
                    break
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return time.monotonic() - start


def test_slow_headers_are_cut(site: Deployment) -> None:
    with connect(site) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        # A header that never ends, a byte at a time: the connection lasts
        # as long as the timeout allows, not as long as the client likes.
        took = closed_after(sock, b"X-Slow: " + b"y" * 200)
    assert 1.5 < took < 8, took  # client_header_timeout (2 s here)
    assert "client timed out" in site.error_log()


def test_uploads_stream_through_and_stalled_ones_are_cut(site: Deployment) -> None:
    saving = site.data / "tmp"
    with connect(site, "127.0.0.24") as sock:
        start = time.monotonic()
        sock.sendall(
            b"PUT /files/stalled.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
            + b"z" * 1000
        )
        # tidewire is saving the file while the client still has most of it to
        # send: nginx passed the body on as it came, not once it had it all.
        wait_for(lambda: saving.is_dir() and any(saving.iterdir()), 10, "nothing reached tidewire")
        assert sock.recv(4096) == b""  # closed by nginx, after client_body_timeout (2 s)
        assert 1.5 < time.monotonic() - start < 8
    # tidewire saw the upload end, and kept none of it.
    wait_for(lambda: not any(saving.iterdir()), 10, "the partial file stayed")
    with site.client() as client:
        assert client.get("/files?name=stalled.bin").json() == []


def test_header_size_limits(site: Deployment) -> None:
    with site.client("127.0.0.25") as client:
        # 48 KiB of headers, 12 KiB a line: through.
        fits = {f"x-big-{i}": "a" * (12 << 10) for i in range(4)}
        assert client.get("/healthz", headers=fits).status_code == 200
        # Over 64 KiB in all, or one line over 16 KiB: 431, as tidewire answers.
        for headers in (
            {f"x-big-{i}": "a" * (15 << 10) for i in range(5)},
            {"x-big": "a" * (17 << 10)},
        ):
            refused = client.get("/healthz", headers=headers)
            assert refused.status_code == 431
            assert "64 KiB" in refused.json()["detail"]


def test_limit_conn_per_address(site: Deployment) -> None:
    request = b"GET /channels/crowd/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"

    def subscribe(address: str) -> tuple[socket.socket, bytes]:
        sock = connect(site, address)
        sock.sendall(request)
        return sock, sock.recv(4096)

    held = []
    try:
        for _ in range(PER_ADDRESS):
            sock, head = subscribe("127.0.0.26")
            held.append(sock)
            assert head.startswith(b"HTTP/1.1 200"), head
        sock, head = subscribe("127.0.0.26")
        held.append(sock)
        assert head.startswith(b"HTTP/1.1 429"), head
        assert b"retry-after: 5" in head.lower() and b"too many connections" in head
        # Another address is not affected...
        sock, head = subscribe("127.0.0.27")
        held.append(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        # ... and one closed frees a place.
        held.pop(0).close()

        def one_more() -> bool:
            sock, head = subscribe("127.0.0.26")
            held.append(sock)
            return head.startswith(b"HTTP/1.1 200")

        wait_for(one_more, 10, "a closed connection did not free its place")
    finally:
        for sock in held:
            sock.close()


def test_quotas_count_the_client_address(site: Deployment) -> None:
    def publish(address: str, **headers: str) -> httpx.Response:
        with site.client(address) as client:
            return client.post("/channels/quota/events", json=1, headers=headers)

    for _ in range(PUBLISH_BURST):
        assert publish("127.0.0.28").status_code == 201
    over = publish("127.0.0.28")
    assert over.status_code == 429 and "publish" in over.json()["detail"]
    # Through nginx, tidewire counts each address apart (without
    # --forwarded-allow-ips, all would be nginx's 127.0.0.1, and over)...
    assert publish("127.0.0.29").status_code == 201
    # ... and an X-Forwarded-For of the client's own does not make it another:
    # nginx replaces it, even from an address tidewire trusts.
    # (Appended to, it would name the spent address, which tidewire would believe
    # of its trusted 127.0.0.1.)
    assert publish("127.0.0.1", **{"x-forwarded-for": "127.0.0.28"}).status_code == 201


# -- TLS and HTTP/2 in a browser ------------------------------------------------------------


OPEN_EIGHT = """(channel) => {
    window.opened = 0;
    window.received = 0;
    for (let i = 0; i < 8; i++) {
        const source = new EventSource(`/channels/${channel}/events`);
        source.onopen = () => { window.opened++; };
        source.onmessage = () => { window.received++; };
    }
    return performance.getEntriesByType('navigation')[0].nextHopProtocol;
}"""


def eight_event_sources(page: Page, site: Deployment, base: str, channel: str) -> str:
    page.goto(f"{base}/healthz")
    protocol: str = page.evaluate(OPEN_EIGHT, channel)
    return protocol


def test_eight_event_sources_over_http2(site: Deployment) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(ignore_https_errors=True)  # the self-signed cert
            with site.client("127.0.0.31") as client:
                # Over HTTP/2 all eight share one connection, and all get the event.
                page = context.new_page()
                assert eight_event_sources(page, site, site.https, "eight") == "h2"
                page.wait_for_function("window.opened === 8", timeout=10_000)
                assert client.post("/channels/eight/events", json="hi").status_code == 201
                page.wait_for_function("window.received === 8", timeout=10_000)
                page.close()

                # Over HTTP/1.1 the browser opens six connections to a host and
                # no more: the seventh and eighth wait while the six stay open.
                page = context.new_page()
                assert eight_event_sources(page, site, site.http, "six") == "http/1.1"
                page.wait_for_function("window.opened === 6", timeout=10_000)
                assert client.post("/channels/six/events", json="hi").status_code == 201
                page.wait_for_function("window.received === 6", timeout=10_000)
                time.sleep(1)
                assert page.evaluate("[window.opened, window.received]") == [6, 6]
                page.close()
            context.close()
        finally:
            browser.close()
