"""HTTP header logic for files, as pure functions: tested on their own.

Ranges: `parse_range` decides which bytes a `Range` header asks for, and
`byteranges` frames several of them. We decide, not Starlette's
`FileResponse`, so that a local file and a remote (S3) one answer the same
request the same way: the same ranges merged, the same headers ignored, the
same JSON 416.

Validators: `ETag`, `If-None-Match`, `If-Range`, `Last-Modified` and
`If-Modified-Since`, and the HTTP date format they use.

Types and names on the way out: `clean_type` reduces a client's
`Content-Type` to something safe to send back, `inline_safe` says which types
a browser may display from our origin, and `content_disposition` writes a
name that every browser saves under and none can be tricked by.

Sizes: `parse_size` reads a length or offset header strictly (digits only).
"""

from __future__ import annotations

import mimetypes
import re
import unicodedata
from collections.abc import Mapping
from email.utils import formatdate, parsedate_to_datetime
from urllib.parse import quote

from .names import CONTROL, invisible

__all__ = [
    "MAX_RANGES",
    "Unsatisfiable",
    "byteranges",
    "clean_type",
    "content_disposition",
    "content_length",
    "essence",
    "etag_matches",
    "http_date",
    "if_range_matches",
    "inline_safe",
    "not_modified",
    "parse_http_date",
    "parse_range",
    "parse_size",
    "upload_type",
]

#: A Range header with more ranges than this is ignored (the whole file is sent):
#: many tiny ranges cost far more than the bytes they ask for.
MAX_RANGES = 100

# -- sizes -----------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]{1,20}\Z")


def parse_size(value: str | None, header: str) -> int:
    """A non-negative integer header (`Content-Length`, `Upload-Length`, `Upload-Offset`).

    `ValueError` says what is wrong with it, naming `header`.
    """
    if value is None:
        raise ValueError(f"the {header} header is required")
    value = value.strip()
    if not _DIGITS.match(value):
        raise ValueError(f"{header} must be a non-negative integer, not {value[:40]!r}")
    return int(value)


def content_length(headers: Mapping[str, str]) -> int | None:
    """The body length a request declares; None if chunked or malformed (the server's to refuse)."""
    try:
        return parse_size(headers.get("content-length"), "Content-Length")
    except ValueError:
        return None


# -- media types -----------------------------------------------------------

_TOKEN = r"[A-Za-z0-9!#$&^_.+-]+"
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}\Z")
_CHARSET = re.compile(rf"charset\s*=\s*\"?({_TOKEN})\"?\Z", re.IGNORECASE)

#: Content types that say nothing about the content: the name says more.
_GENERIC = frozenset(
    {
        "application/octet-stream",
        "binary/octet-stream",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "application/unknown",
    }
)


def essence(kind: str) -> str:
    """A media type without its parameters, lower case: `text/plain` of `Text/Plain; charset=x`."""
    return kind.split(";")[0].strip().lower()


def clean_type(value: str | None) -> str | None:
    """A media type reduced to `type/subtype[; charset=x]`, lower case; None if malformed."""
    if not value:
        return None
    main, *params = value.split(";")
    if _MEDIA_TYPE.match(main.strip()) is None:
        return None
    kind = main.strip().lower()
    for param in params:
        charset = _CHARSET.match(param.strip())
        if charset is not None:
            return f"{kind}; charset={charset.group(1).lower()}"
    return kind


def upload_type(declared: str | None, name: str) -> str:
    """The type to store: the declared one if it says something, else guessed from the name."""
    kind = clean_type(declared)
    if kind is not None and essence(kind) not in _GENERIC:
        return kind
    return mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"


# Types a browser may show from our origin: none of them can run script.
# Everything else (HTML, SVG, XML, JavaScript, unknown types...) is sent as an
# attachment inside a CSP sandbox, whatever the uploader claimed.
_INLINE = frozenset(
    {
        "text/plain",
        "application/json",
        "application/pdf",
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "image/avif",
        "image/apng",
        "image/bmp",
        "image/x-icon",
        "image/vnd.microsoft.icon",
    }
)


def inline_safe(kind: str) -> bool:
    """Whether a browser may display this type inline from our origin."""
    bare = essence(kind)
    return bare in _INLINE or bare.startswith(("audio/", "video/"))


# -- Content-Disposition ---------------------------------------------------

# Kept out of the ASCII `filename=`: what ends or escapes the quoted string,
# path separators, and `%`, which some browsers decode there.
_UNSAFE_IN_FALLBACK = re.compile(r'[^\x20-\x7e]|["\\/%;]')


def content_disposition(name: str, *, inline: bool = False) -> str:
    """`inline`/`attachment` with an ASCII `filename=` and a UTF-8 `filename*=` (RFC 6266)."""
    disposition = "inline" if inline else "attachment"
    name = unicodedata.normalize("NFC", name)
    # Files stored before names.py refused bidi controls may still hold one:
    # dropped here, `photo\u202egpj.exe` is saved as `photogpj.exe`, the .exe it is.
    name = "".join(char for char in name if not invisible(char))
    if not name.strip(". ") or CONTROL.search(name):
        name = "download"  # no browser would save under "..", "" or a control character
    fallback = _UNSAFE_IN_FALLBACK.sub("_", name)
    # RFC 5987 attr-char: everything else is percent-encoded.
    encoded = quote(name, safe="!#$&+-.^_`|~")
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


# -- validators ------------------------------------------------------------


def http_date(timestamp: float) -> str:
    """The HTTP date format (`Wed, 25 Jun 2014 16:00:00 GMT`) of Last-Modified, Upload-Expires."""
    return formatdate(timestamp, usegmt=True)


