"""The client's file transfers, against a server: uploads (multipart, tus, resumed by
another process), downloads (resumed), find; and that AsyncClient's stay off the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest

from tests.conftest import QUICK, LiveServer
from tests.proxy import Proxy
from tidewire import Tidewire
from tidewire.client._files import UploadStore, fingerprint
from tidewire.client._transfers import (
    DOWNLOAD_READ,
    adownload,
    afind,
    aupload,
    download,
    find,
    upload,
)
from tidewire.client.exceptions import (
    ChecksumMismatch,
    HTTPStatusError,
    TransportError,
)
from tidewire.storage.local import LocalStorage

KIB = 1 << 10
MIB = 1 << 20
SMALL_TUS = 256 * KIB  # tus_threshold for tests: a few MB go by tus in several PATCHes

MODES = ["sync", "async"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(size: int, seed: int = 0) -> bytes:
    """Bytes that differ all along (so a misplaced chunk changes the hash)."""
    block = hashlib.sha256(str(seed).encode()).digest()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(block + counter.to_bytes(8, "big")).digest() * 64
        counter += 1
    return bytes(out[:size])


class Recorder:
    """httpx event hooks (sync and async) noting each request and its answer's status."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.statuses: list[tuple[str, str, int]] = []

    def hooks(self, mode: str) -> dict[str, list[Callable[..., Any]]]:
        def request(r: httpx.Request) -> None:
            self.requests.append(r)

        def response(r: httpx.Response) -> None:
            self.statuses.append((r.request.method, r.request.url.path, r.status_code))

        if mode == "sync":
            return {"request": [request], "response": [response]}

        async def arequest(r: httpx.Request) -> None:
            request(r)

        async def aresponse(r: httpx.Response) -> None:
            response(r)

        return {"request": [arequest], "response": [aresponse]}

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path) for r in self.requests]


class Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int | None]] = []

    def __call__(self, done: int, total: int | None) -> None:
        self.calls.append((done, total))

    def check(self, total: int, *, start: int = 0) -> None:
        """Monotonic from `start` to `total`, with the total known all along."""
        assert self.calls, "progress was never called"
        dones = [done for done, _ in self.calls]
        assert dones[0] == start
        assert dones == sorted(dones), dones
        assert self.calls[-1] == (total, total)
        assert {t for _, t in self.calls} == {total}


def run(
    mode: str,
    url: str,
    sync: Callable[..., Any],
    asynchronous: Callable[..., Any],
    /,
    *args: Any,
    recorder: Recorder | None = None,
    transport: Any = None,
    **kwargs: Any,
) -> Any:
    """Call the sync twin with an httpx.Client, or the async one with an AsyncClient."""
    hooks = recorder.hooks(mode) if recorder else {}
    extra: dict[str, Any] = {"transport": transport} if transport else {}
    if mode == "sync":
        with httpx.Client(base_url=url, event_hooks=hooks, **extra) as http:
            return sync(http, *args, **kwargs)

    async def go() -> Any:
        async with httpx.AsyncClient(base_url=url, event_hooks=hooks, **extra) as http:
            return await asynchronous(http, *args, **kwargs)

    return asyncio.run(go())


def do_upload(mode: str, url: str, source: Any, **kwargs: Any) -> dict[str, Any]:
    result: dict[str, Any] = run(mode, url, upload, aupload, source, **kwargs)
    return result


def do_download(mode: str, url: str, id_or_name: str, dest: Any = None, **kwargs: Any) -> Path:
    result: Path = run(mode, url, download, adownload, id_or_name, dest, **kwargs)
    return result


