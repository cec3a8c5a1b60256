"""The `tidewire` command, run as a user runs it: in a subprocess."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_until_serving


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidewire", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=30,
    )


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """`python -m tidewire serve <args>` on a free port; yields its URL."""
    port = free_port()
    args = [*request.param, "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidewire", "serve", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(proc, url)
    yield url
    proc.terminate()
    output = proc.communicate(timeout=10)[0]
    if not request.param:  # no app given: the demo, and a line saying where it is
        assert f"serving the demo on {url}" in output


@pytest.mark.parametrize("server", [[]], indirect=True)
def test_serve_with_no_app_serves_the_demo(server: str) -> None:
    names = [s["name"] for s in httpx.get(f"{server}/streams").json()]
    assert names == ["demo"]
    lines = httpx.get(f"{server}/streams/demo?n=2&interval=0").text.splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["message", "message", "end"]
    assert events[1]["data"]["text"] == "1"
    published = httpx.post(f"{server}/channels/anyone/events", json={"hello": 1})
    assert published.status_code == 201
    with httpx.stream("GET", f"{server}/channels/anyone/events?after=0") as replay:
        first = json.loads(next(replay.iter_lines()))
    assert first == {"id": published.json()["id"], "event": "message", "data": {"hello": 1}}


APP = """
from tidewire import Tidewire

tw = Tidewire()

@tw.stream
def hello(who: str = "world"):
    yield f"hello {who}"
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "myapp.py").write_text(APP)
    return tmp_path


def test_serve_an_app_from_the_current_folder(app_dir: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidewire", "serve", "myapp:tw", "--port", str(port)],
        cwd=app_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/streams/hello?who=you", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        first = json.loads(response.text.splitlines()[0])
        assert first["data"] == "hello you"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nosuchmodule:tw", "no module named 'nosuchmodule'"),
        ("myapp:nothing", "has no attribute 'nothing'"),
        ("myapp", "module:attribute"),
    ],
)
def test_serve_explains_a_bad_app(app_dir: Path, target: str, message: str) -> None:
    result = run_cli("serve", target, cwd=app_dir)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_version_and_help() -> None:
    from tidewire import __version__

    assert run_cli("version").stdout.strip() == __version__
    help_text = run_cli("serve", "--help").stdout
    assert "--port" in help_text and "--host" in help_text


def test_several_workers_need_a_shared_broker() -> None:
    result = run_cli("serve", "--workers", "2")
    assert result.returncode == 2
    assert "--workers 2 needs a broker that the workers share" in result.stderr
    assert "--broker redis://" in result.stderr


def test_an_unknown_broker_is_refused_clearly() -> None:
    result = run_cli("serve", "--broker", "kafka://x")
    assert result.returncode != 0
    assert "unknown broker 'kafka://x'" in result.stderr + result.stdout


# -- access control --------------------------------------------------------

SECRET = "c" * 32
NO_FILE = "/files/" + "0" * 22  # a well-formed id that no file has


def admin_token() -> str:
    import jwt

    claims = {"sub": "root", "exp": time.time() + 60, "tidewire": {"admin": True}}
    return jwt.encode(claims, SECRET)


