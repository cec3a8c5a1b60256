"""The client commands of `tidewire`, run as a script runs them: a subprocess against a real server.

What is checked is what scripts rely on: stdout is JSON (one event or one file per line),
errors are one line on stderr, and the exit status says what went wrong.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import QUICK, LiveServer, wait_for
from tests.test_demo import check_png
from tidewire import Settings, Tidewire
from tidewire.demo import demo
from tidewire.storage.local import LocalStorage

Serve = Callable[..., LiveServer]
SECRET = "the development secret, 32 bytes or more"


def make_app(tmp_path: Path, settings: Settings = QUICK) -> tuple[Tidewire, threading.Event]:
    """The demo stream, one that fails, one that runs until cancelled (it sets the event)."""
    tw = Tidewire(settings=settings, storage=LocalStorage(tmp_path / "data"))
    tw.stream(name="demo")(demo)
    closed = threading.Event()

    @tw.stream
    async def fails(upto: int = 2) -> AsyncIterator[int]:
        for i in range(upto):
            yield i
        raise ValueError("the sensor is unplugged")

    @tw.stream
    async def forever() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.02)
        finally:
            closed.set()

    return tw, closed


@pytest.fixture
def server(serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LiveServer:
    # Resumable uploads are remembered in the user's cache: this test's own, here.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return serve(make_app(tmp_path)[0])


def tidewire(
    server: LiveServer | str, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    url = server if isinstance(server, str) else server.url
    env = {k: v for k, v in os.environ.items() if k != "TIDEWIRE_URL"}
    env["COLUMNS"] = env["TERMINAL_WIDTH"] = "200"  # usage errors on one line, unwrapped
    return subprocess.run(
        [sys.executable, "-m", "tidewire", *args, "--url", url],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env=env,
    )


def lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error a command printed: one line, no traceback."""
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("tidewire: error: ")
    return line


# --- streams ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["ndjson", "sse", "ws"])
def test_stream_prints_one_json_event_per_line(server: LiveServer, transport: str) -> None:
    result = tidewire(server, "stream", "demo", "-p", "n=3", "-p", "interval=0", "-t", transport)
    events = lines(result)
    assert [e["event"] for e in events] == ["message", "message", "message", "end"]
    assert [e["data"]["text"] for e in events[:3]] == ["0", "1", "2"]
    assert len({e["id"] for e in events}) == 4
    # Images come back as the contract's tagged objects, bytes intact.
    blob = events[0]["data"]["img"]["$blob"]
    raw = base64.b64decode(blob["data"])
    assert blob["type"] == "image/png" and blob["size"] == len(raw)
    check_png(raw)