@pytest.fixture
def server(serve: Callable[..., LiveServer], tmp_path: Path) -> LiveServer:
    return serve(Tidewire(settings=QUICK, storage=LocalStorage(tmp_path / "data")))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """A folder for downloads (the server keeps its files in tmp_path / "data")."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture
def store(tmp_path: Path) -> UploadStore:
    return UploadStore(tmp_path / "cache" / "uploads.json")


def content(server: LiveServer, file_id: str) -> bytes:
    return httpx.get(f"{server.url}/files/{file_id}").content


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- uploads ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_small_upload_is_one_multipart_post(
    mode: str, server: LiveServer, tmp_path: Path, store: UploadStore
) -> None:
    data = payload(2 * MIB + 512 * KIB)  # under the default tus_threshold
    path = write(tmp_path / "small.bin", data)
    progress, recorder = Progress(), Recorder()
    meta = do_upload(
        mode,
        server.url,
        path,
        name='ü "quoted".bin',
        type="application/x-test",
        progress=progress,
        resume_store=store,
        recorder=recorder,
    )
    assert meta["sha256"] == sha256(data) and meta["size"] == len(data)
    assert meta["name"] == 'ü "quoted".bin' and meta["type"] == "application/x-test"
    assert recorder.calls() == [("POST", "/files")]
    assert content(server, meta["id"]) == data
    progress.check(len(data))
    assert len(progress.calls) > 2  # along the way, not only at the end


@pytest.mark.parametrize("mode", MODES)
def test_large_upload_goes_by_tus(
    mode: str, server: LiveServer, tmp_path: Path, store: UploadStore
) -> None:
    data = payload(3 * MIB + 12345)
    path = write(tmp_path / "large.bin", data)
    progress, recorder = Progress(), Recorder()
    meta = do_upload(
        mode,
        server.url,
        path,
        progress=progress,
        tus_threshold=SMALL_TUS,
        chunk_size=MIB,
        resume_store=store,
        recorder=recorder,
    )
    assert meta["sha256"] == sha256(data) == sha256(content(server, meta["id"]))
    assert meta["name"] == "large.bin"
    calls = recorder.calls()
    assert calls[0] == ("POST", "/uploads/")
    patches = [r for r in recorder.requests if r.method == "PATCH"]
    assert len(patches) == 4
    assert [int(r.headers["upload-offset"]) for r in patches] == [0, MIB, 2 * MIB, 3 * MIB]
    assert calls[-1] == ("GET", f"/files/{meta['id']}/meta")
    progress.check(len(data))
    # Finished: nothing is left to resume.
    assert json.loads(store.path.read_text()) == {}


def test_upload_sources(server: LiveServer, tmp_path: Path, store: UploadStore) -> None:
    data = payload(MIB)
    recorder = Recorder()
    with httpx.Client(base_url=server.url, event_hooks=recorder.hooks("sync")) as http:
        # A seekable file object over the threshold goes by tus, from where it stands.
        buffer = io.BytesIO(b"skip me" + data)
        buffer.seek(7)
        meta = upload(http, buffer, name="buffer.bin", tus_threshold=SMALL_TUS, resume_store=store)
        assert meta["sha256"] == sha256(data) and meta["name"] == "buffer.bin"
        assert ("POST", "/uploads/") in recorder.calls()

        # A pipe has no size: one multipart POST, however large.
        recorder.requests.clear()
        read_end, write_end = os.pipe()
        writer = threading.Thread(target=lambda: (os.write(write_end, data), os.close(write_end)))
        writer.start()
        progress = Progress()
        with open(read_end, "rb") as pipe:
            meta = upload(http, pipe, tus_threshold=SMALL_TUS, progress=progress)
        writer.join()
        assert meta["sha256"] == sha256(data) and meta["name"] == "upload"
        assert recorder.calls() == [("POST", "/files")]
        assert progress.calls[0][1] is None and progress.calls[-1] == (len(data), len(data))

        # An open file keeps its own name.
        with (tmp_path / "named.txt").open("wb+") as f:
            f.write(b"hello")
            f.seek(0)
            assert upload(http, f)["name"] == "named.txt"

        with (tmp_path / "named.txt").open("r") as text, pytest.raises(TypeError, match="'rb'"):
            upload(http, text)  # type: ignore[arg-type]
        # Names go into a header: a line break is refused before anything is sent.
        with pytest.raises(ValueError, match="control characters"):
            upload(http, io.BytesIO(b"x"), name="evil\r\nX-Injected: 1")
        with pytest.raises(ValueError, match="pass name="):
            upload(http, write(tmp_path / "new\nline", b"x"))
        assert upload(http, tmp_path / "new\nline", name="newline")["name"] == "newline"
        with pytest.raises(IsADirectoryError, match="folder"):
            upload(http, tmp_path)
        with pytest.raises(FileNotFoundError):
            upload(http, tmp_path / "missing.bin")


def test_empty_file(server: LiveServer, tmp_path: Path) -> None:
    progress = Progress()
    with httpx.Client(base_url=server.url) as http:
        meta = upload(http, write(tmp_path / "empty", b""), progress=progress)
    assert meta["size"] == 0 and meta["sha256"] == sha256(b"")
    assert progress.calls[-1] == (0, 0)


# A separate process uploads by tus with the default store (XDG_CACHE_HOME)
# and dies once the server has confirmed about half of the file.
INTERRUPTED = textwrap.dedent(
    """
    import os, sys, httpx
    from tidewire.client._transfers import upload

    url, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def check(response):
        if response.request.method == "PATCH":
            if int(response.headers["upload-offset"]) >= size // 2:
                os._exit(3)  # as a crash would: no cleanup, no goodbye

    with httpx.Client(base_url=url, event_hooks={"response": [check]}) as http:
        upload(http, path, tus_threshold=1, chunk_size=256 << 10)
    sys.exit("the upload was supposed to be interrupted")
    """
)


@pytest.mark.parametrize("mode", MODES)
def test_upload_interrupted_then_finished_by_a_new_process(
    mode: str, server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = payload(2 * MIB + 777)
    path = write(tmp_path / "resumed.bin", data)
    cache = tmp_path / "xdg-cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    first = subprocess.run(
        [sys.executable, "-c", INTERRUPTED, server.url, str(path), str(len(data))],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 3, first.stderr
    # It remembered its upload; the server has about half of it.
    [entry] = json.loads((cache / "tidewire" / "uploads.json").read_text()).values()
    head = httpx.head(entry["url"], headers={"Tus-Resumable": "1.0.0"})
    offset = int(head.headers["upload-offset"])
    assert len(data) // 2 <= offset < len(data)

    # This process is the new one: same file, same store, no other hint.
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    progress, recorder = Progress(), Recorder()
    meta = do_upload(
        mode,
        server.url,
        path,
        progress=progress,
        tus_threshold=1,
        chunk_size=256 * KIB,
        recorder=recorder,
    )
    assert meta["sha256"] == sha256(data) == sha256(content(server, meta["id"]))
    methods = [method for method, _ in recorder.calls()]
    assert methods[0] == "HEAD" and "POST" not in methods  # resumed, not started again
    assert int(recorder.requests[1].headers["upload-offset"]) == offset
    progress.check(len(data), start=offset)
    assert json.loads((cache / "tidewire" / "uploads.json").read_text()) == {}


def test_conflict_asks_where_the_upload_is(
    server: LiveServer, tmp_path: Path, store: UploadStore
) -> None:
    """A 409 (someone else moved the upload on) is answered by a HEAD, then the upload goes on."""
    data = payload(MIB)
    path = write(tmp_path / "raced.bin", data)
    chunk = 256 * KIB
    raced = False

    def race(response: httpx.Response) -> None:
        nonlocal raced
        if response.request.method == "PATCH" and not raced:
            raced = True  # another writer sends the next chunk first
            offset = int(response.headers["upload-offset"])
            r = httpx.patch(
                str(response.request.url),
                content=data[offset : offset + chunk],
                headers={
                    "Tus-Resumable": "1.0.0",
                    "Upload-Offset": str(offset),
                    "Content-Type": "application/offset+octet-stream",
                },
            )
            assert r.status_code == 204

    with httpx.Client(base_url=server.url, event_hooks={"response": [race]}) as http:
        recorder = Recorder()
        http.event_hooks["response"].append(recorder.hooks("sync")["response"][0])
        meta = upload(http, path, tus_threshold=1, chunk_size=chunk, resume_store=store)
    assert meta["sha256"] == sha256(data) == sha256(content(server, meta["id"]))
    statuses = [(method, status) for method, _, status in recorder.statuses]
    assert ("PATCH", 409) in statuses
    assert statuses[statuses.index(("PATCH", 409)) + 1] == ("HEAD", 200)


def test_forgotten_upload_starts_anew(
    server: LiveServer, tmp_path: Path, store: UploadStore
) -> None:
    data = payload(600 * KIB)
    path = write(tmp_path / "stale.bin", data)
    with httpx.Client(base_url=server.url) as http:
        # An upload made, remembered, then removed on the server (as expiry would).
        recorder = Recorder()
        http.event_hooks = recorder.hooks("sync")

        def stop(done: int, total: int | None) -> None:
            if done:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            upload(http, path, tus_threshold=1, resume_store=store, progress=stop)
        [url] = [v["url"] for v in json.loads(store.path.read_text()).values()]
        assert http.delete(url, headers={"Tus-Resumable": "1.0.0"}).status_code == 204

        recorder.requests.clear()
        meta = upload(http, path, tus_threshold=1, resume_store=store)
    assert meta["sha256"] == sha256(data)
    assert [m for m, _ in recorder.calls()][:2] == ["HEAD", "POST"]
    assert ("HEAD", urlpath(url), 404) in recorder.statuses


def urlpath(url: str) -> str:
    return httpx.URL(url).path


def test_upload_refused_by_the_server(
    serve: Callable[..., LiveServer], tmp_path: Path, store: UploadStore
) -> None:
    settings = dataclasses.replace(QUICK, max_file_size=100 * KIB)
    server = serve(Tidewire(settings=settings, storage=LocalStorage(tmp_path / "data")))
    path = write(tmp_path / "big.bin", payload(200 * KIB))
    with httpx.Client(base_url=server.url) as http:
        for threshold in (MIB, 1):  # multipart, then tus
            with pytest.raises(HTTPStatusError) as caught:
                upload(http, path, tus_threshold=threshold, resume_store=store)
            assert caught.value.status_code == 413
            assert str(100 * KIB) in str(caught.value.detail)


@pytest.mark.parametrize("mode", MODES)
def test_upload_checks_the_servers_sha256(mode: str, tmp_path: Path) -> None:
    data = payload(10 * KIB)
    path = write(tmp_path / "x.bin", data)

    def lying_server(request: httpx.Request) -> httpx.Response:
        request.read()
        meta = {"id": "0" * 22, "name": "x.bin", "size": len(data), "sha256": sha256(b"other")}
        return httpx.Response(201, json=[meta])

    # MockTransport serves sync and async clients alike.
    with pytest.raises(ChecksumMismatch) as caught:
        do_upload(mode, "http://test", path, transport=httpx.MockTransport(lying_server))
    assert caught.value.expected == sha256(data) and caught.value.actual == sha256(b"other")


# -- downloads -------------------------------------------------------------


def put(server: LiveServer, name: str, data: bytes) -> dict[str, Any]:
    r = httpx.put(f"{server.url}/files/{name}", content=data)
    assert r.status_code == 201, r.text
    meta: dict[str, Any] = r.json()
    return meta


@pytest.mark.parametrize("mode", MODES)
def test_download_by_id_and_by_name(mode: str, server: LiveServer, out: Path) -> None:
    old, new = payload(300 * KIB, 1), payload(2 * MIB + 5, 2)
    first = put(server, "same.bin", old)
    put(server, "same.bin", new)
    progress = Progress()
    path = do_download(mode, server.url, "same.bin", out, progress=progress)
    assert path == out / "same.bin" and path.read_bytes() == new  # the newest of that name
    progress.check(len(new))
    assert len(progress.calls) > 2

    path = do_download(mode, server.url, first["id"], out / "old.bin")
    assert path.read_bytes() == old
    assert sorted(p.name for p in out.iterdir()) == ["old.bin", "same.bin"]  # no .part

    found = run(mode, server.url, find, afind, first["id"])
    assert found == first


@pytest.mark.parametrize("mode", MODES)
def test_download_reads_a_mebibyte_at_a_time(
    mode: str, server: LiveServer, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download's body is asked of the socket 1 MiB at a time, not httpcore's 64 KiB,
    and the connection reads as httpcore would once it is done."""
    asked: list[int] = []

    def spy(cls: Any) -> None:
        real = cls.read

        def read(self: Any, max_bytes: int, *args: Any, **kwargs: Any) -> Any:
            asked.append(max_bytes)
            return real(self, max_bytes, *args, **kwargs)

        monkeypatch.setattr(cls, "read", read)

    spy(httpcore._backends.sync.SyncStream)
    spy(httpcore._backends.anyio.AnyIOStream)
    data = payload(3 * MIB + 7)
    meta = put(server, "big.bin", data)

    def then_small(http: Any, *args: Any) -> Any:
        path = download(http, *args)
        asked.append(0)  # the download's reads end here
        http.get(f"/files/{meta['id']}/meta")
        return path

    async def athen_small(http: Any, *args: Any) -> Any:
        path = await adownload(http, *args)
        asked.append(0)
        await http.get(f"/files/{meta['id']}/meta")
        return path

    path = run(mode, server.url, then_small, athen_small, meta["id"], out)
    assert path.read_bytes() == data
    during, after = asked[: asked.index(0)], asked[asked.index(0) + 1 :]
    assert DOWNLOAD_READ in during
    assert after and set(after) == {64 << 10}


