"""What a client receives: events, and blobs that live on the server as files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from ..events import Blob, decode_blobs
from .exceptions import raise_for_status, translate

__all__ = ["Event", "RemoteBlob", "decode"]


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
    it once and returns a `Blob`.
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
            with translate():
                response = self.http.get(self.url)
            raise_for_status(response)
            self._content = Blob(response.content, self.type)
        return self._content

    async def aread(self) -> Blob:
        if self._content is None:
            if not isinstance(self.http, httpx.AsyncClient):
                raise TypeError("this blob came from a Client: use `blob.read()`")
            with translate():
                response = await self.http.get(self.url)
            raise_for_status(response)
            self._content = Blob(response.content, self.type)
        return self._content


def decode(value: Any, http: httpx.Client | httpx.AsyncClient) -> Any:
    """Turn the `$blob` objects in decoded JSON into `Blob`s and `RemoteBlob`s."""
    return decode_blobs(value, lambda url, kind, size: RemoteBlob(url, kind, size, http))
