"""Large blobs travel as files.

An event's data may hold bytes of any size, but every watcher of every
transport would carry a big image inline, base64 and all, and every log would
keep it. Past `Settings.inline_blob_limit` a blob is saved to storage once and
the event carries `{"$blob": {"type", "size", "url": "/files/<id>"}}` instead;
clients fetch it when they want it (with ranges, caching and resume).

Encoding stays pure (`events.dump_data` raises `LargeBlob`); this is the I/O
around it. The files are ordinary files: listed, and deleted like any other;
but they expire with the events that carried them (`lifetimes`): the expiry
is stored with the file (storage's `expires`), so it holds across restarts,
and `expire_blobs` (run by the app's lifespan) deletes them when it is past.
Files that users upload have no expiry and are never swept.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from .config import Settings
from .events import Blob, LargeBlob, dump_data, large_blobs
from .storage import Storage

__all__ = ["RUN_SLACK", "Blobs", "Pending", "expire_blobs", "lifetimes"]

logger = logging.getLogger("tidewire")

#: How long a run may run, beyond `run_ttl`, while its blobs stay fetchable.
#: A run's event can be read until `run_ttl` after the run *ends*, which no
#: bound from the event's creation can follow for a run of any length; an hour
#: covers the streams this serves (a run yielding blobs for longer loses its
#: oldest ones first, as its history would past `run_history`).
RUN_SLACK = 3600.0


def lifetimes(settings: Settings) -> tuple[float, float | None]:
    """Seconds a blob file lives after its creation: `(of runs, of channels)`.

    Each is the longest its event can still be read, so each is at most
    max(run_ttl + RUN_SLACK, channel_max_age): a run's blob lives `run_ttl +
    RUN_SLACK` (see RUN_SLACK), a channel's `channel_max_age`, after which
    the channel has trimmed the event. With no age limit on channels (None)
    a channel's event may be read for ever, so its blobs never expire.
    """
    return settings.run_ttl + RUN_SLACK, settings.channel_max_age


@dataclass(frozen=True, slots=True)
class Pending:
    """An item whose data holds a blob too large to inline: it must be stored first."""

    event: str
    data: Any


class Blobs:
    """Encodes event data, storing blobs over `limit` bytes (None: everything inline).

    A stored blob expires `lifetime` seconds after it is stored (None: never).
    """

    def __init__(
        self, storage: Callable[[], Storage], limit: int | None, lifetime: float | None = None
    ) -> None:
        self._storage = storage
        self.limit = limit
        self.lifetime = lifetime

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
            expires = None if self.lifetime is None else time.time() + self.lifetime
            info = await self._storage().save(
                _once(bytes(blob)), name=f"blob{extension}", type=kind, expires=expires
            )
            urls[id(blob)] = info.url
        return dump_data(data, inline_limit=self.limit, urls=urls)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def expire_blobs(storage: Callable[[], Storage], interval: float) -> None:
    """Delete expired blob files now and every `interval` seconds, until cancelled.

    Meant to run for the app's whole life (started from its lifespan). A
    failed sweep is logged and the next one comes as usual.
    """
    while True:
        try:
            removed = await storage().expire_files()
            if removed:
                logger.info("removed %d expired blob files", removed)
        except Exception:
            logger.exception("removing expired blob files failed")
        await asyncio.sleep(interval)
