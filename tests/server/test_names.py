"""One rule for names and types, whichever way a file comes in: PUT, multipart, tus."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tidewire import Tidewire
from tidewire.server.files import add_original_file_routes
from tidewire.server.names import MAX_NAME, clean_name
from tidewire.server.uploads import file_name_and_type
from tidewire.storage.local import LocalStorage

from ..conftest import QUICK, LiveServer


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_tus_metadata_names_follow_the_same_rule() -> None:
    long = "n" * (MAX_NAME + 1)
    with pytest.raises(ValueError, match=f"longer than {MAX_NAME}.*'filename' names the file"):
        file_name_and_type({"filename": long.encode()})
    with pytest.raises(ValueError, match="control characters: Upload-Metadata 'name'"):
        file_name_and_type({"name": "a\x85b".encode()})  # C1 (NEL), as clean_name refuses it
    assert file_name_and_type({"filename": b"n" * MAX_NAME})[0] == "n" * MAX_NAME
    # A blank name is no name, as an empty one always was.
    assert file_name_and_type({"filename": b"   "})[0] == "upload"


def test_tus_types_are_stored_as_other_uploads_store_them() -> None:
    # A generic type says less than the name; parameters but charset are dropped.
    assert file_name_and_type({"filename": b"a.png", "filetype": b"application/octet-stream"}) == (
        "a.png",
        "image/png",
    )
    assert file_name_and_type({"filetype": b"Text/Plain; Charset=UTF-8; x=y"})[1] == (
        "text/plain; charset=utf-8"
    )


# -- every way in, on a live server ----------------------------------------

Way = Callable[[httpx.Client, str, str], httpx.Response]


def put(client: httpx.Client, name: str, kind: str) -> httpx.Response:
    return client.put(
        f"/files/{quote(name, safe='')}", content=b"x", headers={"content-type": kind}
    )


def multipart(client: httpx.Client, name: str, kind: str) -> httpx.Response:
    return client.post("/files", files={"file": (name, b"x", kind)})


def original(client: httpx.Client, name: str, kind: str) -> httpx.Response:
    return client.post("/uploadfile/", files={"file": (name, b"x", kind)})


def tus(client: httpx.Client, name: str, kind: str) -> httpx.Response:
    return client.post(
        "/uploads/",
        content=b"x",
        headers={
            "Tus-Resumable": "1.0.0",
            "Content-Type": "application/offset+octet-stream",
            "Upload-Length": "1",
            "Upload-Metadata": f"filename {b64(name)},filetype {b64(kind)}",
        },
    )


WAYS: dict[str, tuple[Way, int]] = {  # how, and the status a bad name gets
    "PUT": (put, 422),
    "multipart": (multipart, 422),
    "uploadfile": (original, 422),
    "tus": (tus, 400),
}


def stored_id(response: httpx.Response) -> str:
    assert response.status_code in (200, 201), response.text
    if "tidewire-file" in response.headers:
        return response.headers["tidewire-file"]
    body = response.json()
    return str((body[0] if isinstance(body, list) else body)["id"])


@pytest.fixture
def client(serve: Callable[..., LiveServer], tmp_path: Path) -> Iterator[httpx.Client]:
    tw = Tidewire(storage=LocalStorage(tmp_path / "data"), settings=QUICK)
    add_original_file_routes(tw.router, tw)
    with httpx.Client(base_url=serve(tw).url, timeout=10) as client:
        yield client


@pytest.mark.parametrize("way", WAYS)
def test_every_way_in_takes_and_refuses_the_same_names(client: httpx.Client, way: str) -> None:
    send, refused = WAYS[way]
    for bad in ("n" * (MAX_NAME + 1), "a\x1bb"):
        with pytest.raises(ValueError) as rule:
            clean_name(bad)
        response = send(client, bad, "text/plain")
        assert response.status_code == refused, response.text
        assert str(rule.value) in response.json()["detail"]
    assert client.get("/files").json() == [], "a refused name stores nothing"

    for fine in ("n" * MAX_NAME, "../报告 (final).txt"):
        meta = client.get(f"/files/{stored_id(send(client, fine, 'text/plain'))}/meta").json()
        assert meta["name"] == fine


@pytest.mark.parametrize("way", WAYS)
def test_every_way_in_stores_the_same_type(client: httpx.Client, way: str) -> None:
    send, _ = WAYS[way]
    for declared, name, stored in (
        ("application/octet-stream", "photo.png", "image/png"),
        ("Text/Plain; Charset=UTF-8; x=y", "notes", "text/plain; charset=utf-8"),
    ):
        meta = client.get(f"/files/{stored_id(send(client, name, declared))}/meta").json()
        assert meta["type"] == stored, (way, declared)
