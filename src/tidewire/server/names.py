"""File names: the one rule for what a stored file may be called.

A name is only a label. It is never used to build a path (ids do that), so
`../x` or `C:\\x` are fine names; it goes into the metadata and, made safe,
into `Content-Disposition`. Every way in (multipart, `PUT`, tus, the
original `/uploadfile/`) checks it here, so a name one route stores the
others would have stored too; the lookups by name (`GET /files?name=`, the
original `/downloadfile/`) check it too, so they refuse what no file can be
called instead of answering "none".
"""

from __future__ import annotations

import itertools
import re
import unicodedata

__all__ = ["CONTROL", "MAX_NAME", "NAME_SCHEMA", "clean_name", "invisible"]

#: Longest name accepted, in characters: what file systems (255 bytes for
#: ASCII names) and the programs that save downloads cope with.
MAX_NAME = 255

#: Control characters, C0 and C1: NUL, line breaks, terminal escapes.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

#: Unicode categories of characters that change how a name reads without
#: being seen: format characters (Cf: the bidi controls U+202A-U+202E,
#: U+2066-U+2069, U+200E/F, U+061C; zero-width space, word joiner, BOM, soft
#: hyphen, tags...) and the line and paragraph separators (Zl, Zp).
#: `photo\u202egpj.exe` shows as `photo` + `exe.jpg`.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Zl", "Zp"})

#: Format characters that are spelling, not tricks: ZWNJ and ZWJ are needed
#: to write Persian, Kurdish and Indic words correctly and to build emoji
#: sequences (a family emoji). They join or part neighbouring letters but cannot move
#: or hide them, so they cannot disguise an extension.
_JOINERS = frozenset({"\u200c", "\u200d"})


def invisible(char: str) -> bool:
    """Whether `char` changes how a name reads without being seen (bidi controls and the like)."""
    return unicodedata.category(char) in _INVISIBLE_CATEGORIES and char not in _JOINERS


def clean_name(name: str) -> str:
    """`name`, checked for use as a label; `ValueError` says what is wrong.

    Refused: what no file name should hold (control characters, invisible
    format characters), and names that are empty or too long. The message
    is a sentence about "the file name", for the route to say where the name
    came from.

    Invisible characters are refused, not stripped: stripping would store a
    name the uploader did not choose, and could turn it into another file's
    name; a refusal naming the character says exactly what to fix, and no
    honest client needs one.
    """
    if not name.strip():
        raise ValueError("the file name is empty")
    if len(name) > MAX_NAME:
        raise ValueError(f"the file name is longer than {MAX_NAME} characters")
    if CONTROL.search(name):
        raise ValueError("the file name contains control characters")
    hidden = next((char for char in name if invisible(char)), None)
    if hidden is not None:
        what = unicodedata.name(hidden, "a format character")
        raise ValueError(
            f"the file name contains U+{ord(hidden):04X} ({what}), an invisible character"
            " that changes how the name reads: remove it"
        )
    return name


def _refused_class() -> str:
    """The characters `clean_name` refuses, as the inside of a regex character class.

    Made from `unicodedata` rather than written out, so the schema and the
    check cannot disagree. Astral characters go in as themselves: a JSON
    Schema pattern has no escape for them that every regex dialect reads.
    """
    ranges: list[list[int]] = []
    # Format characters live in planes 0, 1 and 14 only (tags); scanning just
    # those keeps the import fast.
    for code in itertools.chain(range(0x20000), range(0xE0000, 0xE1000)):
        char = chr(code)
        if CONTROL.match(char) or invisible(char):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])

    def one(code: int) -> str:
        return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)

    return "".join(one(a) if a == b else f"{one(a)}-{one(b)}" for a, b in ranges)


_REFUSED = _refused_class()

#: OpenAPI schema of a file name: what `clean_name` accepts (not all blank,
#: no control or invisible characters, 1 to `MAX_NAME` characters).
NAME_SCHEMA: dict[str, object] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_NAME,
    "pattern": f"^[^{_REFUSED}]*[^\\s{_REFUSED}][^{_REFUSED}]*$",
}