#: Longest date header read: an HTTP date is 29 characters, its obsolete forms
#: (RFC 850, asctime) at most 33. The standard library's parser turns each
#: run of digits into an int, which costs the square of its length (up to
#: CPython's 4,300-digit limit): a longer value is not a date anyway.
_MAX_HTTP_DATE = 64


def parse_http_date(value: str) -> float | None:
    """An HTTP date as a timestamp; None if it is not one."""
    if len(value) > _MAX_HTTP_DATE:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


_ENTITY_TAG = re.compile(r'\s*((?:W/)?"[^"]*")\s*(?:,|\Z)')


def _entity_tags(header: str) -> list[str] | None:
    """The entity-tags of an `If-None-Match` list; None if the header is malformed."""
    tags, pos = [], 0
    header = header.strip()
    while pos < len(header):
        match = _ENTITY_TAG.match(header, pos)
        if match is None:
            return None
        tags.append(match.group(1))
        pos = match.end()
    return tags


def etag_matches(header: str, etag: str) -> bool:
    """Whether `If-None-Match: header` matches `etag` (weak comparison, `*` matches any)."""
    if header.strip() == "*":
        return True
    tags = _entity_tags(header)
    return tags is not None and etag.removeprefix("W/") in (t.removeprefix("W/") for t in tags)


def if_range_matches(header: str, etag: str, modified: float) -> bool:
    """Whether `If-Range: header` lets a range through: the same strong ETag, or date."""
    header = header.strip()
    if header.startswith("W/"):
        return False  # a weak tag never validates a range
    if header.startswith('"'):
        return header == etag
    date = parse_http_date(header)
    return date is not None and int(date) == int(modified)


def not_modified(headers: Mapping[str, str], etag: str, modified: float) -> bool:
    """Whether a GET or HEAD with these request headers may be answered 304."""
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        return etag_matches(if_none_match, etag)
    since = headers.get("if-modified-since")
    if since is not None:
        date = parse_http_date(since)
        return date is not None and int(modified) <= date
    return False


# -- ranges ----------------------------------------------------------------


class Unsatisfiable(Exception):
    """None of the requested ranges overlaps the file: 416."""


#: Longest position a range may name, in digits: 20 reach past 2**64 bytes,
#: more than any file. Longer ones make the header ignored, like other bad syntax.
_MAX_POSITION_DIGITS = 20


def _is_position(text: str) -> bool:
    """Whether `text` is a range position: ASCII digits (or nothing, for an absent one)."""
    return len(text) <= _MAX_POSITION_DIGITS and (not text or (text.isascii() and text.isdigit()))


def _range_spec(part: str) -> tuple[str, str] | None:
    r"""The `first` and `last` of one `first-last` element, each digits or empty; None if malformed.

    Split with str methods, not a regular expression: the pattern this
    replaces, `\s*(\d*)\s*-\s*(\d*)\s*\Z`, backtracked in cubic time over
    spaces around the dash (2,000 each side held the event loop for ~19 s,
    as in Starlette's CVE-2025-62727), and its `\d` took any script's digits.
    Each step here looks at each character once.
    """
    first, dash, last = part.partition("-")
    first, last = first.strip(" \t"), last.strip(" \t")
    if not dash or not _is_position(first) or not _is_position(last):
        return None
    return first, last


def parse_range(header: str, size: int) -> list[tuple[int, int]] | None:
    """The byte ranges `[start, end)` a `Range` header asks of `size` bytes.

    Sorted, with overlapping and adjacent ranges merged. None when the header
    is to be ignored and the whole file sent: another unit, bad syntax, too
    many ranges, or a suffix range of an empty file. Raises `Unsatisfiable`
    when no range overlaps the file (RFC 9110, 14.1.2).
    """
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    # Empty list elements ("0-1,,2-3") are allowed and skipped.
    specs = [part for part in spec.split(",") if part.strip()]
    if not specs or len(specs) > MAX_RANGES:
        return None
    ranges: list[tuple[int, int]] = []
    whole_empty_file = False
    for part in specs:
        parsed = _range_spec(part)
        if parsed is None:
            return None
        first, last = parsed
        if first:
            start = int(first)
            end = int(last) + 1 if last else size
            if last and end <= start:
                return None  # last < first: the header is invalid
            if start < size:
                ranges.append((start, min(end, size)))
        elif last:
            length = int(last)
            if length > 0 and size == 0:
                whole_empty_file = True  # satisfiable, but there is no byte to send
            elif length > 0:
                ranges.append((max(size - length, 0), size))
        else:
            return None  # "-" alone
    if not ranges:
        if whole_empty_file:
            return None
        raise Unsatisfiable
    ranges.sort()
    merged = [ranges[0]]
    for start, end in ranges[1:]:
        last_start, last_end = merged[-1]
        if start <= last_end:
            merged[-1] = (last_start, max(last_end, end))
        else:
            merged.append((start, end))
    return merged


def byteranges(
    ranges: list[tuple[int, int]], size: int, kind: str, boundary: str
) -> tuple[list[bytes], bytes, int]:
    """The part headers and closing line of a multipart/byteranges body, and its length."""
    heads = [
        (
            f"--{boundary}\r\nContent-Type: {kind}\r\n"
            f"Content-Range: bytes {start}-{end - 1}/{size}\r\n\r\n"
        ).encode("latin-1")
        for start, end in ranges
    ]
    tail = f"--{boundary}--".encode("latin-1")
    length = sum(len(h) + (end - start) + 2 for h, (start, end) in zip(heads, ranges, strict=True))
    return heads, tail, length + len(tail)