@pytest.mark.parametrize("mode", MODES)
def test_download_interrupted_then_continued(
    mode: str, server: LiveServer, out: Path, proxy: type[Proxy]
) -> None:
    data = payload(3 * MIB + 99)
    meta = put(server, "big.bin", data)
    p = proxy(server.port)
    p.cut_after(MIB)
    with pytest.raises(TransportError):
        do_download(mode, p.url, meta["id"], out)
    part = out / "big.bin.part"
    have = part.stat().st_size
    assert 0 < have < len(data) and not (out / "big.bin").exists()
    assert part.read_bytes() == data[:have]

    p.cut_after(None)
    progress, recorder = Progress(), Recorder()
    path = do_download(mode, p.url, meta["id"], out, progress=progress, recorder=recorder)
    assert path.read_bytes() == data and not part.exists()
    [get] = [r for r in recorder.requests if r.url.path == f"/files/{meta['id']}"]
    assert get.headers["range"] == f"bytes={have}-"
    assert get.headers["if-range"] == f'"{meta["sha256"]}"'
    assert ("GET", f"/files/{meta['id']}", 206) in recorder.statuses
    progress.check(len(data), start=have)


def test_corrupt_part_is_a_checksum_mismatch(server: LiveServer, out: Path) -> None:
    data = payload(MIB)
    meta = put(server, "c.bin", data)
    part = out / "c.bin.part"
    part.write_bytes(b"\x00" * 1000)  # not the file's first bytes
    with httpx.Client(base_url=server.url) as http, pytest.raises(ChecksumMismatch) as caught:
        download(http, meta["id"], out)
    assert caught.value.expected == meta["sha256"]
    assert caught.value.actual == sha256(b"\x00" * 1000 + data[1000:])
    assert list(out.iterdir()) == []  # nothing misleading is left
    # The next try starts afresh, and succeeds.
    with httpx.Client(base_url=server.url) as http:
        assert download(http, meta["id"], out).read_bytes() == data


