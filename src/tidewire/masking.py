"""What may be shown of a secret: nothing. One masking for every place that prints.

`mask(text)` hides the secrets a line of text may carry: the password of a URL
(`redis://:pw@host` → `redis://:***@host`) and the values of query parameters
that are secrets (`?access_token=`, `?sig=`, `?secret_key=`, …).
`mask_setting(name, value)` hides a setting's whole value when its name says
it is a secret (`auth_secret`, `link_secret`, `*_token`, `*_password`), and
masks the text of the others (a broker URL). `tidewire serve --print-config`,
its startup line and the server's logs (server/logs.py) all use these.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

__all__ = ["MASK", "is_secret_name", "mask", "mask_setting"]

#: What a secret is replaced by.
MASK = "***"

#: Query parameters whose values are secrets, by exact name: tokens in URLs
#: (EventSource and browser WebSockets cannot send headers) and link signatures.
SECRET_PARAMS = frozenset({"access_token", "sig"})
# … and by what their names contain (S3 keys, passwords, credentials).
_SECRET_WORDS = ("secret", "password", "passwd", "token", "credential", "key_id", "access_key")

# `scheme://user:password@`: the password is anything up to the `@` that
# ends the authority (no `/`, `?`, `#` or space before it).
_USERINFO = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:@/?#\s\"']*:)(?P<password>[^@/?#\s\"']+)@"
)
# A query parameter: after `?`, `&` or `;`, a name, `=`, a value up to the
# next separator, space or quote (a log line quotes the request line).
_PARAM = re.compile(r"""(?P<sep>[?&;])(?P<name>[^=&;#\s"']+)=(?P<value>[^&;#\s"']*)""")
# `Authorization: Bearer <token>` as a line may quote it.
_BEARER = re.compile(r"(?P<head>\b[Bb]earer\s+)[^\s,;\"']+")
# Three base64url parts, the first two JSON objects (`{"` is `eyJ`): a JWT.
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def is_secret_name(name: str) -> bool:
    """Whether a parameter or setting of this name holds a secret."""
    name = name.lower()
    return name in SECRET_PARAMS or any(word in name for word in _SECRET_WORDS)


def _hide_param(match: re.Match[str]) -> str:
    # The name as a server decodes it: `access%5Ftoken` is the same parameter.
    if match["value"] and is_secret_name(unquote_plus(match["name"])):
        return f"{match['sep']}{match['name']}={MASK}"
    return match[0]


def mask(text: str) -> str:
    """`text` with URL passwords, secret query values, bearer tokens and JWTs replaced by `***`."""
    if "@" in text:
        text = _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", text)
    if "=" in text:
        text = _PARAM.sub(_hide_param, text)
    if "earer" in text:
        text = _BEARER.sub(lambda m: m["head"] + MASK, text)
    if "eyJ" in text:
        text = _JWT.sub(MASK, text)
    return text


def mask_setting(name: str, value: Any) -> Any:
    """A setting's value as it may be shown: secrets whole, URLs' passwords."""
    if value is None:
        return None
    if is_secret_name(name):
        return MASK
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, tuple | list):
        return type(value)(mask(v) if isinstance(v, str) else v for v in value)
    return value
