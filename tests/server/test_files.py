"""/files: uploads (multipart, raw), listing, downloads with ranges and validators."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import socket
import tracemalloc
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidewire import Settings, Tidewire
from tidewire.server.compat import add_original_file_routes
from tidewire.server.headers import (
    Unsatisfiable,
    clean_type,
    content_disposition,
    etag_matches,
    if_range_matches,
    inline_safe,
    parse_range,
)
from tidewire.server.names import MAX_NAME, clean_name, invisible
from tidewire.storage import FileInfo, Storage, StorageFull, from_url
from tidewire.storage.local import LocalStorage

from ..conftest import QUICK, LiveServer, wait_for
from ..s3_server import s3_bucket_fixture, s3_server_fixture  # noqa: F401

# -- headers (pure) --------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, [(0, 10)]),
        ("bytes=90-", 100, [(90, 100)]),
        ("bytes=-10", 100, [(90, 100)]),
        ("bytes=-1000", 100, [(0, 100)]),
        ("bytes=95-1000", 100, [(95, 100)]),
        ("BYTES = 0-0 , 5-5", 100, [(0, 1), (5, 6)]),
        ("bytes=50-59,0-9", 100, [(0, 10), (50, 60)]),  # sorted
        ("bytes=0-9,5-14,15-19", 100, [(0, 20)]),  # overlapping and adjacent merged
        ("bytes=0-1,,4-5", 100, [(0, 2), (4, 6)]),  # empty elements skipped
        ("bytes=0-9,200-300", 100, [(0, 10)]),  # the unsatisfiable one is dropped
        # Ignored: the whole file is sent.
        ("items=0-9", 100, None),
        ("bytes0-9", 100, None),
        ("bytes=", 100, None),
        ("bytes=9-0", 100, None),
        ("bytes=-", 100, None),
        ("bytes=a-b", 100, None),
        ("bytes=1-2-3", 100, None),
        ("bytes=+1-2", 100, None),
        ("bytes=0-" + "9" * 5000, 100, None),
        ("bytes=" + ",".join(["0-0"] * 101), 100, None),
        ("bytes=-5", 0, None),
    ],
)
def test_parse_range(header: str, size: int, expected: list[tuple[int, int]] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-0", 0)],
)
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)


_spec = st.one_of(
    st.tuples(st.integers(0, 60), st.none() | st.integers(0, 60)),
    st.tuples(st.none(), st.integers(0, 60)),
)


@given(size=st.integers(0, 50), specs=st.lists(_spec, min_size=1, max_size=6))
def test_parse_range_against_a_model(size: int, specs: list[tuple[int | None, int | None]]) -> None:
    header = "bytes=" + ",".join(
        f"{'' if a is None else a}-{'' if b is None else b}" for a, b in specs
    )
    # The model: the set of bytes asked for, by the letter of RFC 9110.
    wanted: set[int] = set()
    invalid = empty_file_suffix = False
    for first, last in specs:
        if first is None:
            assert last is not None
            wanted |= set(range(max(size - last, 0), size)) if last else set()
            empty_file_suffix |= size == 0 and last > 0
        elif last is not None and last < first:
            invalid = True
        else:
            wanted |= set(range(first, size if last is None else min(last + 1, size)))
    if invalid or (not wanted and empty_file_suffix):
        assert parse_range(header, size) is None
        return
    if not wanted:
        with pytest.raises(Unsatisfiable):
            parse_range(header, size)
        return
    ranges = parse_range(header, size)
    assert ranges is not None
    got = [i for start, end in ranges for i in range(start, end)]
    assert got == sorted(wanted), "every byte asked for, once, in order"
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end < start, "ranges are merged when they touch"


def test_etag_matches() -> None:
    tag = '"abc"'
    assert etag_matches('"abc"', tag)
    assert etag_matches("*", tag)
    assert etag_matches(' "x" , W/"abc"', tag), "weak comparison, in a list"
    assert etag_matches('"a,b", "abc"', tag), "a comma inside a tag is not a separator"
    assert not etag_matches('"abcd"', tag)
    assert not etag_matches("abc", tag), "unquoted: malformed, no match"
    assert not etag_matches('"x", junk', tag)


def test_if_range_matches() -> None:
    tag, modified = '"abc"', 1_700_000_000.25
    assert if_range_matches('"abc"', tag, modified)
    assert not if_range_matches('W/"abc"', tag, modified), "never with a weak tag"
    assert not if_range_matches('"abd"', tag, modified)
    assert if_range_matches(formatdate(modified, usegmt=True), tag, modified)
    assert not if_range_matches(formatdate(modified - 10, usegmt=True), tag, modified)
    assert not if_range_matches("not a date", tag, modified)


def _disposition(header: str) -> tuple[str, str, str]:
    """(type, filename=, decoded filename*=) of a Content-Disposition we made."""
    kind, fallback, star = (p.strip() for p in header.split(";"))
    assert fallback.startswith('filename="') and fallback.endswith('"')
    assert star.startswith("filename*=UTF-8''")
    return kind, fallback[10:-1], unquote(star.removeprefix("filename*=UTF-8''"))


@given(st.text(min_size=1, max_size=80).filter(lambda s: s.strip(". ")))
def test_content_disposition_round_trips_any_name(name: str) -> None:
    header = content_disposition(name)
    header.encode("ascii")  # a header value, all ASCII
    kind, fallback, decoded = _disposition(header)
    assert kind == "attachment"
    if not any(c < " " or "\x7f" <= c <= "\x9f" or invisible(c) for c in name):
        # Any name a file can have round-trips; invisible characters (only in
        # names stored before names.py refused them) are left out.
        import unicodedata

        assert decoded == unicodedata.normalize("NFC", name)
    assert not set(fallback) & set('"\\/%;'), "nothing that escapes the quotes or names a path"
    assert all(" " <= c <= "~" for c in fallback)


def test_content_disposition_examples() -> None:
    assert content_disposition("a.txt", inline=True) == (
        "inline; filename=\"a.txt\"; filename*=UTF-8''a.txt"
    )
    assert _disposition(content_disposition("报告 ü.pdf"))[1:] == ("__ _.pdf", "报告 ü.pdf")
    assert _disposition(content_disposition('../"x"\\y%2f;z'))[1] == "..__x__y_2f_z"
    for silly in ("..", ".", "...", " ", ""):
        assert _disposition(content_disposition(silly))[1:] == ("download", "download")


def test_inline_safe_and_clean_type() -> None:
    for kind in ("image/png", "text/plain; charset=utf-8", "application/pdf", "video/mp4"):
        assert inline_safe(kind), kind
    for kind in (
        "text/html",
        "image/svg+xml",
        "application/xhtml+xml",
        "text/xml",
        "application/xml",
        "text/javascript",
        "application/javascript",
        "application/octet-stream",
        "text/css",
    ):
        assert not inline_safe(kind), kind
    assert clean_type("Text/Plain; Charset=UTF-8") == "text/plain; charset=utf-8"
    assert clean_type("image/png; name=x") == "image/png"
    for bad in ("", "png", "text/html, image/png", "text/<b>", "a/b/c", None):
        assert clean_type(bad) is None, bad


def test_clean_name() -> None:
    for fine in ("a.txt", "../../etc/passwd", "C:\\x", "..", "报告", "x" * MAX_NAME):
        assert clean_name(fine) == fine
    for bad, why in (
        ("", "empty"),
        ("   ", "empty"),
        ("x" * (MAX_NAME + 1), "longer"),
        ("a\x00b", "control"),
        ("a\nb", "control"),
        ("\x1b[31mred", "control"),
    ):
        with pytest.raises(ValueError, match=why):
            clean_name(bad)


# -- a server --------------------------------------------------------------

STORAGES = ["local", "s3"]


def make_storage(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if kind == "local":
        return LocalStorage(tmp_path / "data")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return from_url(server.url(bucket))


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "data")


Start = Callable[..., httpx.Client]


@pytest.fixture
def start(serve: Callable[..., LiveServer]) -> Iterator[Start]:
    """A client of a fresh server over `storage`, with the original routes mounted."""
    clients: list[httpx.Client] = []

    def start(storage: Storage, settings: Settings = QUICK) -> httpx.Client:
        tw = Tidewire(storage=storage, settings=settings)
        add_original_file_routes(tw.router, tw)
        live = serve(tw)
        client = httpx.Client(base_url=live.url, timeout=10)
        client.live = live  # type: ignore[attr-defined]
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.close()


@pytest.fixture(params=STORAGES)
def client(request: pytest.FixtureRequest, tmp_path: Path, start: Start) -> httpx.Client:
    """A server over local storage, then over S3."""
    return start(make_storage(request.param, request, tmp_path))


@pytest.fixture
def local_client(local: LocalStorage, start: Start) -> httpx.Client:
    return start(local)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(client: httpx.Client, name: str, data: bytes, **headers: str) -> dict[str, Any]:
    response = client.put(f"/files/{quote(name)}", content=data, headers=headers)
    assert response.status_code == 201, response.text
    meta: dict[str, Any] = response.json()
    return meta


DATA = os.urandom(300_000)  # a few chunks on every path


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    """Send bytes as they are (no client normalises them); the raw response, to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


