"""The HTTP/1.1 protocol `tidewire serve` runs: uvicorn's httptools one, with header limits.

uvicorn's httptools protocol takes request headers of any size and at any
pace: a 256 MB header was parsed for 72 s with the event loop blocked (the
parser grows each header value by concatenation), and connections that
dribble a header at a byte a second were kept forever. Its h11 protocol
bounds the size (`h11_max_incomplete_event_size`) but answers 400 rather than
431, has no header timeout either, and is slower (docs/security.md has the
numbers). So the httptools protocol is kept and guarded in front of its parser:

- `Settings.max_header_bytes`: bytes received while a request's headers are
  incomplete are counted; past the limit the request gets `431` and the
  connection is closed. The parser sees at most the limit plus one read
  (asyncio reads at most 256 KiB at a time), so it never works long.
- `Settings.header_timeout`: a request's headers must be complete this many
  seconds after its first byte (or after the connection opened): otherwise
  the connection is closed. Idle keep-alive connections are uvicorn's
  (`timeout_keep_alive`).

It also caps the sockets a process holds open, so that a flood of
connections cannot take every file descriptor (measured before: 22,000
sockets from one client, and /healthz refused). Both are checked as a socket
is accepted (`connection_made`), before it costs more than its descriptor,
and a socket past a cap is closed at once (reset), nothing sent:

- `Settings.max_sockets_per_address`: sockets open from one IP address. Not
  for the addresses trusted to forward for others (uvicorn's
  `--forwarded-allow-ips`, 127.0.0.1 and ::1 by default): a proxy in front
  speaks for all its clients, and bounds them itself (docs/deploy/nginx.conf).
- `Settings.max_sockets`: sockets open in the process, at most the file
  descriptor limit (RLIMIT_NOFILE, whose soft value is raised to the hard one)
  less a reserve: asyncio accepts up to `backlog` sockets in one go before
  any protocol sees them, and files, storage and broker connections need
  descriptors too; so accept never fails with EMFILE.

Both count the sockets of this process only: with `--workers N` each worker
has its own counts (the kernel spreads connections over them), so one address
may hold up to N times its cap. (`Settings.max_connections_per_client` is the
cap shared by every process, checked per request: quotas.py.) WebSockets
count until they close.

The limits come from the `TIDEWIRE_*` environment, which `tidewire serve`
sets from the app's settings, so that worker processes get them too.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import ipaddress
import logging
import resource
import time
from typing import Any

import orjson
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from ..config import Settings

__all__ = [
    "HeaderLimitedProtocol",
    "Sockets",
    "chunked_cycle",
    "client_gone",
    "header_limits",
    "socket_caps",
    "socket_env",
    "unwatch_client",
    "watch_client",
]

logger = logging.getLogger("tidewire")

#: Descriptors kept for what is not a client's socket (files being sent or
#: stored, SQLite, Redis and S3 connections, logs), beside the accept backlog.
RESERVE = 256


#: The uvicorn request cycle a request's task serves (set as the task is made).
CYCLE: contextvars.ContextVar[RequestResponseCycle | None] = contextvars.ContextVar(
    "tidewire_cycle", default=None
)


def chunked_cycle() -> RequestResponseCycle | None:
    """The uvicorn request cycle of the request being served, when its response
    has started with a chunked body (a stream's): else None.

    A stream whose events go to many subscribers writes each subscriber's chunk
    to its socket itself (transport.py's taps), as this cycle's `send` would:
    `%x CRLF body CRLF` on the transport, unless the client went away or the
    transport asked to pause writing. Through `send` and the app's layers it
    would cost a coroutine per subscriber per event, which is what bounds
    fan-out (bench W3). The cycle is uvicorn's, not ASGI's: under any other
    server (or protocol) there is none, and streams write through `send`.
    """
    cycle = CYCLE.get()
    if (
        cycle is not None
        and cycle.response_started
        and not cycle.response_complete
        and cycle.chunked_encoding is True
        and cycle.scope["method"] != "HEAD"
    ):
        return cycle
    return None


def watch_client(task: asyncio.Task[Any]) -> HeaderLimitedProtocol | None:
    """Have `task` cancelled as the client of the request being served goes
    away, by the connection's protocol itself; its protocol, or None where it
    cannot (then wait in `receive` for `http.disconnect`, as ASGI has it).

    A task waiting in `receive` for that, beside every open stream, was its
    largest cost once idle: the task, two coroutines and a future, ~0.8 KB a
    connection (bench W4). The protocol learns it first anyway
    (`connection_lost`). Only once the whole request has come, with reading
    not paused: until then `receive` has a body to hand over, and a paused
    socket would not show its client's leaving to anyone.
    """
    cycle = CYCLE.get()
    if cycle is None or cycle.more_body or cycle.disconnected:
        return None
    protocol = cycle.transport.get_protocol()
    if (
        not isinstance(protocol, HeaderLimitedProtocol)
        or protocol.cycle is not cycle
        or protocol._stream is not None
        or protocol.flow.read_paused
        or cycle.transport.is_closing()
    ):
        return None
    protocol._stream = task
    return protocol


def unwatch_client(protocol: HeaderLimitedProtocol | None) -> None:
    """The end of `watch_client`'s watch (None: there was none)."""
    if protocol is not None:
        protocol._stream = None


def client_gone(protocol: HeaderLimitedProtocol | None) -> bool:
    """Whether the client of a request `watch_client` watches has gone (its
    connection is lost, or closing)."""
    return protocol is not None and protocol.transport.is_closing()


@functools.cache
def header_limits() -> tuple[int, float]:
    """`(max_header_bytes, header_timeout)` of this process's settings."""
    settings = Settings.from_env()
    return settings.max_header_bytes, settings.header_timeout


def socket_caps(backlog: int) -> tuple[int, int | None]:
    """`(max_sockets, max_sockets_per_address)` of this process.

    The soft descriptor limit is raised to the hard one first (as Go's
    runtime does): Debian's soft default of 1024 would cap a server at a few
    hundred clients for no reason.
    """
    settings = Settings.from_env()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    # At least a few, however low the limit: a server that accepts nothing is no use.
    most = max(16, soft - backlog - RESERVE, soft // 4)
    wanted = settings.max_sockets
    return (most if wanted is None else min(wanted, most)), settings.max_sockets_per_address


def socket_env(settings: Settings) -> dict[str, str]:
    """The environment that hands `settings`' socket caps to worker processes.

    "No cap" travels as a number no process reaches: the environment has no
    spelling of None that `Settings.from_env` reads.
    """
    env = {"TIDEWIRE_MAX_SOCKETS_PER_ADDRESS": str(settings.max_sockets_per_address or 1 << 62)}
    if settings.max_sockets is not None:
        env["TIDEWIRE_MAX_SOCKETS"] = str(settings.max_sockets)
    return env


class Sockets:
    """The sockets open in this process, in all and by address: who may have one more."""

    def __init__(self, most: int, per_address: int | None, trusted: Any) -> None:
        self.most = most
        self.per_address = per_address
        self.trusted = _trusted(trusted)
        self.total = 0
        self.by_address: collections.Counter[str] = collections.Counter()
        #: The address each socket counts against (None: only in the total).
        self.held: dict[asyncio.BaseTransport, str | None] = {}
        self._warned = 0.0

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Count a new socket, or say False (and count nothing) if it is one too many."""
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) and peer else None
        address = None if host is None or self._is_trusted(host) else host
        if self.total >= self.most:
            self._warn(f"{self.total} sockets open, the most this process takes (max_sockets)")
            return False
        if (
            address is not None
            and self.per_address is not None
            and self.by_address[address] >= self.per_address
        ):
            self._warn(f"{address} has {self.per_address} sockets open (max_sockets_per_address)")
            return False
        self.total += 1
        if address is not None:
            self.by_address[address] += 1
        self.held[transport] = address
        return True

    def release(self, transport: asyncio.BaseTransport) -> None:
        """A counted socket closed (once per socket; again is nothing)."""
        if transport not in self.held:
            return
        address = self.held.pop(transport)
        self.total -= 1
        if address is not None:
            self.by_address[address] -= 1
            if not self.by_address[address]:
                del self.by_address[address]

    def _is_trusted(self, host: str) -> bool:
        if self.trusted is True:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)

    def _warn(self, what: str) -> None:
        # A flood refuses thousands of sockets a second: one line a minute says so.
        now = time.monotonic()
        if now - self._warned > 60:
            self._warned = now
            logger.warning("closing new sockets at once: %s", what)


def _trusted(value: Any) -> Any:
    """uvicorn's `forwarded_allow_ips` as networks; True for `*` (every address)."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    networks = []
    for item in (str(i).strip() for i in items):
        if item == "*":
            return True
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            continue  # a literal uvicorn also accepts (a unix socket's name): no address
    return networks


@functools.cache
def _sockets(backlog: int, trusted: str) -> Sockets:
    most, per_address = socket_caps(backlog)
    return Sockets(most, per_address, trusted)


def sockets_of(config: Config) -> Sockets:
    """This process's counts (one per server configuration, so one in practice)."""
    trusted = config.forwarded_allow_ips if config.proxy_headers else ""
    key = trusted if isinstance(trusted, str) else ",".join(trusted)
    return _sockets(config.backlog, key)


_COUNTED: dict[type[Any], type[Any]] = {}


def _counted(ws_protocol: type[Any]) -> type[Any]:
    """`ws_protocol`, releasing its socket's count when it closes.

    A connection upgraded to a WebSocket is handed to another protocol
    object, whose `connection_lost` is the one called in the end.
    """
    if ws_protocol in _COUNTED.values():
        return ws_protocol
    if ws_protocol not in _COUNTED:

        class Counted(ws_protocol):  # type: ignore[misc]
            def connection_lost(self, exc: Exception | None) -> None:
                try:
                    super().connection_lost(exc)
                finally:
                    sockets_of(self.config).release(self.transport)

        Counted.__name__ = Counted.__qualname__ = f"Counted{ws_protocol.__name__}"
        _COUNTED[ws_protocol] = Counted
    return _COUNTED[ws_protocol]


class HeaderLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol: headers over the size limit get 431, too slow a close.

    And sockets past this process's caps are closed at once.
    """

    # Slots for what this class adds: uvicorn's protocol keeps 27 attributes
    # in its __dict__, and past 30 an instance dict stops sharing its keys
    # with the class's others and takes 1.6 KB rather than 0.3 (bench W4).
    __slots__ = (
        "_header_bytes",
        "_header_timeout",
        "_header_timer",
        "_in_headers",
        "_max_header_bytes",
        "_refused",
        "_sockets",
        "_stream",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sockets = sockets_of(self.config)
        if self.ws_protocol_class is not None:
            self.ws_protocol_class = _counted(self.ws_protocol_class)
        self._max_header_bytes, self._header_timeout = header_limits()
        #: Whether the next bytes are (the start of) a request's headers.
        self._in_headers = True
        #: Set once a request was refused: what the parser still finds in the
        #: read it was refused in is ignored (the connection is closing).
        self._refused = False
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        #: The task of a stream to cancel when the client goes (`watch_client`).
        self._stream: asyncio.Task[Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self._sockets.admit(transport):
            # A reset frees the descriptor now, and the client learns at once.
            self._refused = True
            transport.abort()
            return
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        self._sockets.release(self.transport)
        super().connection_lost(exc)
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            # Counted whole: the bytes of a request begun in the middle of a
            # read are not, so the count is low by less than one read, never high.
            self._header_bytes += len(data)
            if self._header_timer is None:
                self._start_header_timer()
        super().data_received(data)
        if self._in_headers and self._header_bytes > self._max_header_bytes:
            self._refuse_headers()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._stop_header_timer()
        if self._refused:
            return
        # Headers that arrived whole in one read were not refused by the
        # count: their parsed size is checked before the app sees them.
        if self._parsed_size() > self._max_header_bytes:
            self._refuse_headers()
            return
        super().on_headers_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # The task copies the context as it is made: it alone sees its cycle.
        token = CYCLE.set(cycle)
        try:
            super()._start_asgi_task(cycle, app)
        finally:
            CYCLE.reset(token)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        # What follows in this connection is the next request's headers; its
        # clock starts with its first byte (an idle connection is keep-alive's).
        self._in_headers = True
        self._header_bytes = 0

    def _parsed_size(self) -> int:
        """The size of the request line and headers just parsed, as sent (give or take spaces).

        `METHOD URL HTTP/1.1` CRLF, then `name: value` CRLF each, then CRLF.
        """
        size = len(self.parser.get_method()) + 1 + len(self.url) + len(" HTTP/1.1\r\n\r\n")
        return size + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _start_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self._header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._in_headers and not self.transport.is_closing():
            # As nginx's client_header_timeout: the connection is closed (no
            # one is reading an answer at that pace).
            self.transport.close()

    def _refuse_headers(self) -> None:
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._stop_header_timer()
        detail = f"request headers may be at most {self._max_header_bytes} bytes"
        body = orjson.dumps({"detail": detail})
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n"
        )
        self.transport.write(head + body)
        self.transport.close()
