"""Signed file links: a download without a token, until it expires; changed, refused."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest

from tests.conftest import LiveServer
from tidewire import Settings, Tidewire
from tidewire.server.links import MAX_LINK_SECONDS
from tidewire.storage.local import LocalStorage

SECRET = "k" * 32
BODY = bytes(range(256)) * 40


def token(**grant: Any) -> dict[str, str]:
    # Made at collection, which may be long before the test runs in a full suite.
    claims = {"sub": "alice", "exp": time.time() + 24 * 3600, "tidewire": grant}
    return {"authorization": f"Bearer {jwt.encode(claims, SECRET)}"}


ADMIN = token(admin=True)


@pytest.fixture
def server(serve: Callable[..., LiveServer], tmp_path: Path) -> tuple[Tidewire, LiveServer]:
    tw = Tidewire(settings=Settings(auth_secret=SECRET), storage=LocalStorage(tmp_path))
    return tw, serve(tw)


def upload(server: LiveServer, name: str = "a.bin") -> str:
    response = httpx.put(f"{server.url}/files/{name}", content=BODY, headers=ADMIN)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def make_link(server: LiveServer, file_id: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{server.url}/files/{file_id}/links", json=body, headers=token(files=["read"])
    )


def test_a_link_downloads_without_a_token_until_it_expires(
    server: tuple[Tidewire, LiveServer],
) -> None:
    tw, live = server
    file_id = upload(live)
    # Without a token or a link: refused.
    assert httpx.get(f"{live.url}/files/{file_id}").status_code == 401
    before = int(time.time())
    made = make_link(live, file_id, expires_in=120)
    assert made.status_code == 201, made.text
    link = made.json()
    assert before + 120 <= link["expires"] <= int(time.time()) + 120
    url = urlsplit(link["url"])
    assert url.path == f"/files/{file_id}"
    assert parse_qs(url.query)["exp"] == [str(link["expires"])]
    got = httpx.get(live.url + link["url"])
    assert got.status_code == 200 and got.content == BODY
    head = httpx.head(live.url + link["url"])
    assert head.status_code == 200 and head.headers["content-length"] == str(len(BODY))
    ranged = httpx.get(live.url + link["url"], headers={"range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == BODY[10:20]
    several = httpx.get(live.url + link["url"], headers={"range": "bytes=0-1,300-301"})
    assert several.status_code == 206
    assert several.headers["content-type"].startswith("multipart/byteranges")
    attachment = httpx.get(live.url + link["url"] + "&download=1")
    assert attachment.headers["content-disposition"].startswith("attachment")
    # Past its time, the same link is refused (signed here, as the route
    # would have signed it a while ago).
    past = int(time.time()) - 5
    expired = f"{live.url}/files/{file_id}?exp={past}&sig={tw.guard.sign(url.path, past)}"
    response = httpx.get(expired)
    assert response.status_code == 403
    assert "expired" in response.json()["detail"]


def test_a_link_changed_in_any_part_is_refused(server: tuple[Tidewire, LiveServer]) -> None:
    _, live = server
    file_id, other = upload(live), upload(live, "b.bin")
    link = make_link(live, file_id).json()
    exp, sig = str(link["expires"]), parse_qs(urlsplit(link["url"]).query)["sig"][0]
    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    for query_id, query in (
        (other, f"exp={exp}&sig={sig}"),  # another file
        (file_id, f"exp={int(exp) + 1}&sig={sig}"),  # a later expiry
        (file_id, f"exp={exp}&sig={flipped}"),
        (file_id, f"exp={exp}&sig="),
        (file_id, f"exp={exp}"),
        (file_id, f"sig={sig}"),
        (file_id, f"exp=0{exp}&sig={sig}"),
        (file_id, f"exp={exp}.0&sig={sig}"),
        (file_id, f"exp=-{exp}&sig={sig}"),
        (file_id, f"exp={'9' * 40}&sig={sig}"),
        (file_id, f"exp={'9' * 5000}&sig={sig}"),  # past int()'s digit limit
        (file_id, f"exp=\u0661&sig={sig}"),  # a digit, but not ASCII
    ):
        for method in ("GET", "HEAD"):
            response = httpx.request(method, f"{live.url}/files/{query_id}?{query}")
            assert response.status_code == 403, (method, query_id, query)
        # A link is judged as a link, even beside a good token.
        response = httpx.get(f"{live.url}/files/{query_id}?{query}", headers=ADMIN)
        assert response.status_code == 403
        assert "link" in response.json()["detail"]
    assert httpx.get(live.url + link["url"]).status_code == 200


def test_making_a_link_needs_files_read(server: tuple[Tidewire, LiveServer]) -> None:
    _, live = server
    file_id = upload(live)
    url = f"{live.url}/files/{file_id}/links"
    assert httpx.post(url, json={}).status_code == 401
    refused = httpx.post(url, json={}, headers=token(files=["write"]))
    assert refused.status_code == 403
    assert "read" in refused.json()["detail"]
    assert httpx.post(url, headers=token(files=["read"])).status_code == 201  # no body: 1 h
    assert make_link(live, file_id, expires_in=60.0).status_code == 201  # JSON's 60
    missing = httpx.post(f"{live.url}/files/{'0' * 22}/links", json={}, headers=ADMIN)
    assert missing.status_code == 404
    assert httpx.post(f"{live.url}/files/nonsense/links", headers=ADMIN).status_code == 404
    # Not a file name to upload to.
    assert httpx.put(url, content=b"x", headers=ADMIN).status_code == 405


@pytest.mark.parametrize(
    "expires_in", [0, -1, MAX_LINK_SECONDS + 1, 1.5, "60", True, None, [60], 10**30]
)
def test_a_link_lives_a_positive_bounded_number_of_seconds(
    server: tuple[Tidewire, LiveServer], expires_in: Any
) -> None:
    _, live = server
    response = make_link(live, upload(live), expires_in=expires_in)
    assert response.status_code == 422, response.text
    assert "expires_in" in str(response.json()["detail"])


def test_links_work_with_access_control_off(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    live = serve(Tidewire(storage=LocalStorage(tmp_path)))
    file_id = httpx.put(f"{live.url}/files/a.bin", content=BODY).json()["id"]
    link = httpx.post(f"{live.url}/files/{file_id}/links", json={"expires_in": 60}).json()
    assert httpx.get(live.url + link["url"]).content == BODY
    assert httpx.get(live.url + link["url"][:-1] + "x").status_code == 403


def test_links_hold_across_processes_with_the_same_link_secret(tmp_path: Path) -> None:
    # Workers verify the links of other workers: the key is derived, not random.
    one = Tidewire(settings=Settings(auth_secret=SECRET))
    two = Tidewire(settings=Settings(auth_secret=SECRET))
    other = Tidewire(settings=Settings(auth_secret=SECRET, link_secret="another " * 4))
    expires = int(time.time()) + 60
    sig = one.guard.sign("/files/x", expires)
    assert two.guard.link_valid("/files/x", str(expires), sig)
    assert not other.guard.link_valid("/files/x", str(expires), sig)
