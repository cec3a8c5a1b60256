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

Besides query values, `redact` masks what a secret looks like wherever it
appears: the password of a URL (`redis://:pw@host` -> `redis://:***@host`),
`Bearer <token>`, anything shaped like a JWT, and the values registered with
`hide` (the auth secret, link secret and metrics token of each app, the
broker URL's password, `AWS_SECRET_ACCESS_KEY`). `tidewire serve` formats
every line through it (`log_config`): tracebacks included, which a filter
on a logger never sees.

`--log-format json` writes one object per line (`JsonFormatter`): `time`
(ISO 8601, UTC), `level`, `logger`, `message`, the `request_id` of the
request being served, and for access lines (server/observe.py) `method`,
`route`, `path`, `status`, `duration_ms`, `identity` and `client`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from uvicorn.logging import AccessFormatter, DefaultFormatter

from ..masking import MASK, SECRET_PARAMS, mask

__all__ = [
    "REDACTED_PARAMS",
    "REQUEST_ID",
    "JsonFormatter",
    "RedactSecrets",
    "hide",
    "hide_environment_secrets",
    "hide_url_password",
    "log_config",
    "redact",
    "redact_server_logs",
]

#: Query parameters whose values are secrets (others are, by their names: see masking.py).
REDACTED_PARAMS = SECRET_PARAMS

#: The id of the request being served (set by server/observe.py), for every
#: record written while it runs.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tidewire_request_id", default=None
)

#: Values that must never be written, whatever their context (see `hide`).
_HIDDEN: set[str] = set()
# Shorter values would mask ordinary words; real secrets are longer.
_MIN_HIDDEN = 6
#: The loggers uvicorn writes request lines to.
UVICORN_LOGGERS = ("uvicorn.access", "uvicorn.error")


def hide(*values: str | None) -> None:
    """Never log these values (secrets of this process), wherever they appear."""
    for value in values:
        if value and len(value) >= _MIN_HIDDEN:
            _HIDDEN.add(value)


def hide_url_password(url: str | None) -> None:
    """Never log the password of `url` (a broker's), even where it appears without its URL."""
    if not url or "://" not in url:
        return
    # A URL we cannot read: the URL pattern still masks its password in place.
    with contextlib.suppress(ValueError):
        hide(urlsplit(url).password)


def redact(text: str) -> str:
    """`text` without secrets: URL passwords, query values, bearer tokens, JWTs, hidden values."""
    text = mask(text)
    for value in _HIDDEN:
        if value in text:
            text = text.replace(value, MASK)
    return text


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


# -- formatting (tidewire serve) ----------------------------------------------

LogFormat = Literal["text", "json"]

#: Attributes every LogRecord has: anything else was passed as `extra`.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record and line, secrets masked (see the module)."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        millis = int(record.msecs)
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{millis:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            # Masked field by field, before JSON escapes could hide a secret's bytes.
            "message": redact(record.getMessage()),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        else:
            rid = REQUEST_ID.get()
            if rid is not None:
                entry["request_id"] = rid
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(DefaultFormatter):
    """uvicorn's lines, secrets masked (tracebacks included)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class TextAccessFormatter(AccessFormatter):
    """uvicorn's access lines, secrets masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def log_config(log_format: LogFormat, level: str) -> dict[str, Any]:
    """uvicorn's `log_config` for `tidewire serve`: its loggers and tidewire's, one format.

    With `json`, uvicorn's access lines give way to tidewire's (`tidewire.access`,
    which has the request id, route and duration); with `text` they stay, and
    `tidewire.access` writes nothing, so that no request is logged twice.
    """
    level = level.upper()
    if log_format == "json":
        formatters: dict[str, Any] = {"json": {"()": JsonFormatter}}
        handlers: dict[str, Any] = {
            "default": {
                "formatter": "json",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
            },
        }
        access: dict[str, Any] = {"handlers": ["default"], "level": level, "propagate": False}
        return {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": formatters,
            "handlers": handlers,
            "loggers": {
                "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
                "uvicorn.error": {"level": level},
                "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
                "tidewire": {"handlers": ["default"], "level": level, "propagate": False},
                "tidewire.access": access,
            },
            # Whatever else logs (the app's own code, libraries) is JSON too.
            "root": {"handlers": ["default"], "level": "WARNING"},
        }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {"()": TextFormatter, "fmt": "%(levelprefix)s %(message)s"},
            "access": {
                "()": TextAccessFormatter,
                "fmt": '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s',
            },
        },
        "handlers": {
            "default": {
                "formatter": "default",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
            },
            "access": {
                "formatter": "access",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["access"], "level": level, "propagate": False},
            "tidewire": {"handlers": ["default"], "level": level, "propagate": False},
            # uvicorn's access lines say it already.
            "tidewire.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


def hide_environment_secrets() -> None:
    """Hide the secrets that reach this process through its environment."""
    hide(
        os.environ.get("AWS_SECRET_ACCESS_KEY"),
        os.environ.get("AWS_SESSION_TOKEN"),
        os.environ.get("TIDEWIRE_AUTH_SECRET"),
        os.environ.get("TIDEWIRE_LINK_SECRET"),
        os.environ.get("TIDEWIRE_METRICS_TOKEN"),
    )
    hide_url_password(os.environ.get("TIDEWIRE_BROKER"))
    hide_url_password(os.environ.get("TIDEWIRE_STORAGE"))