def test_part_files_that_cannot_be_continued(server: LiveServer, out: Path) -> None:
    data = payload(500 * KIB)
    meta = put(server, "p.bin", data)
    part = out / "p.bin.part"
    recorder = Recorder()
    with httpx.Client(base_url=server.url, event_hooks=recorder.hooks("sync")) as http:
        # Longer than the file: not a part of it; started again.
        part.write_bytes(data + b"more")
        assert download(http, meta["id"], out).read_bytes() == data
        # resume=False ignores a .part.
        part.write_bytes(b"junk")
        assert download(http, meta["id"], out, resume=False).read_bytes() == data
        ranges = [r.headers.get("range") for r in recorder.requests if "/meta" not in r.url.path]
        assert ranges == [None, None]
        # Complete and right already: renamed, nothing downloaded.
        recorder.requests.clear()
        (out / "done.bin.part").write_bytes(data)
        progress = Progress()
        path = download(http, meta["id"], out / "done.bin", progress=progress)
        assert path.read_bytes() == data
        assert recorder.calls() == [("GET", f"/files/{meta['id']}/meta")]
        assert progress.calls == [(len(data), len(data))]


def test_a_server_ignoring_range_sends_it_all(out: Path) -> None:
    data = payload(100 * KIB)
    file_id = "0" * 22
    meta = {"id": file_id, "name": "r.bin", "size": len(data), "sha256": sha256(data)}

    def no_ranges(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/meta"):
            return httpx.Response(200, json=meta)
        return httpx.Response(200, content=data)  # Range ignored, as HTTP allows

    (out / "r.bin.part").write_bytes(data[:500])
    with httpx.Client(base_url="http://test", transport=httpx.MockTransport(no_ranges)) as http:
        assert download(http, file_id, out).read_bytes() == data


def test_download_writes_only_inside_dest(server: LiveServer, out: Path) -> None:
    dest = out / "a" / "b"
    dest.mkdir(parents=True)
    meta = put(server, "..%2F..%2Fescape.txt", b"boo")
    assert meta["name"] == "../../escape.txt"
    with httpx.Client(base_url=server.url) as http:
        path = download(http, meta["id"], dest)
    assert path == dest / "escape.txt" and path.read_bytes() == b"boo"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["a/b/escape.txt"]


@pytest.mark.parametrize("mode", MODES)
def test_not_found(mode: str, server: LiveServer, out: Path) -> None:
    server_detail = httpx.get(f"{server.url}/files/{'v' * 22}/meta").json()["detail"]
    with pytest.raises(HTTPStatusError) as caught:
        do_download(mode, server.url, "v" * 22, out)
    assert caught.value.status_code == 404 and caught.value.detail == server_detail
    with pytest.raises(HTTPStatusError) as caught:
        run(mode, server.url, find, afind, "no such name.txt")
    assert caught.value.status_code == 404 and "no such name.txt" in str(caught.value.detail)
    assert list(out.glob("*.part")) == []
    with pytest.raises(ValueError, match="name the file"):
        do_download(mode, server.url, "", out)


def test_a_name_that_looks_like_an_id(server: LiveServer, out: Path) -> None:
    name = "a" * 22  # the shape of an id, but no file has that id
    meta = put(server, name, b"named")
    with httpx.Client(base_url=server.url) as http:
        assert find(http, name)["id"] == meta["id"]


def test_find_copes_with_a_server_without_name_filter(out: Path) -> None:
    """An older server ignores ?name= and lists everything: only the right name counts."""
    files = [
        {"id": "1" * 22, "name": "other", "size": 1, "sha256": sha256(b"x")},
        {"id": "2" * 22, "name": "wanted", "size": 1, "sha256": sha256(b"y")},
    ]
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=files))
    with httpx.Client(base_url="http://test", transport=transport) as http:
        assert find(http, "wanted")["id"] == "2" * 22
        with pytest.raises(HTTPStatusError):
            find(http, "third")


