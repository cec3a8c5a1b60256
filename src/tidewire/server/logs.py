"""Secrets out of the server's logs: tokens and link signatures in query strings.

A token may travel as `?access_token=` (EventSource and browser WebSockets
cannot set headers) and a signed link carries `?sig=`; uvicorn's access log
(`uvicorn.access`) prints every request's path with its query string, and its
WebSocket lines (`uvicorn.error`) do too. `RedactSecrets` rewrites those
values to `***` in each record before any handler formats it.

`tidewire serve` and every `Tidewire.app` install it on uvicorn's loggers
(`redact_server_logs`). Serving another way (gunicorn, hypercorn, a log
config that adds loggers), add the filter to the loggers or handlers that
print request lines: `logging.getLogger(NAME).addFilter(RedactSecrets())`.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

from ..auth import ACCESS_TOKEN_PARAM

__all__ = ["REDACTED_PARAMS", "RedactSecrets", "redact", "redact_server_logs"]

#: Query parameters whose values are secrets.
REDACTED_PARAMS = frozenset({ACCESS_TOKEN_PARAM, "sig"})
#: The loggers uvicorn writes request lines to.
UVICORN_LOGGERS = ("uvicorn.access", "uvicorn.error")

# A query parameter: after `?`, `&` or `;`, a name, `=`, a value up to the
# next separator, space or quote (a log line quotes the request line).
_PARAM = re.compile(r"""(?P<sep>[?&;])(?P<name>[^=&;#\s"']+)=(?P<value>[^&;#\s"']*)""")


def _hide(match: re.Match[str]) -> str:
    # The name as the server decodes it: `access%5Ftoken` is the same parameter.
    if unquote_plus(match["name"]) in REDACTED_PARAMS:
        return f"{match['sep']}{match['name']}=***"
    return match[0]


def redact(text: str) -> str:
    """`text` with the values of secret query parameters replaced by `***`."""
    if "=" not in text:
        return text
    return _PARAM.sub(_hide, text)


class RedactSecrets(logging.Filter):
    """Rewrites secret query values in a record's message and arguments; drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
        elif isinstance(args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in args.items()}
        return True


def redact_server_logs() -> None:
    """Add `RedactSecrets` to uvicorn's loggers, once.

    On the loggers, not their handlers: uvicorn's logging config replaces
    handlers, while `logging.config` leaves a logger's filters in place.
    """
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
