"""One rule for names and types, whichever way a file comes in: PUT, multipart, tus."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tidewire import Tidewire
from tidewire.server.compat import add_original_file_routes
from tidewire.server.names import MAX_NAME, NAME_SCHEMA, clean_name
from tidewire.server.uploads import file_name_and_type
from tidewire.storage.local import LocalStorage

from ..conftest import QUICK, LiveServer


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


#: Characters that change how a name reads without being seen (Unicode Cf, Zl, Zp).
INVISIBLE = {
    "\u202e": "RIGHT-TO-LEFT OVERRIDE",
    "\u202a": "LEFT-TO-RIGHT EMBEDDING",
    "\u2066": "LEFT-TO-RIGHT ISOLATE",
    "\u2069": "POP DIRECTIONAL ISOLATE",
    "\u200f": "RIGHT-TO-LEFT MARK",
    "\u061c": "ARABIC LETTER MARK",
    "\u200b": "ZERO WIDTH SPACE",
    "\u2060": "WORD JOINER",
    "\ufeff": "ZERO WIDTH NO-BREAK SPACE",
    "\u00ad": "SOFT HYPHEN",
    "\u2028": "LINE SEPARATOR",
    "\U000e0041": "TAG LATIN CAPITAL LETTER A",
}


@pytest.mark.parametrize("char", INVISIBLE)
def test_invisible_characters_are_refused_by_name(char: str) -> None:
    with pytest.raises(ValueError) as refused:
        clean_name(f"photo{char}gpj.exe")
    code = f"U+{ord(char):04X}"
    assert f"{code} ({INVISIBLE[char]})" in str(refused.value)
    assert char not in str(refused.value), "the message shows the code, not the character"


def test_joiners_that_spell_words_are_names() -> None:
    # ZWNJ in Persian ("mi-khaham"), ZWJ in an emoji sequence: spelling, not a disguise.
    for name in (
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645.txt",
        "\U0001f469\u200d\U0001f4bb.png",
    ):
        assert clean_name(name) == name


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
    for bad in ("n" * (MAX_NAME + 1), "a\x1bb", "photo\u202egpj.exe", "a\u2066b.txt"):
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


# -- lookups by name, and names stored before the rule ----------------------


Lookup = Callable[[httpx.Client, str], httpx.Response]

LOOKUPS: dict[str, Lookup] = {
    "GET /files?name=": lambda client, name: client.get("/files", params={"name": name}),
    "downloadfile query": lambda client, name: client.post(
        "/downloadfile/", params={"filename": name}
    ),
    "downloadfile JSON": lambda client, name: client.post(
        "/downloadfile/", json={"filename": name}
    ),
    "downloadfile form": lambda client, name: client.post(
        "/downloadfile/", data={"filename": name}
    ),
}


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_lookups_by_name_refuse_what_no_upload_may_store(client: httpx.Client, lookup: str) -> None:
    find = LOOKUPS[lookup]
    stored_id(put(client, "photo.jpg", "image/jpeg"))
    with pytest.raises(ValueError) as rule:
        clean_name("photo\u202egpj.jpg")
    response = find(client, "photo\u202egpj.jpg")
    assert response.status_code == 422, response.text
    assert str(rule.value) in response.json()["detail"]
    found = find(client, "photo.jpg")
    assert found.status_code == 200, found.text


def test_a_name_stored_before_the_rule_is_sent_without_its_bidi_controls(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "data")

    async def store() -> str:
        async def body() -> AsyncIterator[bytes]:
            yield b"MZ"

        # Straight into the storage, as an upload before names.py refused it did.
        info = await storage.save(
            body(), name="photo\u202egpj.exe", type="application/octet-stream"
        )
        return info.id

    file_id = asyncio.run(store())
    with httpx.Client(base_url=serve(Tidewire(storage=storage, settings=QUICK)).url) as client:
        disposition = client.get(f"/files/{file_id}").headers["content-disposition"]
    assert disposition == (
        "attachment; filename=\"photogpj.exe\"; filename*=UTF-8''photogpj.exe"
    ), "the name reads as the .exe it is"


def test_the_openapi_schema_refuses_what_clean_name_refuses() -> None:
    # Every character of the planes where format characters live, alone and
    # between letters: the schema's pattern and clean_name agree on each.
    pattern = re.compile(str(NAME_SCHEMA["pattern"]))
    for code in [*range(0x20000), *range(0xE0000, 0xE1000)]:
        for name in (chr(code), f"a{chr(code)}b"):
            try:
                clean_name(name)
                accepted = True
            except ValueError:
                accepted = False
            assert bool(pattern.match(name)) == accepted, f"U+{code:04X} in {name!r}"
