"""The small PNG every W1 event carries, made without Pillow so the bench needs no imaging lib."""

import base64
import struct
import zlib
from pathlib import Path
from typing import Any

PNG = Path(__file__).with_name("test.png")


def make_png(side: int = 32) -> bytes:
    """A side x side RGB gradient: a real, decodable PNG of a few hundred bytes to a few KB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    rows = b"".join(
        b"\x00" + bytes(v for x in range(side) for v in (x * 255 // side, y * 255 // side, 97))
        for y in range(side)
    )
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


def ensure_png(side: int = 32) -> bytes:
    data = make_png(side)
    if not PNG.exists() or PNG.read_bytes() != data:
        PNG.write_bytes(data)
    return data


def blob() -> dict[str, Any]:
    """The image as tidewire tags bytes, so every server sends events of the same shape."""
    data = PNG.read_bytes()
    b64 = base64.b64encode(data).decode()
    return {"$blob": {"type": "image/png", "size": len(data), "data": b64}}
