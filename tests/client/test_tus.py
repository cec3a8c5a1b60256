"""The tus headers the client sends, and what it reads from the answers (no server)."""

from __future__ import annotations

import httpx
import pytest

from tidewire.client._tus import tus_create_headers, tus_location, tus_patch_headers, tus_state
from tidewire.client.exceptions import ProtocolError
from tidewire.server.uploads import file_name_and_type, parse_metadata


def test_tus_metadata_is_what_the_server_reads() -> None:
    headers = tus_create_headers(10, 'ü "name",with comma.txt', "text/plain")
    assert headers["Upload-Length"] == "10" and headers["Tus-Resumable"] == "1.0.0"
    metadata = parse_metadata(headers["Upload-Metadata"])
    assert file_name_and_type(metadata) == ('ü "name",with comma.txt', "text/plain")
    assert "filetype" not in tus_create_headers(1, "x", None)["Upload-Metadata"]


def test_patch_headers_carry_no_checksum() -> None:
    # Without one the server keeps what arrived of a PATCH that is cut off.
    headers = tus_patch_headers(5, 10)
    assert headers["Upload-Offset"] == "5" and headers["Content-Length"] == "10"
    assert headers["Content-Type"] == "application/offset+octet-stream"
    assert not any(h.lower() == "upload-checksum" for h in headers)


def answer(
    status: int, headers: dict[str, str], url: str = "http://h/base/uploads/"
) -> httpx.Response:
    return httpx.Response(status, headers=headers, request=httpx.Request("POST", url))


def test_state_of_an_answer() -> None:
    state = tus_state(answer(204, {"Upload-Offset": "7", "Upload-Length": "9"}))
    assert (state.offset, state.length, state.file) == (7, 9, None)
    done = tus_state(answer(204, {"Upload-Offset": "9", "Tidewire-File": "f" * 22}))
    assert (done.offset, done.length, done.file) == (9, None, "f" * 22)
    assert tus_state(answer(201, {}), default=0).offset == 0  # creation without a body
    for bad in ({}, {"Upload-Offset": "x"}):
        with pytest.raises(ProtocolError, match="Upload-Offset"):
            tus_state(answer(204, bad))


def test_location_is_made_absolute() -> None:
    made = answer(201, {"Location": "/base/uploads/abc"})
    assert tus_location(made) == "http://h/base/uploads/abc"
    assert tus_location(answer(201, {"Location": "abc"})) == "http://h/base/uploads/abc"
    with pytest.raises(ProtocolError, match="tus server"):
        tus_location(answer(200, {"Location": "/x"}))
