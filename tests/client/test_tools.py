"""tidewire works with the tools people already have: curl reads, uploads and resumes.

The fourth tool of the issue, tuspy (the Python tus client), is tested against
the server in tests/server/test_uploads.py: `test_tuspy_uploads_a_file` and
`test_tuspy_resumes_an_interrupted_upload` (a new uploader resumes from the
URL tuspy stored by the file's fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import QUICK, LiveServer
from tests.wire import seq
from tidewire import Tidewire
from tidewire.client._transfers import download, upload
from tidewire.storage.local import LocalStorage


@pytest.fixture
def curl() -> str:
    found = shutil.which("curl")
    if found is None:
        pytest.fail(
            "curl is not installed: these tests check tidewire against it (apt install curl)"
        )
    return found


@pytest.fixture
def server(serve: Callable[..., LiveServer], tmp_path: Path) -> LiveServer:
    tw = Tidewire(settings=QUICK, storage=LocalStorage(tmp_path / "data"))

    @tw.stream
    async def count(n: int = 5) -> AsyncIterator[dict[str, int]]:
        for i in range(n):
            yield {"i": i}

    return serve(tw)


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(args, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    return done


def test_curl_reads_ndjson(curl: str, server: LiveServer) -> None:
    out = run(curl, "-sSN", f"{server.url}/streams/count?n=7").stdout.decode()
    # Empty lines are heartbeats.
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [e["data"] for e in events[:-1]] == [{"i": i} for i in range(7)]
    assert events[-1]["event"] == "end"
    # Opaque in general; `<run id>.<epoch>-<n>` on the memory broker.
    ids = [seq(e["id"]) for e in events]
    assert ids == sorted(set(ids))


def test_curl_uploads_with_T(curl: str, server: LiveServer, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4000 + b"tail"
    path = tmp_path / "from curl.bin"
    path.write_bytes(data)
    # A URL ending in / gets the local file's name appended, by curl.
    meta = json.loads(run(curl, "-sS", "-T", str(path), f"{server.url}/files/").stdout)
    assert meta["name"] == "from curl.bin"
    assert meta["size"] == len(data) and meta["sha256"] == hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=server.url) as http:
        back = download(http, meta["id"], tmp_path / "back.bin")
    assert back.read_bytes() == data


def test_curl_continues_a_download(curl: str, server: LiveServer, tmp_path: Path) -> None:
    data = bytes(reversed(range(256))) * 8000
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    with httpx.Client(base_url=server.url) as http:
        meta = upload(http, source)
    dest = tmp_path / "partial.bin"
    dest.write_bytes(data[: len(data) // 2])  # as an interrupted download leaves it
    status = run(
        curl, "-sS", "-C", "-", "-o", str(dest), "-w", "%{http_code}", f"{server.url}{meta['url']}"
    ).stdout
    assert status == b"206"  # only the rest was sent
    assert dest.read_bytes() == data
