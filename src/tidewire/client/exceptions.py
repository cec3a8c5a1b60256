"""Everything the client raises, in one tree.

```
TidewireError
├── TransportError           the server could not be reached, or the connection broke
│   ├── ConnectError         no connection was made
│   ├── ReadTimeout          the server sent nothing for longer than the read timeout
│   └── Disconnected         a stream gave up after `retries` failed reconnects
├── HTTPStatusError          the server answered 4xx/5xx; `.status_code`, `.detail`
├── ProtocolError            the server's bytes are not tidewire's contract
│   └── ChecksumMismatch     downloaded bytes do not hash to the file's sha256
└── StreamError              a stream ended in a way the caller should handle
    ├── StreamGap            events were trimmed before this reader saw them
    └── RunFailed            the run's generator raised; `.type`, `.message`
```

`TransportError`s on a stream are retried (resuming from the last id) before
`Disconnected` is raised; everything else is raised at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

__all__ = [
    "ChecksumMismatch",
    "ConnectError",
    "Disconnected",
    "HTTPStatusError",
    "ProtocolError",
    "ReadTimeout",
    "RunFailed",
    "StreamError",
    "StreamGap",
    "TidewireError",
    "TransportError",
    "describe",
    "raise_for_status",
    "translate",
]


class TidewireError(Exception):
    """The base of every error the client raises."""


class TransportError(TidewireError):
    """The server could not be reached, or a connection broke mid-way."""


class ConnectError(TransportError):
    """No connection could be made to the server."""


class ReadTimeout(TransportError):
    """The server sent nothing for longer than the read timeout."""


class Disconnected(TransportError):
    """A stream lost its connection and gave up after `attempts` reconnects."""

    def __init__(self, message: str, *, attempts: int, last_id: str | None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_id = last_id


class HTTPStatusError(TidewireError):
    """The server answered with a 4xx or 5xx status.

    `detail` is the server's explanation (the `detail` of its JSON body, or
    the body's text), which says what to change. `retry_after` is the seconds
    the server asked for before trying again (`Retry-After`: a 429, or a 503
    while it drains), if it said.
    """

    def __init__(
        self,
        status_code: int,
        detail: Any,
        *,
        method: str,
        url: str,
        retry_after: float | None = None,
    ) -> None:
        self.status_code = status_code
        self.detail = detail
        self.method = method
        self.url = url
        self.retry_after = retry_after
        super().__init__(f"{status_code} from {method} {url}: {describe(detail)}")


class ProtocolError(TidewireError):
    """The server sent something that is not tidewire's contract."""


class ChecksumMismatch(ProtocolError):
    """Downloaded bytes do not have the sha256 the server announced."""

    def __init__(self, path: str, expected: str, actual: str) -> None:
        super().__init__(f"{path}: sha256 is {actual}, expected {expected}")
        self.path = path
        self.expected = expected
        self.actual = actual


class StreamError(TidewireError):
    """A stream ended in a way the caller has to handle."""


class StreamGap(StreamError):
    """The reader fell behind the retained history: `missed` events are gone for it.

    `after` is the position to resume from (the oldest retained event follows it).
    `restarted`: the server restarted since the reader's last event, and how
    many events it lost with its memory is unknown (`missed` counts only those
    trimmed since).
    """

    def __init__(self, missed: int, after: str, *, restarted: bool = False) -> None:
        if restarted:
            what = "the server restarted since this reader's last event: what it had is lost"
        else:
            what = f"{missed} events were trimmed before this reader saw them"
        super().__init__(what)
        self.missed = missed
        self.after = after
        self.restarted = restarted


class RunFailed(StreamError):
    """The run's generator raised: `type` and `message` are the remote exception's."""

    def __init__(self, run_id: str | None, type: str, message: str) -> None:
        super().__init__(f"run {run_id} failed: {type}: {message}")
        self.run_id = run_id
        self.type = type
        self.message = message


def describe(detail: Any) -> str:
    """The server's `detail` as one line: a 422's list of fields as `field: message; …`."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                # FastAPI's loc starts with where the field was ("query", "body").
                loc = ".".join(str(p) for p in item.get("loc", ()) if p not in ("query", "body"))
                parts.append(f"{loc}: {item['msg']}" if loc else str(item["msg"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def status_error(response: httpx.Response) -> HTTPStatusError:
    """The error for a 4xx/5xx response whose body has been read."""
    detail: Any
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text or response.reason_phrase
    request = response.request
    return HTTPStatusError(
        response.status_code,
        detail,
        method=request.method,
        url=str(request.url),
        retry_after=retry_after(response.headers.get("retry-after")),
    )


def retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds; None when absent or not a number of seconds.

    tidewire sends seconds; the HTTP-date form (from a proxy, say) is not
    worth a date parser here: the backoff then decides.
    """
    if value is None or not value.strip().isdigit() or len(value) > 10:
        return None
    return float(value.strip())


def raise_for_status(response: httpx.Response) -> None:
    """Raise `HTTPStatusError` for a 4xx/5xx response whose body has been read."""
    if response.status_code >= 400:
        raise status_error(response)


@contextmanager
def translate() -> Iterator[None]:
    """Turn httpx's transport errors into ours (works around `await`s too)."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise ConnectError(f"cannot connect to {_where(exc)}: {exc or type(exc).__name__}") from exc
    except httpx.ReadTimeout as exc:
        raise ReadTimeout(f"no data from {_where(exc)} within the read timeout") from exc
    except httpx.TransportError as exc:
        raise TransportError(f"{_where(exc)}: {exc or type(exc).__name__}") from exc


def _where(exc: httpx.TransportError) -> str:
    try:
        return str(exc.request.url)
    except RuntimeError:  # an error raised outside a request has none
        return "the server"
