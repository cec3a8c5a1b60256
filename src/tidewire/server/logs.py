"""Secrets out of the server's logs: tokens, link signatures, URL passwords.

A token may travel as `?access_token=` (EventSource and browser WebSockets
cannot set headers) and a signed link carries `?sig=`; uvicorn's access log
(`uvicorn.access`) prints every request's path with its query string, and its
WebSocket lines (`uvicorn.error`) do too; tidewire's own log (`tidewire`)
says which broker failed, with its URL. `RedactSecrets` rewrites each
record with `masking.mask` (the one masking `--print-config` uses too)
before any handler formats it.

`tidewire serve` and every `Tidewire.app` install it on those loggers
(`redact_server_logs`). Serving another way (gunicorn, hypercorn, a log
config that adds loggers), add the filter to the loggers or handlers that
print request lines: `logging.getLogger(NAME).addFilter(RedactSecrets())`.
"""

from __future__ import annotations

import logging

from ..masking import SECRET_PARAMS, mask

__all__ = ["REDACTED_PARAMS", "RedactSecrets", "redact", "redact_server_logs"]

#: Query parameters whose values are secrets (others are, by their names: see masking.py).
REDACTED_PARAMS = SECRET_PARAMS
#: The loggers uvicorn writes request lines to, and tidewire's own.
UVICORN_LOGGERS = ("uvicorn.access", "uvicorn.error", "tidewire")


def redact(text: str) -> str:
    """`text` with URL passwords and the values of secret query parameters replaced by `***`."""
    return mask(text)


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
