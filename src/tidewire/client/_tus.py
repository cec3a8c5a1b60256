"""tus 1.0.0 as the client speaks it: the headers of each request, what the answers say.

Pure functions of their arguments (no I/O): `_transfers` decides which
requests to make and when. We speak tus ourselves on httpx rather than use
tuspy, which would bring in requests and aiohttp for three request types.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from urllib.parse import urljoin

import httpx

from ..wire import FILE_HEADER, OFFSET_STREAM, TUS_VERSION
from .exceptions import ProtocolError

__all__ = [
    "FILE_HEADER",
    "OFFSET_STREAM",
    "TUS",
    "TusState",
    "tus_create_headers",
    "tus_location",
    "tus_patch_headers",
    "tus_state",
]

TUS = {"Tus-Resumable": TUS_VERSION}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def tus_create_headers(length: int, name: str, type: str | None) -> dict[str, str]:
    """The headers of a tus creation `POST` for a file of `length` bytes."""
    metadata = [f"filename {_b64(name)}"]
    if type:
        metadata.append(f"filetype {_b64(type)}")
    return {**TUS, "Upload-Length": str(length), "Upload-Metadata": ",".join(metadata)}


def tus_patch_headers(offset: int, length: int) -> dict[str, str]:
    """The headers of a `PATCH` of `length` bytes at `offset`.

    No `Upload-Checksum`: the whole file's sha256 is checked at the end
    anyway, and with a checksum the server must drop every byte of a PATCH
    that is cut off, where without one it keeps what arrived.
    """
    return {
        **TUS,
        "Content-Type": OFFSET_STREAM,
        "Upload-Offset": str(offset),
        "Content-Length": str(length),
    }


@dataclass(frozen=True, slots=True)
class TusState:
    """Where an upload is: `offset` bytes stored; `file` is its file's id once complete."""

    offset: int
    file: str | None = None
    length: int | None = None


def tus_state(response: httpx.Response, *, default: int | None = None) -> TusState:
    """The state a tus answer reports (after `raise_for_status`)."""
    header = response.headers.get("upload-offset")
    if header is None and default is not None:
        offset = default
    else:
        try:
            offset = int(header or "")
        except ValueError:
            raise ProtocolError(
                f"{response.request.method} {response.request.url} answered"
                f" {response.status_code} without a valid Upload-Offset ({header!r})"
            ) from None
    length = response.headers.get("upload-length", "")
    return TusState(
        offset,
        response.headers.get(FILE_HEADER) or None,
        int(length) if length.isascii() and length.isdigit() else None,
    )


def tus_location(response: httpx.Response) -> str:
    """The absolute URL of the upload a creation `POST` made."""
    location = response.headers.get("location")
    if response.status_code != 201 or not location:
        raise ProtocolError(
            f"POST {response.request.url} answered {response.status_code}"
            " without the new upload's Location: is this a tus server?"
        )
    # Relative to the request (the server may be mounted under a prefix).
    return str(urljoin(str(response.request.url), location))