# -- uploads ---------------------------------------------------------------


def test_multipart_upload_of_one_and_several_files(client: httpx.Client) -> None:
    one = client.post("/files", files={"file": ("one.txt", b"first", "text/plain")})
    assert one.status_code == 201
    [meta] = one.json()
    assert meta["name"] == "one.txt" and meta["size"] == 5 and meta["sha256"] == sha(b"first")
    assert meta["type"] == "text/plain" and meta["url"] == f"/files/{meta['id']}"

    several = client.post(
        "/files",
        files=[
            ("file", ("a.bin", DATA, "application/octet-stream")),
            ("note", (None, "a plain field, ignored")),
            ("file", ("empty.txt", b"")),
            ("file", ("", b"")),  # an empty file input: ignored
            ("file", ("photo.png", b"\x89PNG....")),
        ],
    )
    assert several.status_code == 201, several.text
    metas = several.json()
    assert [m["name"] for m in metas] == ["a.bin", "empty.txt", "photo.png"]
    assert [m["size"] for m in metas] == [len(DATA), 0, 8]
    assert metas[0]["sha256"] == sha(DATA)
    # The generic type says nothing: the name does.
    assert [m["type"] for m in metas] == ["application/octet-stream", "text/plain", "image/png"]
    assert client.get(metas[0]["url"]).content == DATA
    assert client.get(metas[1]["url"]).content == b""


