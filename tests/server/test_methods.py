"""Methods a path allows: `405` and `OPTIONS` list all of them, and a file's
metadata is not a name to `PUT` to."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tidewire import Tidewire
from tidewire.storage.local import LocalStorage

from ..conftest import QUICK, LiveServer


def allow(response: httpx.Response) -> list[str]:
    return [method.strip() for method in response.headers["allow"].split(",")]


@pytest.fixture
def client(serve: Callable[..., LiveServer], tmp_path: Path) -> Iterator[httpx.Client]:
    tw = Tidewire(storage=LocalStorage(tmp_path), settings=QUICK)

    @tw.stream
    async def count(n: int = 2):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    with httpx.Client(base_url=serve(tw).url, timeout=10) as client:
        yield client


def test_options_lists_every_method_of_a_file(client: httpx.Client) -> None:
    meta = client.put("/files/a.txt", content=b"x").json()
    response = client.options(meta["url"])
    assert response.status_code == 204
    # PUT too: PUT /files/<name> uploads a new file named so (the id is a name like any other).
    assert allow(response) == ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"]
    # Every method a path does not serve gets the same list, not one route's.
    patched = client.patch(meta["url"], content=b"x")
    assert patched.status_code == 405
    assert allow(patched) == ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"]
    assert "PATCH" in patched.json()["detail"]


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/files", ["GET", "POST", "OPTIONS"]),
        ("/files/0123456789abcdefghijkl/meta", ["GET", "OPTIONS"]),
        ("/streams/count", ["GET", "POST", "OPTIONS"]),
        ("/runs/0123", ["GET", "DELETE", "OPTIONS"]),
        ("/channels/news/events", ["GET", "HEAD", "POST", "OPTIONS"]),
    ],
)
def test_options_and_405_agree(client: httpx.Client, path: str, methods: list[str]) -> None:
    options = client.options(path)
    assert options.status_code == 204 and allow(options) == methods
    refused = client.request("TRACE", path)
    assert refused.status_code == 405 and allow(refused) == methods


def test_options_of_nothing_is_404(client: httpx.Client) -> None:
    assert client.options("/nothing/here").status_code == 404


def test_put_to_a_files_metadata_is_405_and_stores_nothing(client: httpx.Client) -> None:
    meta = client.put("/files/a.txt", content=b"x").json()
    for path in (f"{meta['url']}/meta", "/files/not-an-id/meta"):
        response = client.put(path, content=b"overwrite?")
        assert response.status_code == 405, path
        assert allow(response) == ["GET", "OPTIONS"]
        assert "allows GET" in response.json()["detail"]
    assert [info["name"] for info in client.get("/files").json()] == ["a.txt"]
    # Deeper names with slashes are still labels (names.py: they are never paths).
    deeper = client.put("/files/reports/2024/meta", content=b"y")
    assert deeper.status_code == 201 and deeper.json()["name"] == "reports/2024/meta"


def test_a_routes_own_405_keeps_its_allow(client: httpx.Client) -> None:
    # tus's X-HTTP-Method-Override naming a method the upload does not have:
    # POST is served there, so the answer is tus's, with tus's list.
    response = client.post(
        "/uploads/0123", headers={"X-HTTP-Method-Override": "GET", "Tus-Resumable": "1.0.0"}
    )
    assert response.status_code == 405
    assert allow(response) == ["OPTIONS", "HEAD", "PATCH", "DELETE"]
    assert response.headers["tus-resumable"] == "1.0.0"
