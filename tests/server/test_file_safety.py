# ruff: noqa: RUF001  (the Unicode lookalikes are the point)
"""Safe by construction: no request can name a path on the server's disk.

Path payloads (traversal, encoded and double-encoded, absolute, Windows,
NUL, overlong, Unicode lookalikes, dots) go to every route that takes a file
name or id. The data dir sits in a tree of sentinel files (an `etc/passwd`
among them) that is snapshotted before and after each test: nothing outside
the data dir may be created, changed or read, no request may get a 500, and
a name is either stored as a label (the file lives under a server-made id)
or refused with a 4xx.

Requests go out through a raw socket, so that no client normalises `..` or
re-encodes anything on the way.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest

from tidewire import Tidewire
from tidewire.server.compat import add_original_file_routes
from tidewire.storage import valid_id
from tidewire.storage.local import LocalStorage

from ..conftest import QUICK, LiveServer

SENTINEL = b"sentinel: must never be read, written or removed"

#: As they go into a URL: `%` sequences are sent as they are.
PAYLOADS = [
    "../",
    "../../etc/passwd",
    "../../../../../../../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252f",
    "%252e%252e%252fetc%252fpasswd",
    "..%2f",
    "..%5c..%5cx",
    "/etc/passwd",
    "%2fetc%2fpasswd",
    "C:\\Windows\\win.ini",
    "..\\..\\x",
    "a%00b",
    "a%00.txt",
    "x" * 10_000,
    "．．／．．／etc／passwd",
    "..∕..∕etc∕passwd",
    "／ｅｔｃ／ｐａｓｓｗｄ",
    "%c0%ae%c0%ae%2f",  # overlong UTF-8 for "../"
    ".",
    "..",
    "...",
    "",
]
#: As names in a body: each payload as written and percent-decoded once.
NAMES = sorted({unquote(p) for p in PAYLOADS} | set(PAYLOADS))
#: Names the server must keep as labels (not refuse).
LABELS = ["../../etc/passwd", "/etc/passwd", "..\\..\\x", "..", "．．／．．／etc／passwd"]


def url_form(payload: str) -> str:
    """The payload in a request target: visible ASCII as it is, the rest percent-encoded."""
    return "".join(c if "!" <= c <= "~" else quote(c, safe="") for c in payload)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def send(
    port: int, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> Reply:
    """One request, byte for byte as given, on its own connection."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, content = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        found[key.strip().lower()] = value.strip()
    return Reply(int(status_line.split(" ")[1]), found, content)


# -- the world around the data dir -----------------------------------------


