"""Events and their wire formats.

This module is pure: it turns values into bytes and bytes back into values and
never touches a socket. An event is encoded once, when it enters a log, and
every watcher on every transport writes those same bytes.

    {"id": "<opaque>", "event": "<type>", "data": <any JSON>}

Binary values travel as tagged objects so that bytes round-trip exactly:

    {"$blob": {"type": "image/png", "size": 155, "data": "<base64>"}}
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from .wire import RESERVED_EVENTS

__all__ = [
    "MAX_DEPTH",
    "RESERVED",
    "Blob",
    "Envelope",
    "ForgedBlob",
    "LargeBlob",
    "Message",
    "SSEDecoder",
    "TooDeep",
    "check_depth",
    "check_no_file_refs",
    "decode_blobs",
    "depth_checked",
    "dump_data",
    "iter_ndjson",
    "large_blobs",
    "load_json",
    "parse_ndjson_line",
]

#: Event types the server itself emits; producers may not use them.
RESERVED = RESERVED_EVENTS

#: What a transport writes while a log is idle, so that proxies and clients
#: can tell a quiet connection from a dead one.
NDJSON_HEARTBEAT = b"\n"
SSE_HEARTBEAT = b": ping\n\n"


class Blob(bytes):
    """Bytes that know their media type.

    A subclass of `bytes`, so a decoded blob compares equal to the bytes that
    were sent, and code that wants plain bytes can use it as they are.
    """

    type: str

    def __new__(
        cls, data: bytes | bytearray | memoryview, type: str = "application/octet-stream"
    ) -> Blob:
        self = super().__new__(cls, data)
        self.type = type
        return self

    def __repr__(self) -> str:
        return f"Blob(type={self.type!r}, size={len(self)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Blob, (bytes(self), self.type))


@dataclass(frozen=True, slots=True)
class Message:
    """What a producer yields to name the event type: `yield Message(data, event="progress")`.

    Anything else a generator yields is the data of a `message` event.
    """

    data: Any
    event: str = "message"

    def __post_init__(self) -> None:
        check_event_type(self.event)


def check_event_type(event: str) -> None:
    """Refuse types a producer may not use: reserved ones and ones SSE cannot carry."""
    if event in RESERVED:
        raise ValueError(f"event type {event!r} is reserved for the server")
    if not event or "\n" in event or "\r" in event or len(event) > 200:
        raise ValueError("event type must be 1-200 characters on one line")


def _default(value: Any) -> Any:
    # orjson calls this for what it cannot serialize natively.
    if isinstance(value, (bytes, bytearray, memoryview)):
        # A memoryview's len() counts items, not bytes; bytes and bytearrays
        # are encoded as they are (b2a_base64 reads any buffer: no copy).
        raw = bytes(value) if isinstance(value, memoryview) else value
        kind = value.type if isinstance(value, Blob) else "application/octet-stream"
        data = binascii.b2a_base64(raw, newline=False).decode("ascii")
        return {"$blob": {"type": kind, "size": len(raw), "data": data}}
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        # A pydantic model: Python mode, so that bytes inside it come back
        # here and become blobs (JSON mode would make them strings, or fail).
        return model_dump(mode="python")
    if isinstance(value, Decimal):
        return str(value)  # as pydantic's JSON mode does: no precision lost
    if isinstance(value, (set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _compact(encoded: bytes) -> bytes:
    """`encoded` in an allocation of its own size, for bytes that are kept.

    orjson hands back the buffer it wrote into as the `bytes` object, without
    shrinking it: at least ~4 KB (3.13; ~1 KB before), and for larger
    results a power of two above them. Logs keep every event's data for as
    long as the history lasts, so a 100-byte event held 4 KB: 200 detached
    demo runs took a server from 63 MB to 8.4 GB. `sys.getsizeof` reports
    the length, not the allocation, so "oversized" cannot be asked of a
    result; every orjson result measured (12 B to 70 KB) was, so every one
    is copied: ~60 ns for a 100-byte event, less than the encoding itself.
    (Two parts, so that `join` makes a new object: given one, it returns it.)
    """
    return b"".join((encoded, b""))


def dump_data(
    value: Any, *, inline_limit: int | None = None, urls: dict[int, str] | None = None
) -> bytes:
    """Encode a producer's value as the JSON of an event's `data`.

    With `inline_limit`, a blob larger than that many bytes raises `LargeBlob`,
    unless `urls` (by `id()` of the blob object) says where it was stored:
    then it is encoded as `{"$blob": {"type", "size", "url"}}`. Storing is
    I/O, so it is not done here (see `tidewire.blobs`). The bytes are
    right-sized (`_compact`): logs keep them.
    """
    if inline_limit is None:
        return _compact(orjson.dumps(value, default=_default, option=orjson.OPT_SERIALIZE_NUMPY))
    stored = urls or {}
    unstored = False

    def default(item: Any) -> Any:
        nonlocal unstored
        if isinstance(item, (bytes, bytearray)) and len(item) > inline_limit:
            url = stored.get(id(item))
            if url is None:
                if urls is None:
                    # orjson turns exceptions raised here into TypeError:
                    # note it, and raise once it is done.
                    unstored = True
                    return None
                return _default(item)  # not found on the way: inline after all
            kind = item.type if isinstance(item, Blob) else "application/octet-stream"
            return {"$blob": {"type": kind, "size": len(item), "url": url}}
        return _default(item)

    encoded = orjson.dumps(value, default=default, option=orjson.OPT_SERIALIZE_NUMPY)
    if unstored:
        raise LargeBlob
    return _compact(encoded)


class LargeBlob(Exception):
    """`dump_data` met a blob over its inline limit that has not been stored yet."""


#: The deepest nesting of arrays and objects that orjson writes. It reads up
#: to 1,024 levels, so data it decoded may be too deep to encode again: such
#: data is refused where it comes in, not found out when it is sent on.
MAX_DEPTH = 254

# orjson says so in these words (its tests in tests/test_events.py pin them).
_TOO_DEEP_TO_WRITE = "Recursion limit reached"
_TOO_DEEP_TO_READ = "depth limit exceeded"


class TooDeep(ValueError):
    """Data nested deeper than `MAX_DEPTH` levels: it cannot be encoded as JSON here.

    A `ValueError`, as other data a producer or client may not send is.
    """

    def __init__(self, message: str = "") -> None:
        # The message has a default but is an argument still, so that the
        # exception pickles (which re-creates it from its args).
        super().__init__(message or f"data nested deeper than {MAX_DEPTH} levels is not accepted")


@contextmanager
def depth_checked() -> Iterator[None]:
    """Turn orjson's error for data nested too deeply, inside, into `TooDeep`.

    Around any encoding (`dump_data`, `orjson.dumps`); its other errors pass.
    A blob counts as the two levels of its `{"$blob": {...}}`.
    """
    try:
        yield
    except orjson.JSONEncodeError as exc:
        if str(exc) == _TOO_DEEP_TO_WRITE:
            raise TooDeep from None
        raise


def check_depth(value: Any) -> None:
    """Raise `TooDeep` if `value` could not be encoded for being nested too deeply.

    orjson finds out in C, about ten times faster than a walk in Python would.
    """
    with depth_checked():
        orjson.dumps(value, default=_default, option=orjson.OPT_SERIALIZE_NUMPY)


def load_json(data: bytes | str) -> Any:
    """A client's JSON, decoded; `TooDeep` if it is nested deeper than `MAX_DEPTH`.

    Anything else that is not JSON raises `orjson.JSONDecodeError`. Every
    route that decodes a client's JSON uses this, so data that could never be
    sent on is refused there and then, whatever happens to it next. The check
    costs one encoding in C (about 1 ms per MiB), not a walk in Python.
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith(_TOO_DEEP_TO_READ):
            raise TooDeep from None
        raise
    check_depth(value)
    return value