def test_multipart_errors_say_what_to_send(local_client: httpx.Client) -> None:
    none = local_client.post("/files", files={"other": ("x.txt", b"x")})
    assert none.status_code == 422
    assert "named 'file'" in none.json()["detail"]
    not_multipart = local_client.post("/files", content=b"x")
    assert not_multipart.status_code == 415
    assert "multipart/form-data" in not_multipart.json()["detail"]
    no_boundary = local_client.post(
        "/files", content=b"x", headers={"content-type": "multipart/form-data"}
    )
    assert no_boundary.status_code == 400
    cut = local_client.post(
        "/files",
        content=b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert cut.status_code == 400 and "malformed" in cut.json()["detail"]
    long_boundary = "b" * 300  # over python-multipart's limit
    for path in ("/files", "/uploadfile/", "/downloadfile/"):
        response = local_client.post(
            path,
            content=f"--{long_boundary}--".encode(),
            headers={"content-type": f"multipart/form-data; boundary={long_boundary}"},
        )
        assert response.status_code == 400, path
        assert "malformed multipart" in response.json()["detail"]
    assert local_client.get("/files").json() == []


def test_mangled_multipart_is_never_a_500(local_client: httpx.Client) -> None:
    valid = (
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n'
        b"Content-Type: text/plain\r\n\r\nhello\r\n"
        b'--B\r\nContent-Disposition: form-data; name="x"\r\n\r\nv\r\n--B--\r\n'
    )
    rng = random.Random(7)
    statuses = set()
    for _ in range(150):
        body = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(body))
            if rng.random() < 0.5:
                body[at] = rng.randrange(256)
            else:
                del body[at : at + rng.randint(1, 10)]
        response = local_client.post(
            "/files",
            content=bytes(body),
            headers={"content-type": "multipart/form-data; boundary=B"},
        )
        assert response.status_code in (201, 400, 422), bytes(body)
        statuses.add(response.status_code)
    assert statuses == {201, 400, 422}, "the mutations reach every outcome"


