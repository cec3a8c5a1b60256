"""The `tidewire` command, run as a user runs it: in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


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
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            break
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"server did not start: {proc.communicate()[0]}")
            time.sleep(0.1)
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
    assert first == {"id": "1", "event": "message", "data": {"hello": 1}}


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
