"""File names: the one rule for what a stored file may be called.

A name is only a label. It is never used to build a path (ids do that), so
`../x` or `C:\\x` are fine names; it goes into the metadata and, made safe,
into `Content-Disposition`. Every way in (multipart, `PUT`, tus, the
original `/uploadfile/`) checks it here, so a name one route stores the
others would have stored too.
"""

from __future__ import annotations

import re

__all__ = ["CONTROL", "MAX_NAME", "clean_name"]

#: Longest name accepted, in characters: what file systems (255 bytes for
#: ASCII names) and the programs that save downloads cope with.
MAX_NAME = 255

#: Control characters, C0 and C1: NUL, line breaks, terminal escapes.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean_name(name: str) -> str:
    """`name`, checked for use as a label; `ValueError` says what is wrong.

    Refused: what no file name should hold (control characters), and names
    that are empty or too long. The message is a sentence about "the file
    name", for the route to say where the name came from.
    """
    if not name.strip():
        raise ValueError("the file name is empty")
    if len(name) > MAX_NAME:
        raise ValueError(f"the file name is longer than {MAX_NAME} characters")
    if CONTROL.search(name):
        raise ValueError("the file name contains control characters")
    return name
