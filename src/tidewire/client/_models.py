"""What a client receives: events, and blobs that live on the server as files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from ..events import Blob, decode_blobs
from ..storage import valid_id
from ._auth import same_origin
from .exceptions import ProtocolError, raise_for_status, translate

__all__ = ["Event", "RemoteBlob", "decode", "own_file_url"]


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a run or channel, as the server sent it.

    `data` is decoded: inline `$blob`s are `tidewire.Blob` (bytes with a
    `.type`), blobs stored as files are `RemoteBlob`s, fetched when read.
    """

    id: str
    event: str
    data: Any


@dataclass(eq=False, slots=True)
class RemoteBlob:
    """A blob too large to travel inline: the server stored it as a file at `url`.

    `read()` (with `Client`) or `await aread()` (with `AsyncClient`) fetches
    it once and returns a `Blob`. Only a file of the client's own server is
    fetched (`/files/<id>`, relative or at the client's origin): anyone who
    may publish could otherwise make every reader fetch a URL of their
    choosing, with the reader's token. Anything else is a `ProtocolError`,
    raised before any request.
    """

    url: str
    type: str
    size: int | None
    http: httpx.Client | httpx.AsyncClient = field(repr=False)
    _content: Blob | None = field(default=None, repr=False)

    def read(self) -> Blob:
        if self._content is None:
            if not isinstance(self.http, httpx.Client):
                raise TypeError("this blob came from an AsyncClient: use `await blob.aread()`")
            url = own_file_url(self.url, self.http.base_url)
            with translate():
                response = self.http.get(url)
            raise_for_status(response)
            self._content = Blob(response.content, self.type)
        return self._content

    async def aread(self) -> Blob:
        if self._content is None:
            if not isinstance(self.http, httpx.AsyncClient):
                raise TypeError("this blob came from a Client: use `blob.read()`")
            url = own_file_url(self.url, self.http.base_url)
            with translate():
                response = await self.http.get(url)
            raise_for_status(response)
            self._content = Blob(response.content, self.type)
        return self._content


def own_file_url(url: str, base: httpx.URL) -> httpx.URL:
    """`url` resolved against the client's `base`, if it is `/files/<id>` there; else
    `ProtocolError`. (The path is compared below `base`'s, for a server mounted
    under a prefix.)"""
    try:
        given = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ProtocolError(f"a blob's url is not a URL: {url!r} ({exc})") from None
    if given.is_relative_url:
        if given.host or not given.path.startswith("/") or given.query or given.fragment:
            raise _foreign(url)
        resolved = base.join(base.path.rstrip("/") + given.path)
    else:
        if not same_origin(given, base):
            raise _foreign(url)
        resolved = given
    prefix = base.path.rstrip("/") + "/files/"
    file_id = resolved.path.removeprefix(prefix)
    if not resolved.path.startswith(prefix) or not valid_id(file_id) or resolved.query:
        raise _foreign(url)
    return resolved


def _foreign(url: str) -> ProtocolError:
    return ProtocolError(
        f"a blob's url {url!r} is not a file of this server (/files/<id>): not fetched"
    )


def decode(value: Any, http: httpx.Client | httpx.AsyncClient) -> Any:
    """Turn the `$blob` objects in decoded JSON into `Blob`s and `RemoteBlob`s."""
    return decode_blobs(value, lambda url, kind, size: RemoteBlob(url, kind, size, http))