def test_put_raw_body(client: httpx.Client) -> None:
    response = client.put("/files/report.csv", content=DATA)
    assert response.status_code == 201
    meta = response.json()
    assert response.headers["location"] == meta["url"]
    assert meta["name"] == "report.csv" and meta["size"] == len(DATA)
    assert meta["sha256"] == sha(DATA) and meta["type"] == "text/csv"
    assert client.get(meta["url"]).content == DATA
    assert client.get(f"{meta['url']}/meta").json() == meta


def test_put_content_type(local_client: httpx.Client) -> None:
    # curl -T sends no type, curl --data-binary a form type: both say nothing.
    assert put(local_client, "a.png", b"x")["type"] == "image/png"
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert put(local_client, "b.json", b"{}", **form)["type"] == "application/json"
    assert put(local_client, "c", b"x")["type"] == "application/octet-stream"
    # A type that says something is kept (cleaned); a malformed one is not.
    assert put(local_client, "d.bin", b"x", **{"content-type": "Image/GIF"})["type"] == "image/gif"
    bad = {"content-type": "text/html, image/png"}
    assert put(local_client, "e.txt", b"x", **bad)["type"] == "text/plain"


def test_put_with_a_unicode_name(client: httpx.Client) -> None:
    name = "报告 «final» ü.txt"
    meta = put(client, name, b"hello")
    assert meta["name"] == name
    response = client.get(meta["url"])
    kind, fallback, decoded = _disposition(response.headers["content-disposition"])
    assert (kind, decoded) == ("inline", name)
    assert fallback == "__ _final_ _.txt"


def test_bad_names_are_422(local_client: httpx.Client) -> None:
    for path, why in (
        ("/files/", "empty"),
        (f"/files/{'x' * 300}", "longer"),
        ("/files/a%00b", "control"),
    ):
        response = local_client.put(path, content=b"x")
        assert response.status_code == 422, path
        assert why in response.json()["detail"]
    bad = local_client.post("/files", files={"file": ("a\x1bb", b"x")})
    assert bad.status_code == 422 and "control" in bad.json()["detail"]
    assert local_client.get("/files").json() == []


# -- size limits and failures ------------------------------------------------

SMALL = Settings(heartbeat=0.3, max_file_size=1000)


def test_declared_length_over_the_limit_is_413_before_the_body(
    local: LocalStorage, start: Start
) -> None:
    client = start(local, SMALL)
    port = client.live.port  # type: ignore[attr-defined]
    # Headers only: the server answers without waiting for a byte of the body.
    raw = raw_request(
        port,
        b"PUT /files/big.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n",
        timeout=5,
    )
    assert status_of(raw) == 413
    assert b"at most 1000 bytes" in raw
    assert client.get("/files").json() == []
    # At the limit is fine.
    assert client.put("/files/ok.bin", content=b"x" * 1000).status_code == 201


def chunks(total: int, size: int = 256) -> Iterator[bytes]:
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


def test_chunked_body_over_the_limit_is_413_and_nothing_is_stored(
    local: LocalStorage, start: Start, tmp_path: Path
) -> None:
    client = start(local, SMALL)
    response = client.put("/files/big.bin", content=chunks(5000))
    assert response.status_code == 413
    assert "1000 bytes" in response.json()["detail"]
    # In a multipart request too, and the files before it are taken back.
    response = client.post(
        "/files",
        files=[("file", ("small.txt", b"fits")), ("file", ("big.bin", b"y" * 1001))],
    )
    assert response.status_code == 413
    assert client.get("/files").json() == []
    assert list((tmp_path / "data" / "files").iterdir()) == []
    assert list((tmp_path / "data" / "tmp").iterdir()) == []


class FullStorage(LocalStorage):
    """A disk that fills up after `room` bytes of a save."""

    room = 2000

    async def save(self, chunks: Any, **kwargs: Any) -> FileInfo:
        async def filling() -> Any:
            seen = 0
            async for chunk in chunks:
                seen += len(chunk)
                if seen > self.room:
                    raise StorageFull("no space left in the storage")
                yield chunk

        return await super().save(filling(), **kwargs)