def snapshot(root: Path, skip: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under `root` but `skip`: kind, mode, size, mtime and content hash."""
    seen: dict[str, tuple[Any, ...]] = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if here == skip or skip in here.parents:
            continue
        for name in dirs + files:
            path = here / name
            if path == skip:
                continue
            stat = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            seen[str(path.relative_to(root))] = (
                stat.st_mode,
                stat.st_size,
                stat.st_mtime_ns,
                digest,
            )
        stat = here.lstat()
        seen[str(here.relative_to(root)) + "/"] = (stat.st_mode, stat.st_mtime_ns)
    return seen


def check_data_dir(data: Path) -> None:
    """Inside the data dir, only the storage's own layout: every file named by an id."""
    allowed = {"files", "tmp", "uploads", "index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm"}
    for entry in data.iterdir():
        assert entry.name in allowed, f"unexpected {entry} in the data dir"
    for folder in ("files", "tmp", "uploads"):
        for entry in (data / folder).iterdir() if (data / folder).exists() else []:
            assert entry.is_file() and not entry.is_symlink(), entry
            id = entry.name.split(".", 1)[0]
            assert valid_id(id), f"{entry} is not named by an id"
            assert entry.name == id or folder == "uploads", entry


@dataclass
class World:
    root: Path
    data: Path
    port: int
    url: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("world")
    for sentinel in (
        "etc/passwd",
        "x",
        "win.ini",
        "Windows/win.ini",
        "srv/secret.txt",
        "srv/etc/passwd",
        "srv/uploads/keep.txt",
        "srv/sentinel_dir/inner.txt",
    ):
        (root / sentinel).parent.mkdir(parents=True, exist_ok=True)
        (root / sentinel).write_bytes(SENTINEL)
    data = root / "srv" / "data"
    data.mkdir()
    tw = Tidewire(storage=LocalStorage(data), settings=QUICK)
    add_original_file_routes(tw.router, tw)
    with pytest.MonkeyPatch.context() as patch:
        # Relative paths, if anything used them, would land in the tree too.
        patch.chdir(root / "srv")
        live = LiveServer(tw.app).start()
        try:
            yield World(root, data, live.port, live.url)
        finally:
            live.stop()


@pytest.fixture(autouse=True)
def untouched(world: World) -> Iterator[None]:
    before = snapshot(world.root, world.data)
    yield
    assert snapshot(world.root, world.data) == before, "something outside the data dir changed"
    check_data_dir(world.data)


def refused(reply: Reply, where: str) -> None:
    assert 400 <= reply.status < 500, f"{where}: {reply.status} {reply.body[:200]!r}"
    assert SENTINEL not in reply.body
    if reply.body and reply.headers.get("content-type", "").startswith("application/json"):
        assert reply.json()["detail"], where


def check_stored(world: World, meta: dict[str, Any], content: bytes) -> None:
    """A file stored under a name is a file under its id, downloadable, with a safe name."""
    assert valid_id(meta["id"])
    assert (world.data / "files" / meta["id"]).read_bytes() == content
    reply = send(world.port, "GET", f"/files/{meta['id']}")
    assert reply.status == 200 and reply.body == content
    disposition = reply.headers["content-disposition"]
    kind, fallback, star = (part.strip() for part in disposition.split(";"))
    assert kind in ("inline", "attachment")
    fallback_name = fallback.removeprefix('filename="').removesuffix('"')
    assert not set(fallback_name) & set('/\\"%\x00'), disposition
    assert all(" " <= c <= "~" for c in fallback_name)
    assert star.startswith("filename*=UTF-8''")
    assert reply.headers["x-content-type-options"] == "nosniff"


# -- the routes --------------------------------------------------------------


def test_put_names_are_labels_or_refused(world: World) -> None:
    stored = {}
    for i, payload in enumerate(PAYLOADS):
        content = f"put {i}".encode()
        target = "/files/" + url_form(payload)
        reply = send(world.port, "PUT", target, body=content)
        if reply.status == 201:
            meta = reply.json()
            assert meta["name"] == unquote(url_form(payload)), "the name is the label, as sent"
            check_stored(world, meta, content)
            stored[meta["name"]] = meta
        else:
            refused(reply, target)
    for label in LABELS:
        assert label in stored, f"{label!r} should be kept as a label"
    # Refused: what no name may hold.
    assert "a\x00b" not in stored and "" not in stored and "x" * 10_000 not in stored


@pytest.mark.parametrize("route", ["/files", "/uploadfile/"])
def test_multipart_names_are_labels_or_refused(world: World, route: str) -> None:
    kept = 0
    for i, name in enumerate(NAMES):
        content = f"multipart {i}".encode()
        body = (
            b'--bound\r\nContent-Disposition: form-data; name="file"; filename="'
            + name.encode()
            + b'"\r\nContent-Type: application/octet-stream\r\n\r\n'
            + content
            + b"\r\n--bound--\r\n"
        )
        reply = send(
            world.port,
            "POST",
            route,
            {"Content-Type": "multipart/form-data; boundary=bound"},
            body,
        )
        if reply.status in (200, 201):
            meta = reply.json()
            meta = meta[0] if isinstance(meta, list) else meta
            # A label, at most shortened to its last Windows path segment by the parser.
            assert name.endswith(meta["name"]), (name, meta["name"])
            check_stored(world, meta, content)
            kept += 1
        else:
            refused(reply, f"{route} {name[:40]!r}")
    assert kept >= len(LABELS)


@pytest.mark.parametrize(
    ("method", "suffix"), [("GET", ""), ("HEAD", ""), ("DELETE", ""), ("GET", "/meta")]
)
def test_ids_are_never_paths(world: World, method: str, suffix: str) -> None:
    for payload in PAYLOADS:
        target = "/files/" + url_form(payload) + suffix
        if target == "/files/":
            continue  # that is the listing (GET) or not a route (HEAD, DELETE): below
        refused(send(world.port, method, target), f"{method} {target[:60]}")
    for method in ("HEAD", "DELETE"):
        refused(send(world.port, method, "/files/"), f"{method} /files/")


def test_downloadfile_names_are_only_looked_up(world: World) -> None:
    # A file stored under a traversal label: asking for that name gives it, not /etc/passwd.
    stored = send(world.port, "PUT", "/files/../../etc/passwd", body=b"just a label")
    assert stored.status == 201
    client = httpx.Client(base_url=world.url, timeout=10)
    replies: list[tuple[str, Reply]] = []
    for payload in PAYLOADS:
        target = "/downloadfile/?filename=" + url_form(payload)
        replies.append((target, send(world.port, "POST", target)))
    for name in NAMES:
        for way in ("data", "json", "files"):
            kwargs: dict[str, Any] = {
                "data": {"data": {"filename": name}},
                "json": {"json": {"filename": name}},
                "files": {"files": {"filename": (None, name)}},
            }[way]
            response = client.post("/downloadfile/", **kwargs)
            replies.append(
                (
                    f"{way} {name[:40]!r}",
                    Reply(response.status_code, dict(response.headers), response.content),
                )
            )
    client.close()
    found = 0
    for where, reply in replies:
        if reply.status == 200:
            # Only ever a stored file, by its label: never a file of the disk.
            assert SENTINEL not in reply.body
            assert reply.body.startswith((b"put ", b"multipart ", b"just a label")), where
            found += 1
        else:
            refused(reply, where)
            assert reply.status in (400, 404, 413, 422), where
    assert found >= 1, "the traversal label itself is found"


TUS = {"Tus-Resumable": "1.0.0"}


@pytest.mark.parametrize("method", ["HEAD", "PATCH", "DELETE"])
def test_tus_ids_are_never_paths(world: World, method: str) -> None:
    headers = dict(TUS)
    body = b""
    if method == "PATCH":
        headers |= {"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
        body = b"x"
    for payload in PAYLOADS:
        target = "/uploads/" + url_form(payload)
        if target == "/uploads/":
            continue  # the collection
        reply = send(world.port, method, target, headers, body)
        if reply.status == 307:
            # Starlette's trailing-slash redirect ("/uploads/../" -> "/uploads/.."):
            # it must stay on this server, and where it leads must refuse too.
            location = reply.headers["location"]
            assert location.startswith("http://127.0.0.1/uploads/"), location
            path = location.removeprefix("http://127.0.0.1")
            reply = send(world.port, method, path, headers, body)
        refused(reply, f"{method} {target[:60]}")


def test_tus_names_are_labels_or_refused(world: World) -> None:
    kept = 0
    for i, name in enumerate(NAMES):
        content = f"tus {i}".encode()
        metadata = "filename " + base64.b64encode(name.encode()).decode()
        reply = send(
            world.port,
            "POST",
            "/uploads/",
            TUS
            | {
                "Upload-Length": str(len(content)),
                "Upload-Metadata": metadata,
                "Content-Type": "application/offset+octet-stream",
            },
            content,
        )
        if reply.status != 201:
            refused(reply, f"tus {name[:40]!r}")
            continue
        file_id = reply.headers.get("tidewire-file")
        assert file_id, "creation-with-upload of every byte makes the file"
        meta = send(world.port, "GET", f"/files/{file_id}/meta").json()
        assert meta["name"] == (name or "upload"), "the label as sent (or tus's default)"
        check_stored(world, meta, content)
        kept += 1
    assert kept >= len(LABELS)
