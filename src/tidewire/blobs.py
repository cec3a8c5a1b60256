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
import contextlib
import logging
import mimetypes
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from .config import Settings
from .events import Blob, LargeBlob, dump_data, large_blobs
from .storage import FileNotFound, Storage

__all__ = ["RUN_SLACK", "Blobs", "Kept", "Pending", "expire_blobs", "lifetimes"]

logger = logging.getLogger("tidewire")

#: How long past `run_ttl` a run's blob lives from when it is stored, or
#: from when it was last renewed. A run's event can be read until `run_ttl`
#: after the run *ends*, which no bound from the event's creation can follow
#: for a run of any length: so while a run goes on, its blobs are renewed
#: every half of this (`Kept`), and each lives at least `run_ttl` past the
#: run's end.
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

    async def dump(self, data: Any, kept: Kept | None = None) -> bytes:
        """The JSON of `data`, with its large blobs stored as files (and
        added to `kept`, which renews their expiry)."""
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
            if kept is not None and expires is not None:
                kept.add(info.id)
        return dump_data(data, inline_limit=self.limit, urls=urls)

    def kept(self, most: int) -> Kept:
        """A keeper for the blobs of one run: at most the `most` newest are renewed."""
        return Kept(self, most)


class Kept:
    """The blob files of one run, whose expiry is moved on while it runs.

    Every `RUN_SLACK / 2` seconds, each lives `lifetime` from then again; so
    at the run's end each has at least `run_ttl` to go, however long the run
    ran. Only the `most` newest are kept on (`run_history`: older events, and
    their blobs, are gone from the run's history anyway). `close` at the end.
    """

    def __init__(self, blobs: Blobs, most: int) -> None:
        self._blobs = blobs
        self.ids: deque[str] = deque(maxlen=most)
        self._renewing: asyncio.Task[None] | None = None

    def add(self, file_id: str) -> None:
        self.ids.append(file_id)
        if self._renewing is None:
            self._renewing = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        lifetime = self._blobs.lifetime
        assert lifetime is not None
        every = min(RUN_SLACK, lifetime) / 2
        while True:
            await asyncio.sleep(every)
            await self.renew(time.time() + lifetime)

    async def renew(self, expires: float) -> None:
        """Move every kept blob's expiry to `expires`; one that is gone is let go."""
        storage = self._blobs._storage()
        for file_id in list(self.ids):
            try:
                await storage.set_expiry(file_id, expires)
            except FileNotFound:
                with contextlib.suppress(ValueError):
                    self.ids.remove(file_id)  # deleted by hand
            except Exception:
                # The next round tries again; each blob still has half its slack.
                logger.exception("renewing the expiry of a run's blob files failed")
                return

    def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            self._renewing = None


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
