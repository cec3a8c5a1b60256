"""Large blobs travel as files.

An event's data may hold bytes of any size, but every watcher of every
transport would carry a big image inline, base64 and all, and every log would
keep it. Past `Settings.inline_blob_limit` a blob is saved to storage once and
the event carries `{"$blob": {"type", "size", "url": "/files/<id>"}}` instead;
clients fetch it when they want it (with ranges, caching and resume).

Encoding stays pure (`events.dump_data` raises `LargeBlob`); this is the I/O
around it. The files are ordinary files: listed, and deleted like any other.
"""

from __future__ import annotations

import mimetypes
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from .events import Blob, LargeBlob, dump_data, large_blobs
from .storage import Storage

__all__ = ["Blobs", "Pending"]


@dataclass(frozen=True, slots=True)
class Pending:
    """An item whose data holds a blob too large to inline: it must be stored first."""

    event: str
    data: Any


class Blobs:
    """Encodes event data, storing blobs over `limit` bytes (None: everything inline)."""

    def __init__(self, storage: Callable[[], Storage], limit: int | None) -> None:
        self._storage = storage
        self.limit = limit

    async def dump(self, data: Any) -> bytes:
        """The JSON of `data`, with its large blobs stored as files."""
        if self.limit is None:
            return dump_data(data)
        try:
            return dump_data(data, inline_limit=self.limit)
        except LargeBlob:
            pass
        urls: dict[int, str] = {}
        for blob in large_blobs(data, self.limit):
            kind = blob.type if isinstance(blob, Blob) else "application/octet-stream"
            extension = mimetypes.guess_extension(kind) or ".bin"
            info = await self._storage().save(
                _once(bytes(blob)), name=f"blob{extension}", type=kind
            )
            urls[id(blob)] = info.url
        return dump_data(data, inline_limit=self.limit, urls=urls)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
