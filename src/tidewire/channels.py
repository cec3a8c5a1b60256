"""Channels: named logs that any producer appends to and any number of readers follow.

A channel never makes its publishers wait: it keeps a bounded history, and a
subscriber that falls behind it is told how much it missed (a `gap` event).
"""

from __future__ import annotations

import re
from typing import Any

from .blobs import Blobs
from .broker import Broker, Retention
from .config import Settings
from .events import Message
from .metrics import count_events

__all__ = ["CHANNEL_NAME", "Channels"]

#: What a channel may be called: safe in a URL path and as a Redis key.
CHANNEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")


class Channels:
    def __init__(self, broker: Broker, settings: Settings, blobs: Blobs) -> None:
        self.broker = broker
        self.blobs = blobs
        # A channel counts against `max_channels` from its first event until
        # it is idle `channel_idle_ttl` seconds; one more is `TooManyLogs`.
        self.retention = Retention(
            settings.channel_max_len,
            settings.channel_max_age,
            max_bytes=settings.channel_max_bytes,
            kind="channel",
            max_logs=settings.max_channels,
            idle_ttl=settings.channel_idle_ttl,
        )

    @staticmethod
    def log(name: str) -> str:
        if not CHANNEL_NAME.match(name):
            raise ValueError(
                f"channel name {name!r} must be 1-200 letters, digits, '.', '_', ':' or '-'"
            )
        return f"channel:{name}"

    async def publish(self, name: str, data: Any, event: str = "message") -> str:
        """Append one event; returns its id. Raises ValueError for a bad name or type,
        `TooManyLogs` for a new channel past `max_channels`."""
        message = Message(data, event)
        [published] = await self.broker.append(
            self.log(name), [(message.event, await self.blobs.dump(message.data))], self.retention
        )
        count_events("channel")
        return published.id