@contextlib.contextmanager
def serving(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[tuple[str, list[str]]]:
    """`tidewire serve <args>` on a free port: yields its URL, and a list that
    holds everything it printed once it has stopped."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidewire", "serve", *args, "--port", str(port)],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    output: list[str] = []
    try:
        wait_until_serving(proc, url)
        yield url, output
    finally:
        proc.terminate()
        output.append(proc.communicate(timeout=10)[0])


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_is_127_8_ipv6_1_and_localhost(host: str, loopback: bool) -> None:
    from tidewire.cli import is_loopback

    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "myhost.example"])
def test_a_public_host_needs_auth_or_no_auth(host: str) -> None:
    result = run_cli("serve", "--host", host)
    assert result.returncode == 2, result.stderr
    assert "--auth-secret" in result.stderr and "--no-auth" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no-auth", "--auth-secret", SECRET], "contradict"),
        (["--auth-secret", "short"], "at least 32 bytes"),
        (["--auth-public-key", "/nonexistent/key.pem"], "/nonexistent/key.pem"),
        (["--auth-secret", SECRET, "--auth-jwks", "https://x.example/jwks"], "exactly one"),
    ],
)
def test_bad_access_control_flags_are_explained(args: list[str], message: str) -> None:
    result = run_cli("serve", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("server", [["--host", "0.0.0.0", "--no-auth"]], indirect=True)
def test_no_auth_serves_a_public_host_open(server: str) -> None:
    assert httpx.get(f"{server}{NO_FILE}").status_code == 404


def test_auth_and_origin_flags_reach_the_app() -> None:
    friend, evil = "https://app.example", "https://evil.example"
    admin = {"authorization": f"Bearer {admin_token()}"}
    with serving("--host", "0.0.0.0", "--auth-secret", SECRET, "--allow-origin", friend) as (
        url,
        _,
    ):
        assert httpx.get(url + NO_FILE).status_code == 401
        assert httpx.get(url + NO_FILE, headers=admin).status_code == 404
        publish = f"{url}/channels/room/events"
        assert httpx.post(publish, json=1, headers={**admin, "origin": friend}).status_code == 201
        assert httpx.post(publish, json=1, headers={**admin, "origin": evil}).status_code == 403


def test_access_control_from_the_environment() -> None:
    env = {
        "TIDEWIRE_AUTH_SECRET": SECRET,
        "TIDEWIRE_ALLOW_ORIGINS": "https://a.example, https://b.example",
    }
    admin = {"authorization": f"Bearer {admin_token()}"}
    with serving("--host", "0.0.0.0", env=env) as (url, _):
        assert httpx.get(url + NO_FILE).status_code == 401
        for origin, status in (("https://a.example", 201), ("https://b.example", 201)):
            response = httpx.post(
                f"{url}/channels/room/events", json=1, headers={**admin, "origin": origin}
            )
            assert response.status_code == status, origin
    # A flag wins over the variable.
    with serving("--allow-origin", "https://c.example", env=env) as (url, _):
        response = httpx.post(
            f"{url}/channels/room/events", json=1, headers={**admin, "origin": "https://a.example"}
        )
        assert response.status_code == 403


def test_workers_get_the_access_control_flags(redis_server: Any) -> None:
    args = ["--workers", "2", "--broker", redis_server.url, "--auth-secret", SECRET]
    with serving(*args) as (url, _):
        # New connections, spread over both workers: none is open.
        for _ in range(10):
            with httpx.Client() as client:
                assert client.get(url + NO_FILE).status_code == 401


OWN_SETTINGS_APP = """
from tidewire import Settings, Tidewire

tw = Tidewire(settings=Settings(heartbeat=5))
"""


def test_an_app_with_its_own_settings_cannot_drop_the_flags(tmp_path: Path) -> None:
    (tmp_path / "own.py").write_text(OWN_SETTINGS_APP)
    result = run_cli("serve", "own:tw", "--auth-secret", SECRET, cwd=tmp_path)
    assert result.returncode == 2
    assert "--auth-secret" in result.stderr and "Settings.from_env" in result.stderr


def test_an_app_with_its_own_settings_cannot_drop_any_setting(tmp_path: Path) -> None:
    (tmp_path / "own.py").write_text(OWN_SETTINGS_APP)
    (tmp_path / "c.toml").write_text("max_event_bytes = 5000\n")
    result = run_cli("serve", "own:tw", "--lease", "3", "--config", "c.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert "leave out --lease, --max-event-bytes:" in result.stderr
    # Its own value, given again, is not left out.
    assert (
        "--heartbeat"
        not in run_cli("serve", "own:tw", "--heartbeat", "5", "--lease", "3", cwd=tmp_path).stderr
    )


def test_tokens_and_link_signatures_stay_out_of_the_log() -> None:
    from websockets.sync.client import connect

    with serving("--auth-secret", SECRET, "--log-level", "info") as (url, output):
        httpx.get(f"{url}{NO_FILE}?access_token=SECRETVALUE1")
        httpx.get(f"{url}{NO_FILE}?download=1&exp=1&sig=SECRETVALUE2")
        httpx.get(f"{url}{NO_FILE}?access%5Ftoken=SECRETVALUE3")
        token = admin_token()
        ws = url.replace("http:", "ws:")
        with connect(f"{ws}/channels/room/ws?access_token={token}"):
            pass
    log = output[0]
    assert f"GET {NO_FILE}?access_token=*** HTTP/1.1" in log  # the lines are there
    assert "download=1&exp=1&sig=***" in log
    assert "WebSocket /channels/room/ws?access_token=***" in log
    for secret in ("SECRETVALUE1", "SECRETVALUE2", "SECRETVALUE3", token):
        assert secret not in log


def test_forwarded_headers_only_from_the_allowed_proxies() -> None:
    proxied = {"host": "tw.example", "x-forwarded-proto": "https", "origin": "https://tw.example"}
    for args, status in (([], 201), (["--forwarded-allow-ips", "192.0.2.1"], 403)):
        with serving(*args) as (url, _):
            response = httpx.post(f"{url}/channels/room/events", json=1, headers=proxied)
            assert response.status_code == status, args


def exact_request(size: int) -> bytes:
    """A GET /healthz whose request line and headers are exactly `size` bytes."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: "
    return head + b"a" * (size - len(head) - 4) + b"\r\n\r\n"


def answer(port: int, request: bytes) -> bytes:
    """What the server answers `request` with (its status line onwards), or b"" if it hung up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # Refused before all of it was sent: the answer may still be there.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(request)
        received = b""
        try:
            while b"\r\n\r\n" not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass
        return received


@pytest.fixture
def limited_server(tmp_path: Path) -> Iterator[int]:
    """`tidewire serve` with a 1 s header timeout and 1000-byte events; yields its port."""
    port = free_port()
    env = {**os.environ, "TIDEWIRE_HEADER_TIMEOUT": "1", "TIDEWIRE_MAX_EVENT_BYTES": "1000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidewire", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until_serving(proc, f"http://127.0.0.1:{port}")
    yield port
    proc.terminate()
    proc.wait(10)


def test_serve_refuses_headers_over_max_header_bytes_with_431(limited_server: int) -> None:
    limit = 64 << 10
    for size in (limit - 1, limit):
        assert answer(limited_server, exact_request(size)).startswith(b"HTTP/1.1 200"), size
    for size in (limit + 1, 1 << 20, 16 << 20):
        reply = answer(limited_server, exact_request(size))
        assert reply.startswith(b"HTTP/1.1 431"), (size, reply[:100])
    # And the server is none the worse for them.
    assert httpx.get(f"http://127.0.0.1:{limited_server}/healthz", timeout=5).status_code == 200


def test_serve_closes_a_connection_whose_headers_dribble(limited_server: int) -> None:
    """Headers at a few bytes a second are cut off after header_timeout (1 s here)."""
    request = exact_request(1000)
    with socket.create_connection(("127.0.0.1", limited_server), timeout=10) as sock:
        sock.settimeout(0.2)
        began = time.monotonic()
        closed_after = None
        for i in range(50):  # 10 s of dribbling, ten times the timeout
            try:
                sock.send(request[i : i + 1])
                if sock.recv(100) == b"":
                    closed_after = time.monotonic() - began
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - began
                break
        assert closed_after is not None, "a dribbling client was kept"
    # A prompt client on a fresh connection is served as usual.
    assert answer(limited_server, exact_request(1000)).startswith(b"HTTP/1.1 200")


def test_serve_refuses_a_websocket_frame_over_max_event_bytes_in_the_server(
    limited_server: int,
) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url = f"ws://127.0.0.1:{limited_server}/channels/big/ws"
    with connect(url, max_size=None) as ws:
        ws.send(b"z" * 1000)
        ws.recv(timeout=5)  # published, and back to its subscriber
        ws.send(b"z" * 1001)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
        assert ws.close_code == 1009
        # uvicorn's reason, not the app's: the frame was refused before it was buffered.
        assert "frames may be at most" not in (ws.close_reason or "")


# -- configuration: --config, TIDEWIRE_*, flags; --print-config --------------------


def serve_options() -> dict[str, Any]:
    """`tidewire serve`'s options (click's), by each of their names."""
    import typer.main

    from tidewire.cli import cli

    group = typer.main.get_command(cli)
    command = group.get_command(typer.Context(group), "serve")  # type: ignore[attr-defined]
    assert command is not None
    return {name: p for p in command.params for name in (*p.opts, *p.secondary_opts)}


def test_every_setting_has_a_flag_with_its_doc() -> None:
    from tidewire.cli_settings import flag_name
    from tidewire.config import Settings, field_docs

    options = serve_options()
    hints = typing.get_type_hints(Settings)
    for field in dataclasses.fields(Settings):
        assert flag_name(field.name) in options, field.name
        if hints[field.name] is bool:
            assert "--no-" + flag_name(field.name)[2:] in options, field.name
    # Flags made from the fields say what the field's comment says.
    docs = field_docs()
    assert (options["--max-event-bytes"].help or "").startswith(docs["max_event_bytes"])
    assert (options["--cancel-on-disconnect"].help or "").startswith(docs["cancel_on_disconnect"])
    # The flags declared by hand keep their names.
    for name in ("--broker", "--storage", "--data-dir", "--auth-secret", "--allow-origin"):
        assert name in options


def print_config(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidewire", "serve", "--print-config", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=30,
    )


def test_settings_come_from_the_file_then_the_variables_then_the_flags(tmp_path: Path) -> None:
    (tmp_path / "tidewire.toml").write_text(
        "heartbeat = 3\n"
        "max_event_bytes = 5000\n"
        "lease = 2.5\n"
        "cancel_on_disconnect = false\n"
        'allow_origins = ["https://file.example"]\n'
        'broker = "redis://file:6379/0"\n'
        'data_dir = "files"\n'
    )
    env = {
        "TIDEWIRE_MAX_EVENT_BYTES": "6000",
        "TIDEWIRE_LEASE": "4",
        "TIDEWIRE_BROKER": "redis://env:6379/0",
        "TIDEWIRE_ALLOW_ORIGINS": "https://a.example,https://b.example",
    }
    flags = ["--lease", "8", "--cancel-on-disconnect", "--broker", "redis://flag:6379/0"]
    result = print_config(
        "--config", "tidewire.toml", *flags, "--max-file-size", "none", env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)
    assert printed["heartbeat"] == 3.0 and printed["data_dir"] == "files"  # the file
    assert printed["max_event_bytes"] == 6000  # a variable over the file
    assert printed["allow_origins"] == ["https://a.example", "https://b.example"]
    assert printed["lease"] == 8.0  # a flag over both
    assert printed["cancel_on_disconnect"] is True
    assert printed["broker"] == "redis://flag:6379/0"
    assert printed["max_file_size"] == "none"
    assert printed["run_window"] == 256  # the default
    # TIDEWIRE_CONFIG names the file too.
    again = print_config(env={"TIDEWIRE_CONFIG": str(tmp_path / "tidewire.toml")})
    assert tomllib.loads(again.stdout)["heartbeat"] == 3.0


@pytest.mark.parametrize(
    ("args", "env", "file", "message"),
    [
        (
            ["--max-event-bytes", "big"],
            {},
            "",
            "--max-event-bytes: Input should be a valid integer",
        ),
        (["--lease", "soon"], {}, "", "--lease: Input should be a valid number"),
        (
            [],
            {"TIDEWIRE_HEARTBEAT": "soon"},
            "",
            "TIDEWIRE_HEARTBEAT: Input should be a valid number",
        ),
        (
            [],
            {},
            'max_event_bytes = "x"',
            "config.toml: max_event_bytes: Input should be a valid integer",
        ),
        ([], {}, "hearbeat = 1", "config.toml: hearbeat: no such setting"),
        ([], {}, "heartbeat = 0", "heartbeat must be positive"),
        (["--config", "missing.toml"], {}, "", "missing.toml: no such file"),
    ],
)
def test_a_bad_setting_is_named_with_its_source(
    tmp_path: Path, args: list[str], env: dict[str, str], file: str, message: str
) -> None:
    if file:
        (tmp_path / "config.toml").write_text(file + "\n")
        args = ["--config", "config.toml", *args]
    for command in (["serve"], ["serve", "--print-config"]):
        result = subprocess.run(
            [sys.executable, "-m", "tidewire", *command, *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, **env},
            timeout=30,
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"Error: {message}" in result.stderr
        assert "Traceback" not in result.stderr


def test_print_config_masks_the_secrets(tmp_path: Path) -> None:
    env = {"TIDEWIRE_AUTH_SECRET": SECRET, "TIDEWIRE_LINK_SECRET": "LINKVALUE"}
    broker = "redis://tw:hunter2@redis.internal:6379/0"
    storage = "s3://bucket/p?endpoint=http://minio:9000&secret_key=KEYVALUE"
    result = print_config("--broker", broker, "--storage", storage, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for secret in (SECRET, "LINKVALUE", "hunter2", "KEYVALUE"):
        assert secret not in result.stdout
    printed = tomllib.loads(result.stdout)
    assert printed["broker"] == "redis://tw:***@redis.internal:6379/0"
    assert printed["storage"] == "s3://bucket/p?endpoint=http://minio:9000&secret_key=***"
    assert printed["auth_secret"] == printed["link_secret"] == "***"


def test_workers_run_with_the_settings_of_the_file_the_variables_and_the_flags(
    redis_server: Any, tmp_path: Path
) -> None:
    # A Redis user with a password: the broker URL carries a secret.
    redis_server.client().acl_setuser(
        "tw-config",
        enabled=True,
        passwords=["+hunter2"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    broker = f"redis://tw-config:hunter2@127.0.0.1:{redis_server.port}/0"
    (tmp_path / "config.toml").write_text(
        f'broker = "{broker}"\nsse_retry_ms = 1234\nmax_event_bytes = 99999\n'
    )
    env = {"TIDEWIRE_MAX_EVENT_BYTES": "500"}  # over the file's
    args = ["--workers", "2", "--config", "config.toml", "--max-body-bytes", "300"]
    channel = f"/channels/config-{os.getpid()}/events"
    with serving(*args, env=env, cwd=tmp_path) as (url, output):
        # New connections, spread over both workers: each has every setting.
        for _ in range(10):
            with httpx.Client(base_url=url, timeout=10) as http:
                sse = http.get("/streams/demo?n=1", headers={"accept": "text/event-stream"})
                assert "retry: 1234" in sse.text  # the file
                assert http.post(channel, json="x" * 400).status_code == 201
                assert http.post(channel, json="x" * 600).status_code == 413  # the variable
                assert (
                    http.post("/streams/demo", json={"n": 1, "pad": "x" * 400}).status_code == 413
                )
    log = output[0]
    assert f"2 workers on redis://tw-config:***@127.0.0.1:{redis_server.port}/0" in log
    assert "hunter2" not in log


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1, signed by itself: (key file, certificate file)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = folder / "key.pem", folder / "cert.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


def test_serve_https_with_a_key_and_a_certificate(tmp_path: Path) -> None:
    key, cert = self_signed_certificate(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    port = free_port()
    args = ["--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidewire", "serve", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"{url}/streams/demo?n=2", verify=trust, timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "no HTTPS server"
                time.sleep(0.1)
        assert response.status_code == 200 and len(response.text.splitlines()) == 3
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0]
    assert f"serving the demo on {url}" in output


def test_a_key_without_a_certificate_is_refused() -> None:
    result = run_cli("serve", "--ssl-keyfile", "key.pem")
    assert result.returncode == 2
    assert "--ssl-keyfile and --ssl-certfile together" in result.stderr