class ForgedBlob(ValueError):
    """Published data holding a `$blob` with a `url`: only the server stores blobs as files."""


def check_no_file_refs(value: Any) -> None:
    """Raise `ForgedBlob` if a client's decoded JSON holds a `{"$blob": {"url": ...}}`.

    Clients follow a blob's `url` to fetch it, with their credentials; a
    publisher who could write one could point every subscriber at any URL
    (or at another user's file). Blobs a client sends carry their `data`; the
    server alone turns large ones into files (see `tidewire.blobs`).
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            blob = item.get("$blob")
            if isinstance(blob, dict) and "url" in blob:
                raise ForgedBlob(
                    'a published $blob may not carry a "url": send its bytes as "data" (base64)'
                )
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def large_blobs(value: Any, limit: int) -> list[bytes | bytearray]:
    """The blobs over `limit` bytes in a value (in dicts, lists and tuples), each once."""
    found: dict[int, bytes | bytearray] = {}
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (bytes, bytearray)):
            if len(item) > limit:
                found[id(item)] = item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, Message):
            stack.append(item.data)
    return list(found.values())


class Envelope:
    """One event of a run or channel, with its encodings made once and cached.

    Logs keep events for as long as their history lasts, so what an event
    holds is what a retained event costs: its data's JSON (right-sized, see
    `_compact`), and each wire encoding only once a transport has used it.

    `seq` counts events in their log from 1; it is not on the wire, but lets
    a reader tell how many events it missed when a log was trimmed.
    """

    __slots__ = ("_named", "_ndjson", "_sse", "_ws", "data_json", "event", "id", "seq")

    def __init__(self, id: str, seq: int, event: str, data_json: bytes) -> None:
        self.id = id
        self.seq = seq
        self.event = event
        self.data_json = data_json
        self._ndjson: bytes | None = None
        self._sse: bytes | None = None
        self._ws: str | None = None
        self._named: Envelope | None = None

    def named(self, prefix: str) -> Envelope:
        """This event with `prefix` before its id: a run's event as clients see it.

        Made once and kept, so its encodings are shared by every reader, as
        the log's own are: an event belongs to one log, and every reader of a
        log uses the same prefix.
        """
        named = self._named
        if named is None or not named.id.startswith(prefix):
            named = self._named = Envelope(prefix + self.id, self.seq, self.event, self.data_json)
        return named

    @property
    def data(self) -> Any:
        return decode_blobs(orjson.loads(self.data_json))

    def ndjson(self) -> bytes:
        """The envelope as one line of JSON, newline included."""
        if self._ndjson is None:
            self._ndjson = self._line()
        return self._ndjson

    def _line(self) -> bytes:
        # Splice the data's JSON in rather than re-serializing it.
        return b"".join(
            (
                b'{"id":',
                orjson.dumps(self.id),
                b',"event":',
                orjson.dumps(self.event),
                b',"data":',
                self.data_json,
                b"}\n",
            )
        )

    def sse(self) -> bytes:
        """The event as an SSE frame: `event:`, `data:` and `id:` lines."""
        if self._sse is None:
            data, event, id = self.data_json, self.event, self.id
            # (find() of an int is memchr; `b"\n" in data` costs twice as much.)
            if (
                data.find(10) >= 0
                or data.find(13) >= 0
                or "\n" in event
                or "\r" in event
                or "\n" in id
                or "\r" in id
            ):
                # Lines to split: fastapi's own formatting. Imported here, not
                # at the top: the client imports this module too, and must
                # not pay for loading a web framework.
                from fastapi.sse import format_sse_event

                self._sse = format_sse_event(data_str=data.decode(), event=event, id=id)
            else:
                # One line each (what orjson writes always is): the same bytes
                # as format_sse_event's, spliced, in about a fifth of its time.
                self._sse = b"".join(
                    (b"event: ", event.encode(), b"\ndata: ", data, b"\nid: ", id.encode(), b"\n\n")
                )
        return self._sse

    def ws(self) -> str:
        """The envelope as the text of one WebSocket frame."""
        if self._ws is None:
            # Each encoding is kept only once its transport has asked for it:
            # an event watched over WebSockets alone keeps no NDJSON line.
            line = self._ndjson if self._ndjson is not None else self._line()
            self._ws = line[:-1].decode()
        return self._ws

    def __repr__(self) -> str:
        return f"Envelope(id={self.id!r}, event={self.event!r}, data={self.data_json[:60]!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Envelope):
            return NotImplemented
        return (self.id, self.event, self.data_json) == (other.id, other.event, other.data_json)

    __hash__ = None  # type: ignore[assignment]


def decode_blobs(value: Any, remote: Callable[[str, str, int | None], Any] | None = None) -> Any:
    """Turn every `{"$blob": {...}}` in a decoded JSON value back into a `Blob`.

    Blobs stored as files (`url` instead of `data`) are fetched by I/O, which
    belongs to the client: `remote(url, type, size)` makes what stands for
    them; without it they are left as they are.
    """
    if isinstance(value, dict):
        blob = value.get("$blob")
        if len(value) == 1 and isinstance(blob, dict):
            kind = str(blob.get("type", "application/octet-stream"))
            if isinstance(blob.get("data"), str):
                return Blob(base64.b64decode(blob["data"]), kind)
            if remote is not None and isinstance(blob.get("url"), str):
                size = blob.get("size")
                return remote(blob["url"], kind, size if isinstance(size, int) else None)
        return {k: decode_blobs(v, remote) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_blobs(v, remote) for v in value]
    return value


def parse_ndjson_line(line: bytes | str) -> Envelope | None:
    """Parse one NDJSON line; a blank line (a heartbeat) gives None."""
    if not line.strip():
        return None
    obj = orjson.loads(line)
    # Compacted: a client may keep the events it reads.
    data_json = _compact(orjson.dumps(obj.get("data")))
    return Envelope(str(obj["id"]), 0, str(obj["event"]), data_json)


class SSEDecoder:
    """An incremental `text/event-stream` parser, as the WHATWG spec describes it.

    Feed it bytes as they arrive, in any chunking; it returns the complete events.
    Comments (heartbeats) are skipped; `retry` and `last_id` are remembered.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self.last_id: str | None = None
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[Envelope]:
        buffer = self._buffer + chunk
        # A line ends at CRLF, LF or a lone CR; a CR at the very end may be the
        # first half of a CRLF split across chunks, so it waits for the next one.
        held = b""
        if buffer.endswith(b"\r"):
            buffer, held = buffer[:-1], b"\r"
        *lines, rest = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._buffer = rest + held
        events: list[Envelope] = []
        for raw in lines:
            event = self._line(raw.decode("utf-8"))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Envelope | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit() and len(value) <= 9:
            # ASCII digits only, as the SSE spec says: str.isdigit() alone takes
            # "²" (which int() refuses) and other scripts' digits.
            self.retry = int(value)
        return None

    def _dispatch(self) -> Envelope | None:
        if self._id is not None:
            self.last_id = self._id
        # No data, or one empty `data:` (as a `position` block has): nothing to
        # dispatch, as the WHATWG spec says; the id is kept all the same.
        if not self._data or self._data == [""]:
            self._event, self._data, self._id = "", [], None
            return None
        data = "\n".join(self._data)
        event = Envelope(self.last_id or "", 0, self._event or "message", data.encode())
        self._event, self._data, self._id = "", [], None
        return event


def iter_ndjson(chunks: Iterator[bytes]) -> Iterator[Envelope]:
    """Events from NDJSON bytes in any chunking (lines may span chunks)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            event = parse_ndjson_line(line)
            if event is not None:
                yield event
    if pending.strip():
        event = parse_ndjson_line(pending)
        if event is not None:
            yield event