def test_a_remembered_upload_of_another_size_is_not_resumed(
    server: LiveServer, tmp_path: Path, store: UploadStore
) -> None:
    data = payload(400 * KIB)
    path = write(tmp_path / "sized.bin", data)
    # An entry under this file's key, for an upload of another length.
    other = httpx.post(
        f"{server.url}/uploads/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "10"}
    )
    url = f"{server.url}{other.headers['location']}"
    with path.open("rb") as f:
        key = fingerprint(
            f, start=0, size=len(data), name=path.name, mtime_ns=path.stat().st_mtime_ns
        )
    store.put(f"{server.url} {key}", url)
    recorder = Recorder()
    with httpx.Client(base_url=server.url, event_hooks=recorder.hooks("sync")) as http:
        meta = upload(http, path, tus_threshold=1, resume_store=store)
    assert meta["sha256"] == sha256(data)
    assert [m for m, _ in recorder.calls()][:2] == ["HEAD", "POST"]
    assert recorder.requests[0].url == url


# -- the event loop does only network I/O ----------------------------------


class LocalWork:
    """Notes which threads hash (sha256) and which wait on a thread's unfinished work.

    `hashlib.sha256` and `concurrent.futures.Future.result`/`exception` are
    patched for the whole process, so the check does not depend on how the
    client is laid out inside. The download writer's hashing is slowed down
    so that the network outpaces it and a block has to wait for the last one.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hashing: set[int] = set()
        self.waiting: set[int] = set()
        real_sha256 = hashlib.sha256
        real_result, real_exception = Future.result, Future.exception
        work = self

        class Sha256:
            def __init__(self, data: bytes = b"") -> None:
                self._sha = real_sha256(data)

            def update(self, data: Any) -> None:
                work.hashing.add(threading.get_ident())
                if threading.current_thread().name.startswith("tidewire-download"):
                    time.sleep(0.02)  # a slow disk
                self._sha.update(data)

            def hexdigest(self) -> str:
                return self._sha.hexdigest()

        def result(future: Future[Any], timeout: float | None = None) -> Any:
            if not future.done():
                work.waiting.add(threading.get_ident())
            return real_result(future, timeout)

        def exception(future: Future[Any], timeout: float | None = None) -> Any:
            if not future.done():
                work.waiting.add(threading.get_ident())
            return real_exception(future, timeout)

        monkeypatch.setattr(hashlib, "sha256", Sha256)
        monkeypatch.setattr(Future, "result", result)
        monkeypatch.setattr(Future, "exception", exception)


def test_async_transfers_hash_and_wait_off_the_event_loop(
    server: LiveServer,
    tmp_path: Path,
    out: Path,
    store: UploadStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Resuming a download hashes its .part, an upload the server already has is
    hashed whole, a download waits for its writer: none of it on the event loop."""
    data = payload(6 * MIB)
    meta = put(server, "resumed.bin", data)
    (out / "resumed.bin.part").write_bytes(data[: 4 * MIB])
    path = write(tmp_path / "up.bin", data)

    # Uploaded, but still remembered, as after a crash between the last
    # PATCH's answer and forgetting the upload: the HEAD says it is complete.
    class Remembering(UploadStore):
        def remove(self, key: str) -> None:
            pass

    with httpx.Client(base_url=server.url) as http:
        uploaded = upload(http, path, tus_threshold=1, resume_store=Remembering(store.path))
    work = LocalWork(monkeypatch)
    recorder = Recorder()

    async def go() -> tuple[int, Path, dict[str, Any]]:
        hooks = recorder.hooks("async")
        async with httpx.AsyncClient(base_url=server.url, event_hooks=hooks) as http:
            downloaded = await adownload(http, meta["id"], out)
            again = await aupload(http, path, tus_threshold=1, resume_store=store)
        return threading.get_ident(), downloaded, again

    loop_thread, downloaded, again = asyncio.run(go())
    assert downloaded.read_bytes() == data
    assert ("GET", f"/files/{meta['id']}", 206) in recorder.statuses  # resumed
    assert again["id"] == uploaded["id"]
    assert [m for m, _ in recorder.calls()][-2:] == ["HEAD", "GET"]  # nothing left to send
    assert work.hashing and work.waiting  # the instruments saw the work
    assert loop_thread not in work.hashing
    assert loop_thread not in work.waiting
