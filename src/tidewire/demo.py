"""The demo: the original service's text + image counter, as a tidewire stream.

`tidewire serve` with no app serves this module's `tw`: the `demo` stream,
open channels, and the original service's routes (server/compat.py), whose
`/stream` shows this module's frames.
"""

from __future__ import annotations

import asyncio
import colorsys
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Annotated

from pydantic import Field

from .app import Tidewire
from .events import Blob
from .server.compat import add_compat_routes

__all__ = ["frame", "png", "tw"]


def png(width: int, height: int, rows: list[bytes]) -> bytes:
    """Encode 8-bit RGB rows as a PNG (pure code: the demo needs no imaging library)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"".join(b"\x00" + row for row in rows)  # filter type 0 on every row
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _tile(hue: float, size: int = 32) -> bytes:
    rows = []
    for y in range(size):
        row = bytearray()
        for x in range(size):
            ring = (abs(x - size // 2) + abs(y - size // 2)) // 4 % 2
            r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95 if ring else 0.7)
            row += bytes((int(r * 255), int(g * 255), int(b * 255)))
        rows.append(bytes(row))
    return png(size, size, rows)


# Twelve frames around the colour wheel, made once: the stream cycles them.
FRAMES = [Blob(_tile(i / 12), "image/png") for i in range(12)]


def frame(i: int) -> Blob:
    return FRAMES[i % len(FRAMES)]


tw = Tidewire(title="tidewire demo")

Count = Annotated[int, Field(ge=0, le=10_000_000, description="how many events")]
Pause = Annotated[
    float, Field(ge=0, le=60, allow_inf_nan=False, description="seconds before each event")
]


@tw.stream(name="demo")
async def demo(n: Count = 100, interval: Pause = 0.05) -> AsyncIterator[dict[str, object]]:
    """The original service's stream: a counter and an image, one event every `interval` s."""
    for i in range(n):
        if interval:
            await asyncio.sleep(interval)
        yield {"text": str(i), "img": frame(i)}


# The original service's routes: `/stream` shows the same frames.
add_compat_routes(tw.router, tw, FRAMES)