def test_full_storage_is_507_and_nothing_is_stored(start: Start, tmp_path: Path) -> None:
    client = start(FullStorage(tmp_path / "data"))
    response = client.put("/files/big.bin", content=b"z" * 5000)
    assert response.status_code == 507
    assert "full" in response.json()["detail"]
    assert client.post("/files", files={"file": ("big", b"z" * 5000)}).status_code == 507
    assert client.get("/files").json() == []
    assert list((tmp_path / "data" / "tmp").iterdir()) == []


@pytest.mark.parametrize("kind", ["put", "multipart"])
def test_client_that_leaves_mid_upload_leaves_nothing(
    local: LocalStorage, start: Start, tmp_path: Path, kind: str
) -> None:
    client = start(local)
    port = client.live.port  # type: ignore[attr-defined]
    if kind == "put":
        head = b"PUT /files/partial.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
        body = b"p" * 200_000
    else:
        head = (
            b"POST /files HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
            b"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n"
        )
        body = (
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\n'
            b"whole\r\n"
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="b.bin"\r\n\r\n'
            + b"p"
            * 200_000
        )
    tmp = tmp_path / "data" / "tmp"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + body)
        # The save is under way (a file in tmp/) when the client goes.
        wait_for(lambda: tmp.exists() and any(tmp.iterdir()), message="the save never began")
    wait_for(lambda: not any(tmp.iterdir()), message="the partial file was left behind")
    # The files saved before it go once the request has wound up, a moment later.
    wait_for(lambda: client.get("/files").json() == [], message="a saved file was left behind")
    assert list((tmp_path / "data" / "files").iterdir()) == []


def test_multipart_upload_streams_in_flat_memory(local_client: httpx.Client) -> None:
    total = 24 << 20
    boundary = b"flatmemory"

    def body() -> Iterator[bytes]:
        yield (
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; '
            b'filename="big.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
        )
        yield from chunks(total, 256 << 10)
        yield b"\r\n--" + boundary + b"--\r\n"

    tracemalloc.start()
    try:
        response = local_client.post(
            "/files",
            content=body(),
            headers={"content-type": f"multipart/form-data; boundary={boundary.decode()}"},
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 201, response.text
    [meta] = response.json()
    assert meta["size"] == total
    # The client, the server and the storage share this process: all of them
    # together held a small fraction of the file at any time.
    assert peak < total / 4, f"peak {peak} bytes for a {total}-byte upload"


# -- listing, metadata, deletion ---------------------------------------------


def test_list_newest_first_with_pages(local_client: httpx.Client) -> None:
    ids = [put(local_client, f"f{i}.txt", b"x")["id"] for i in range(5)]
    seen: list[str] = []
    url: str | None = "/files?limit=2"
    pages = 0
    while url is not None:
        response = local_client.get(url)
        assert response.status_code == 200
        seen += [m["id"] for m in response.json()]
        pages += 1
        link = response.headers.get("link")
        cursor = response.headers.get("tidewire-next-cursor")
        assert (link is None) == (cursor is None)
        if link is None:
            url = None
        else:
            url = link.removeprefix("<").split(">")[0]
            assert link.endswith('; rel="next"') and f"cursor={cursor}" in url
    assert seen == ids[::-1]
    assert pages == 3
    assert [m["id"] for m in local_client.get("/files").json()] == ids[::-1]
    assert [m["id"] for m in local_client.get("/files/").json()] == ids[::-1]
    for bad in ("0", "1001", "x"):
        assert local_client.get(f"/files?limit={bad}").status_code == 422


def test_meta_and_delete(client: httpx.Client) -> None:
    meta = put(client, "gone.txt", b"bye")
    assert client.get(f"/files/{meta['id']}/meta").json() == meta
    assert client.delete(meta["url"]).status_code == 204
    for response in (
        client.get(meta["url"]),
        client.head(meta["url"]),
        client.get(f"{meta['url']}/meta"),
        client.delete(meta["url"]),
    ):
        assert response.status_code == 404
        if response.request.method != "HEAD":
            assert response.json()["detail"].startswith("no file")
    assert client.get("/files").json() == []


@pytest.mark.parametrize("bad", ["nope", "0" * 22 + "w", "A" * 22, "0" * 22])
def test_unknown_or_malformed_ids_are_404(local_client: httpx.Client, bad: str) -> None:
    for method, path in (("GET", ""), ("HEAD", ""), ("GET", "/meta"), ("DELETE", "")):
        response = local_client.request(method, f"/files/{bad}{path}")
        assert response.status_code == 404, (method, path)


# -- downloads -------------------------------------------------------------


def test_download_whole_with_validators(client: httpx.Client) -> None:
    meta = put(client, "data.txt", DATA)
    # As stored: text may otherwise come gzipped (test_http_caching.py).
    response = client.get(meta["url"], headers={"accept-encoding": "identity"})
    assert response.status_code == 200
    assert response.content == DATA
    headers = response.headers
    assert headers["content-length"] == str(len(DATA))
    assert headers["etag"] == f'"{meta["sha256"]}"'
    assert headers["last-modified"] == formatdate(meta["created"], usegmt=True)
    assert headers["accept-ranges"] == "bytes"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["content-type"] == "text/plain"
    assert headers["content-disposition"].startswith("inline;")
    assert "content-security-policy" not in headers

    head = client.head(meta["url"])
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(DATA))
    assert head.headers["etag"] == headers["etag"]
    # Ranges are for GET only: HEAD ignores them.
    assert client.head(meta["url"], headers={"range": "bytes=0-0"}).status_code == 200