def test_save_blobs_writes_the_images_to_files(server: LiveServer, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    events = lines(tidewire(server, "stream", "demo", "-p", "n=2", "--save-blobs", str(folder)))
    assert len(events) == 3
    paths = [Path(e["data"]["img"]["$blob"]["path"]) for e in events[:2]]
    assert paths == [folder / f"{events[0]['id']}-1.png", folder / f"{events[1]['id']}-1.png"]
    for event, path in zip(events, paths, strict=False):
        assert event["data"]["img"]["$blob"]["size"] == path.stat().st_size
        check_png(path.read_bytes())
    assert sorted(folder.iterdir()) == sorted(paths)


def test_a_string_parameter_stays_a_string(server: LiveServer) -> None:
    # `n=two` does not parse as JSON, so it goes as the string "two": the server says why not.
    result = tidewire(server, "stream", "demo", "-p", "n=two")
    assert result.returncode == 4
    assert "n: " in one_line_error(result)


def test_watch_a_run_after_an_event(server: LiveServer) -> None:
    started = httpx.post(f"{server.url}/streams/demo?detach=true", json={"n": 5, "interval": 0})
    run = started.json()["run"]
    wait_for(lambda: httpx.get(f"{server.url}/runs/{run}").json()["state"] == "finished")
    everything = lines(tidewire(server, "watch", run))
    assert [e["event"] for e in everything] == ["message"] * 5 + ["end"]
    rest = lines(tidewire(server, "watch", run, "--after", everything[1]["id"], "-t", "sse"))
    assert rest == everything[2:]


def test_a_failing_run_exits_1_with_its_error(server: LiveServer) -> None:
    result = tidewire(server, "stream", "fails", "-p", "upto=2")
    assert result.returncode == 1
    assert [json.loads(line)["data"] for line in result.stdout.splitlines()] == [0, 1]
    assert "ValueError: the sensor is unplugged" in one_line_error(result)


def test_an_unknown_stream_exits_4_with_the_servers_message(server: LiveServer) -> None:
    result = tidewire(server, "stream", "nosuch")
    assert result.returncode == 4
    assert "no stream named 'nosuch'" in one_line_error(result)
    assert result.stdout == ""


def test_no_server_exits_3() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        result = tidewire(url, "stream", "demo")
    assert result.returncode == 3
    assert "cannot connect" in one_line_error(result)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stream", "demo", "-p", "n"], "write parameters as key=value"),
        (["stream", "demo", "-t", "carrier-pigeon"], "carrier-pigeon"),
        (["publish", "news"], "give the event's DATA, or --file"),
    ],
)
def test_usage_errors_exit_2(server: LiveServer, args: list[str], message: str) -> None:
    result = tidewire(server, *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_a_url_that_is_not_http_is_a_usage_error() -> None:
    result = tidewire("ftp://example.org", "files")
    assert result.returncode == 2
    assert "not an http:// or https:// URL" in result.stderr


def test_ctrl_c_cancels_the_run_and_exits_130(serve: Serve, tmp_path: Path) -> None:
    # Watchers that leave only end the run after a long grace here: if the generator is
    # closed when the command has exited, the command cancelled the run itself.
    patient = Settings(heartbeat=0.3, disconnect_grace=60.0, close_timeout=2.0)
    tw, closed = make_app(tmp_path, patient)
    server = serve(tw)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidewire", "stream", "forever", "--url", server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["data"] == 0
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 130
    assert closed.is_set()
    assert "Traceback" not in err
    for line in out.splitlines():  # every line written is whole
        assert json.loads(line)["event"] in ("message", "cancelled")


# --- channels --------------------------------------------------------------------------------


def test_publish_then_subscribe_from_the_start(server: LiveServer, tmp_path: Path) -> None:
    picture = tmp_path / "dot.png"
    picture.write_bytes(base64.b64decode(demo_image(server)))
    ids = [
        tidewire(server, "publish", "news", '{"headline": "tides are up"}').stdout.strip(),
        tidewire(server, "publish", "news", "just words", "--event", "note").stdout.strip(),
        tidewire(server, "publish", "news", '{"by": "ann"}', "--file", str(picture)).stdout.strip(),
    ]
    assert all(ids) and len(set(ids)) == 3
    events = lines(tidewire(server, "subscribe", "news", "--after", "0", "--count", "3"))
    assert [e["id"] for e in events] == ids
    assert events[0]["event"] == "message" and events[0]["data"] == {"headline": "tides are up"}
    assert events[1]["event"] == "note" and events[1]["data"] == "just words"
    attached = events[2]["data"]
    assert attached["by"] == "ann"
    blob = attached["dot.png"]["$blob"]
    assert blob["type"] == "image/png"
    assert base64.b64decode(blob["data"]) == picture.read_bytes()
    # The same from the second event on, over a WebSocket.
    again = lines(tidewire(server, "subscribe", "news", "--after", ids[0], "-n", "2", "-t", "ws"))
    assert again == events[1:]


def test_subscribe_prints_live_events_as_they_come(server: LiveServer) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidewire", "subscribe", "live", "--url", server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        received: list[dict[str, Any]] = []
        reader = threading.Thread(
            target=lambda: received.append(json.loads(proc.stdout.readline())),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        # Live means from when it connected: publish until the subscriber has one.
        sent = 0
        while reader.is_alive() and sent < 200:
            httpx.post(f"{server.url}/channels/live/events", json={"n": sent})
            sent += 1
            reader.join(0.05)
        assert received and received[0]["event"] == "message"
        assert received[0]["data"]["n"] < sent
    finally:
        proc.terminate()
        proc.wait(10)


def demo_image(server: LiveServer) -> str:
    first = httpx.get(f"{server.url}/streams/demo?n=1&interval=0").text.splitlines()[0]
    return str(json.loads(first)["data"]["img"]["$blob"]["data"])


# --- files -----------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_upload_list_download_remove(server: LiveServer, tmp_path: Path) -> None:
    small = tmp_path / "notes.txt"
    small.write_text("the tide is high\n")
    big = tmp_path / "blob.bin"
    big.write_bytes(os.urandom(9 << 20))  # over the client's tus threshold: resumable
    uploaded = lines(tidewire(server, "upload", str(small), str(big), "--progress"))
    assert [m["name"] for m in uploaded] == ["notes.txt", "blob.bin"]
    assert [m["sha256"] for m in uploaded] == [sha256(small), sha256(big)]

    listed = lines(tidewire(server, "files"))  # stdout is a pipe: JSON lines
    assert {m["id"] for m in listed} == {m["id"] for m in uploaded}
    table = tidewire(server, "files", "--table").stdout
    assert "notes.txt" in table and "blob.bin" in table

    out = tmp_path / "copy.bin"
    result = tidewire(server, "download", uploaded[1]["id"], "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert sha256(out) == sha256(big)
    # By name, into a folder of its own.
    folder = tmp_path / "by-name"
    folder.mkdir()
    result = tidewire(server, "download", "notes.txt", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert (folder / "notes.txt").read_text() == "the tide is high\n"

    assert tidewire(server, "rm", uploaded[0]["id"], uploaded[1]["id"]).returncode == 0
    assert lines(tidewire(server, "files")) == []
    gone = tidewire(server, "download", uploaded[1]["id"], "-o", str(tmp_path / "x"))
    assert gone.returncode == 4
    one_line_error(gone)


def test_download_loads_only_the_client(server: LiveServer, tmp_path: Path) -> None:
    """`tidewire download` starts without the server side, the settings (pydantic-settings),
    websockets or PyJWT: each cost every small download its import time."""
    put = httpx.put(f"{server.url}/files/small.txt", content=b"hello")
    assert put.status_code == 201, put.text
    code = (
        "import json, sys\n"
        "from tidewire.cli import main\n"
        "sys.argv[0] = 'tidewire'\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    out = tmp_path / "small.txt"
    argv = ["download", put.json()["id"], "-o", str(out), "--url", server.url]
    result = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == b"hello"
    modules = set(json.loads(result.stderr.strip().splitlines()[-1]))
    loaded = modules | {m.split(".")[0] for m in modules}
    unwanted = {"fastapi", "starlette", "uvicorn", "pydantic_settings", "websockets", "jwt"}
    unwanted |= {f"tidewire.{m}" for m in ("app", "config", "server", "cli_serve")}
    assert loaded & unwanted == set()


def test_download_continues_a_partial_file(server: LiveServer, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1 << 20))
    [meta] = lines(tidewire(server, "upload", str(src)))
    out = tmp_path / "out.bin"
    part = out.with_name(out.name + ".part")

    # A .part whose bytes are not the file's: --continue keeps them, so the sha256 is wrong.
    part.write_bytes(b"\0" * 1000)
    mixed = tidewire(server, "download", meta["id"], "-o", str(out), "--continue")
    assert mixed.returncode == 6
    assert "sha256" in one_line_error(mixed)

    # The right first half: --continue fetches the rest.
    part.write_bytes(src.read_bytes()[: 1 << 19])
    resumed = tidewire(server, "download", meta["id"], "-o", str(out), "--continue")
    assert resumed.returncode == 0, resumed.stderr
    assert sha256(out) == sha256(src) and not part.exists()

    # Without --continue a stale .part is ignored: the download starts over.
    part.write_bytes(b"\0" * 1000)
    fresh = tidewire(server, "download", meta["id"], "-o", str(out))
    assert fresh.returncode == 0, fresh.stderr
    assert sha256(out) == sha256(src)


# --- access control --------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`tidewire ARGS` with no --url added (for commands that take none)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TIDEWIRE_")}
    base["COLUMNS"] = base["TERMINAL_WIDTH"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "tidewire", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**base, **(env or {})},
    )


def test_token_mints_a_jwt_that_the_server_verifies() -> None:
    import jwt

    from tidewire.auth import Verifier

    result = run_cli(
        "token",
        "--sub",
        "alice",
        "--secret",
        SECRET,
        "--allow",
        "streams=demo,reports.*",
        "--allow",
        "publish=room.*",
        "--allow",
        "subscribe=news",
        "--allow",
        "subscribe=room.*",
        "--allow",
        "files=read,write",
        "--ttl",
        "120",
        "--audience",
        "tidewire-dev",
        "--issuer",
        "me",
    )
    assert result.returncode == 0, result.stderr
    [minted] = result.stdout.split()
    claims = jwt.decode(minted, SECRET, algorithms=["HS256"], audience="tidewire-dev", issuer="me")
    assert jwt.get_unverified_header(minted)["alg"] == "HS256"
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 120
    assert claims["tidewire"] == {
        "streams": ["demo", "reports.*"],
        "publish": ["room.*"],
        "subscribe": ["news", "room.*"],
        "files": ["read", "write"],
    }
    verifier = Verifier(secret=SECRET, audience="tidewire-dev", issuer="me")
    identity = asyncio.run(verifier.verify(minted))
    assert identity.sub == "alice" and identity.streams == ("demo", "reports.*")
    assert identity.files == {"read", "write"} and not identity.admin


def test_token_takes_the_secret_from_the_environment_and_admin() -> None:
    from tidewire.auth import Verifier

    result = run_cli("token", "--sub", "root", "--admin", env={"TIDEWIRE_AUTH_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    identity = asyncio.run(Verifier(secret=SECRET).verify(result.stdout.strip()))
    assert identity.sub == "root" and identity.admin


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--allow", "channels=room"], "KEY one of streams, subscribe, publish, files"),
        (["--allow", "streams"], "KEY=PATTERN"),
        (["--allow", "streams="], "names nothing"),
        (["--allow", "files=fly"], "unknown file rights ['fly']"),
        (["--secret", "short"], "at least 32 bytes"),
        (["--ttl", "0"], "--ttl"),
    ],
)
def test_token_says_what_is_wrong_with_its_options(args: list[str], says: str) -> None:
    result = run_cli("token", "--sub", "a", *args, env={"TIDEWIRE_AUTH_SECRET": SECRET})
    assert result.returncode == 2
    assert says in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def authed(tmp_path: Path) -> Iterator[str]:
    """`tidewire serve --auth-secret` (the demo) in a subprocess: the real server's checks."""
    from tests.test_cli import serving

    with serving("--auth-secret", SECRET, cwd=tmp_path) as (url, _):
        yield url


def test_every_client_command_works_with_a_minted_token(authed: str, tmp_path: Path) -> None:
    """`tidewire token` mints, `tidewire serve --auth-secret` verifies: every command
    gets through (the server answers 401 to any request without the token)."""
    minted = run_cli("token", "--sub", "cli", "--admin", "--secret", SECRET).stdout.strip()
    src = tmp_path / "a.txt"
    src.write_text("hello")
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}

    def ok(*args: str, env: dict[str, str] | None = None) -> str:
        result = run_cli(*args, "--url", authed, env={**cache, **(env or {})})
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    given = ["--token", minted]
    for transport in ("ndjson", "sse", "ws"):
        out = ok("stream", "demo", "-p", "n=1", "-p", "interval=0", "-t", transport, *given)
        assert [json.loads(line)["event"] for line in out.splitlines()][-1] == "end"
    ok("publish", "room", "1", *given)
    for transport in ("ndjson", "sse", "ws"):
        got = ok("subscribe", "room", "--after", "0", "-n", "1", "-t", transport, *given)
        assert json.loads(got)["data"] == 1
    meta = json.loads(ok("upload", str(src), *given))
    ok("download", meta["id"], "-o", str(tmp_path / "b.txt"), *given)
    assert (tmp_path / "b.txt").read_text() == "hello"
    assert meta["id"] in ok("files", "--json", *given)
    ok("rm", meta["id"], env={"TIDEWIRE_TOKEN": minted})
    started = httpx.post(
        f"{authed}/streams/demo?detach=true",
        json={"n": 1, "interval": 0},
        headers={"Authorization": f"Bearer {minted}"},
    )
    assert started.status_code == 202, started.text
    ok("watch", started.json()["run"], env={"TIDEWIRE_TOKEN": minted})


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (["publish", "room", "1"], "'room' in tidewire.publish"),
        (["subscribe", "room", "-n", "1"], "'room' in tidewire.subscribe"),
        (["stream", "demo", "-p", "n=1"], "'demo' in tidewire.streams"),
        (["stream", "demo", "-p", "n=1", "-t", "ws"], "'demo' in tidewire.streams"),
        (["files"], "'read' in tidewire.files"),
        (["upload", "{src}"], "'write' in tidewire.files"),
    ],
)
def test_a_command_without_the_permission_exits_4_naming_it(
    authed: str, tmp_path: Path, args: list[str], missing: str
) -> None:
    src = tmp_path / "a.txt"
    src.write_text("hello")
    # A token for something else entirely: good, but not for this.
    minted = run_cli(
        "token", "--sub", "cli", "--allow", "streams=other", "--secret", SECRET
    ).stdout.strip()
    args = [a.replace("{src}", str(src)) for a in args]
    result = run_cli(
        *args,
        "--url",
        authed,
        "--token",
        minted,
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert result.returncode == 4, result.stderr
    line = one_line_error(result)
    assert missing in line and "HTTP 403" in line


def test_without_a_token_a_command_says_the_server_wants_one(authed: str) -> None:
    result = run_cli("files", "--url", authed)
    assert result.returncode == 4
    assert "needs a token" in one_line_error(result) and "HTTP 401" in result.stderr


def test_a_token_for_another_server_is_refused_as_invalid(authed: str) -> None:
    other = run_cli("token", "--sub", "cli", "--admin", "--secret", "x" * 40).stdout.strip()
    result = run_cli("files", "--url", authed, "--token", other)
    assert result.returncode == 4
    assert "not valid" in one_line_error(result) and "HTTP 401" in result.stderr