def test_single_ranges(client: httpx.Client) -> None:
    meta = put(client, "data.bin", DATA)
    size = len(DATA)
    for header, (start, end) in (
        ("bytes=0-0", (0, 1)),
        ("bytes=1000-70999", (1000, 71000)),
        ("bytes=-500", (size - 500, size)),
        (f"bytes={size - 10}-", (size - 10, size)),
        (f"bytes=5-{size * 2}", (5, size)),
    ):
        response = client.get(meta["url"], headers={"range": header})
        assert response.status_code == 206, header
        assert response.content == DATA[start:end], header
        assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
        assert response.headers["content-length"] == str(end - start)


def parse_byteranges(response: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part of a multipart/byteranges response."""
    kind, _, boundary = response.headers["content-type"].partition("; boundary=")
    assert kind == "multipart/byteranges" and boundary
    body = response.content
    assert body.endswith(f"--{boundary}--".encode())
    parts = []
    for raw in body.split(f"--{boundary}".encode())[1:-1]:
        head, _, content = raw.partition(b"\r\n\r\n")
        assert content.endswith(b"\r\n")
        lines = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n") if line)
        assert lines["Content-Type"] == "application/octet-stream"
        parts.append((lines["Content-Range"], content[:-2]))
    assert len(body) == int(response.headers["content-length"])
    return parts


def test_multiple_ranges(client: httpx.Client) -> None:
    meta = put(client, "data.bin", DATA)
    size = len(DATA)
    response = client.get(meta["url"], headers={"range": "bytes=200000-200009, 0-99, -5, 50-149"})
    assert response.status_code == 206
    assert (
        parse_byteranges(response)
        == [
            (f"bytes 0-149/{size}", DATA[:150]),  # 0-99 and 50-149 merged
            (f"bytes 200000-200009/{size}", DATA[200000:200010]),
            (f"bytes {size - 5}-{size - 1}/{size}", DATA[-5:]),
        ]
    )


def test_unsatisfiable_and_ignored_ranges(client: httpx.Client) -> None:
    meta = put(client, "data.bin", DATA)
    size = len(DATA)
    response = client.get(meta["url"], headers={"range": f"bytes={size}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{size}"
    assert f"{size} bytes" in response.json()["detail"]
    for ignored in ("bytes=9-3", "lines=1-2", "bytes=x"):
        response = client.get(meta["url"], headers={"range": ignored})
        assert response.status_code == 200, ignored
        assert response.content == DATA


def test_if_range(client: httpx.Client) -> None:
    meta = put(client, "data.bin", DATA)
    etag = f'"{meta["sha256"]}"'
    date = formatdate(meta["created"], usegmt=True)
    for if_range, status in (
        (etag, 206),
        (date, 206),
        ('"something-else"', 200),
        (f"W/{etag}", 200),
        ("Mon, 01 Jan 2001 00:00:00 GMT", 200),
    ):
        response = client.get(meta["url"], headers={"range": "bytes=0-9", "if-range": if_range})
        assert response.status_code == status, if_range
        assert response.content == (DATA[:10] if status == 206 else DATA)


def test_if_none_match_and_if_modified_since(client: httpx.Client) -> None:
    meta = put(client, "data.bin", DATA)
    etag = f'"{meta["sha256"]}"'
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        for method in ("GET", "HEAD"):
            response = client.request(method, meta["url"], headers={"if-none-match": header})
            assert response.status_code == 304, (method, header)
            assert response.content == b""
            assert response.headers["etag"] == etag
    assert client.get(meta["url"], headers={"if-none-match": '"other"'}).status_code == 200
    later = formatdate(meta["created"] + 60, usegmt=True)
    earlier = formatdate(meta["created"] - 60, usegmt=True)
    assert client.get(meta["url"], headers={"if-modified-since": later}).status_code == 304
    assert client.get(meta["url"], headers={"if-modified-since": earlier}).status_code == 200
    # If-None-Match wins over If-Modified-Since.
    both = {"if-none-match": '"other"', "if-modified-since": later}
    assert client.get(meta["url"], headers=both).status_code == 200


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("page.html", "text/html"),
        ("logo.svg", "image/svg+xml"),
        ("feed.xml", "application/xml"),
        ("app.js", "text/javascript"),
        ("page.xhtml", "application/xhtml+xml"),
    ],
)
def test_scriptable_types_are_sandboxed_attachments(
    local_client: httpx.Client, name: str, kind: str
) -> None:
    meta = put(local_client, name, b"<script>alert(1)</script>", **{"content-type": kind})
    response = local_client.get(meta["url"])
    assert response.headers["content-disposition"].startswith("attachment;")
    assert response.headers["content-security-policy"] == "sandbox"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_download_query_forces_an_attachment(local_client: httpx.Client) -> None:
    meta = put(local_client, "photo.png", b"\x89PNG")
    assert local_client.get(meta["url"]).headers["content-disposition"].startswith("inline;")
    forced = local_client.get(meta["url"], params={"download": "1"})
    assert forced.headers["content-disposition"].startswith("attachment;")
    # An uploader cannot make HTML look like an image: the stored type is what is sent,
    # and nosniff stops the browser from guessing otherwise.
    html_as_png = put(local_client, "x.png", b"<html><script>1</script>")
    assert local_client.get(html_as_png["url"]).headers["content-type"] == "image/png"


def test_accel_redirect(local: LocalStorage, start: Start) -> None:
    client = start(local, Settings(heartbeat=0.3, accel_redirect="/_tidewire_files/"))
    meta = put(client, "page.html", DATA)
    response = client.get(meta["url"])
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["x-accel-redirect"] == f"/_tidewire_files/{meta['id']}"
    assert response.headers["content-type"] == "text/html"
    assert response.headers["content-disposition"].startswith("attachment;")
    assert response.headers["content-security-policy"] == "sandbox"
    assert response.headers["etag"] == f'"{meta["sha256"]}"'
    # The path nginx is to send: the storage's file of that id.
    assert (local.root / "files" / meta["id"]).read_bytes() == DATA
    # Conditional requests are still ours; HEAD is answered directly.
    etag = {"if-none-match": response.headers["etag"]}
    assert client.get(meta["url"], headers=etag).status_code == 304
    head = client.head(meta["url"])
    assert "x-accel-redirect" not in head.headers
    assert head.headers["content-length"] == str(len(DATA))


def test_routes_are_documented(local_client: httpx.Client) -> None:
    spec = local_client.get("/openapi.json").json()
    paths = spec["paths"]
    post = paths["/files"]["post"]
    assert post["tags"] == ["files"] and post["summary"]
    assert "multipart/form-data" in post["requestBody"]["content"]
    # PUT /files/<name> shares the path of GET /files/<id>: one URL space, one template.
    put_ = paths["/files/{file_id}"]["put"]
    assert "application/octet-stream" in put_["requestBody"]["content"]
    for method in ("get", "head", "delete"):
        assert paths["/files/{file_id}"][method]["tags"] == ["files"]
    assert paths["/files/{file_id}/meta"]["get"]["summary"]
    assert paths["/files"]["get"]["parameters"]
    assert "/uploadfile/" in paths and "/downloadfile/" in paths
