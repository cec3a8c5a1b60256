"""Per-client quotas: what one client may hold at once, and how fast it may publish.

A *client* is the token's `sub` when access control is on, else the address
the request came from (`request.client.host`: behind a proxy, uvicorn's
`--forwarded-allow-ips` makes that the real client's). Its quotas
(DESIGN.md "Limits"):

- runs running at once (`max_runs_per_client`), detached ones included,
- open connections (`max_connections_per_client`): every request in flight,
  long-lived streams, subscriptions and WebSockets included, counted by
  `ConnectionQuota`, an ASGI middleware,
- publishes per second (`publish_rate`, `publish_burst`),
- unfinished resumable uploads (`max_open_uploads`),
- bytes of stored files (`storage_quota`; a file's owner is its uploader's
  `sub`, and files uploaded with access control off share one pool).

The counting is the broker's (`Coordination.hold`/`take`/`add`), so with
Redis every process sees the same counts. Slots of things that live as long
as a process holds them (runs, connections) expire unless renewed: a process
that dies frees its clients' slots within `3 x lease` seconds.

Past a quota: `429` with `Retry-After` (`507` for storage), as an
`OverQuota`, which is an `HTTPException` so that it passes through storage
code and every route answers it as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
from fastapi import HTTPException
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from .auth import OPEN, Identity
from .broker import BrokerUnavailable, Coordination
from .config import Settings
from .server.handoff import handed_off
from .server.routing import deny_websocket
from .storage import FileInfo, Storage, StorageError, Upload

if TYPE_CHECKING:
    from .server.guard import Guard

__all__ = ["ConnectionQuota", "OverQuota", "Quotas", "client_key"]

logger = logging.getLogger("tidewire")

#: Paths a client holding all its connections must still reach: probes and
#: metrics are how an operator sees what is going on.
UNCOUNTED = frozenset({"/healthz", "/readyz", "/metrics"})

#: Where `ConnectionQuota` leaves the client it counted (`client_key`), in the
#: request's scope: the access log names it (server/observe.py).
CLIENT_SCOPE_KEY = "tidewire.client"


class OverQuota(HTTPException):
    """A client is past one of its quotas: 429 with Retry-After, or 507."""

    def __init__(self, limit: str, detail: str, retry_after: float | None = None) -> None:
        headers = None
        if retry_after is not None:
            # Whole seconds (RFC 9110 10.2.3), at least 1: 0 would invite a busy loop.
            headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
        super().__init__(429 if retry_after is not None else 507, detail, headers)
        self.limit = limit


def client_key(identity: Identity, conn: HTTPConnection | Scope) -> str:
    """Who a quota counts against: `sub:<sub>` with a token, else `addr:<host>`."""
    if identity is not OPEN and identity.sub:
        return "sub:" + identity.sub
    scope = conn.scope if isinstance(conn, HTTPConnection) else conn
    client = scope.get("client")
    return "addr:" + (client[0] if client else "unknown")


class Quotas:
    """The quotas of one process's clients, counted in the broker."""

    def __init__(self, coordination: Coordination, settings: Settings, instance: str) -> None:
        self.coordination = coordination
        self.settings = settings
        self.instance = instance
        # How long a slot lives without renewal, and how often ours are renewed.
        self.ttl = 3 * settings.lease
        self._held: dict[str, set[str]] = {}  # slot key -> members this process holds
        self._numbers = itertools.count(1)
        self._renewing: asyncio.Task[None] | None = None

    # -- slots: runs and connections -------------------------------------------

    async def _hold(self, key: str, member: str, limit: int) -> float | None:
        wait = await self.coordination.hold(key, member, limit, self.ttl)
        if wait is None:
            self._held.setdefault(key, set()).add(member)
            if self._renewing is None or self._renewing.done():
                self._renewing = asyncio.get_running_loop().create_task(self._renew_forever())
        return wait

    async def _drop(self, key: str, member: str) -> None:
        members = self._held.get(key)
        if members is not None:
            members.discard(member)
            if not members:
                del self._held[key]
        with contextlib.suppress(BrokerUnavailable):
            await self.coordination.drop(key, member)

    async def _renew_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self.settings.lease)
            for key, members in list(self._held.items()):
                try:
                    await self.coordination.renew(key, list(members), self.ttl)
                except BrokerUnavailable:
                    logger.warning("quotas: cannot renew slots, the broker is unreachable")
                    break

    async def start_run(self, client: str, run_id: str) -> None:
        """Count a run against `client`; 429 if it runs `max_runs_per_client` already."""
        limit = self.settings.max_runs_per_client
        if await self._hold("runs:" + client, run_id, limit) is not None:
            raise OverQuota(
                "max_runs_per_client",
                f"this client has {limit} runs running, the most it may: wait for one "
                "to end, or cancel one (DELETE /runs/{id}), then try again",
                retry_after=1,
            )

    async def end_run(self, client: str, run_id: str) -> None:
        """The run ended: its slot is free."""
        await self._drop("runs:" + client, run_id)

    async def open_connection(self, client: str) -> str | None:
        """Hold one of `client`'s connection slots; 429 past `max_connections_per_client`.
        Returns what `close_connection` takes back (None: not counted)."""
        key = "conns:" + client
        member = f"{self.instance}:{next(self._numbers)}"
        limit = self.settings.max_connections_per_client
        try:
            if await self._hold(key, member, limit) is None:
                return member
        except BrokerUnavailable:
            # Counting needs the broker; the routes that need it answer 503
            # themselves, and the rest (downloads) may as well be served.
            return None
        raise OverQuota(
            "max_connections_per_client",
            f"this client has {limit} connections open, the most it may: close "
            "some (streams, subscriptions, WebSockets), then try again",
            retry_after=1,
        )

    async def close_connection(self, client: str, member: str | None) -> None:
        if member is not None:
            await self._drop("conns:" + client, member)

    # -- rates ------------------------------------------------------------------

    async def publish(self, client: str) -> None:
        """Count one publish; 429 past `publish_rate` per second (after `publish_burst`)."""
        rate, burst = self.settings.publish_rate, self.settings.publish_burst
        wait = await self.coordination.take("publish:" + client, rate, burst)
        if wait > 0:
            raise OverQuota(
                "publish_rate",
                f"this client publishes faster than {rate:g} events/s (bursts of "
                f"{burst}): slow down and try again after Retry-After",
                retry_after=wait,
            )

    async def publish_frame(self, websocket: WebSocket, identity: Identity) -> bool:
        """Count a frame a WebSocket publishes; past the rate, close it with 1013
        (Try Again Later, RFC 6455 7.4.2): a frame cannot be answered 429."""
        try:
            await self.publish(client_key(identity, websocket))
        except OverQuota as exc:
            await websocket.close(1013, str(exc.detail)[:123])
            return False
        return True

    # -- uploads and stored bytes -----------------------------------------------

    @staticmethod
    def _pool(owner: str | None) -> str:
        return "bytes:" + (owner or "")

    async def _room(self, owner: str | None, size: int) -> int:
        """Bytes `owner` may still store; 507 when `size` more would not fit."""
        quota = self.settings.storage_quota
        assert quota is not None
        used = await self.coordination.add(self._pool(owner), 0) or 0
        if used + size > quota:
            raise self._full(used, quota)
        return quota - used

    @staticmethod
    def _full(used: int, quota: int) -> OverQuota:
        return OverQuota(
            "storage_quota",
            f"this client stores {used} bytes of its quota of {quota}: delete some "
            "files (DELETE /files/{id}) to make room",
        )

    async def _count_file(
        self, owner: str | None, info: FileInfo, delete: Callable[[str], Awaitable[None]]
    ) -> None:
        quota = self.settings.storage_quota
        assert quota is not None
        if await self.coordination.add(self._pool(owner), info.size, quota) is None:
            # Another upload of the same client took the room meanwhile.
            await delete(info.id)
            used = await self.coordination.add(self._pool(owner), 0) or 0
            raise self._full(used, quota)

    async def save(
        self,
        owner: str | None,
        chunks: AsyncIterable[bytes],
        save: Callable[[AsyncIterable[bytes]], Awaitable[FileInfo]],
        delete: Callable[[str], Awaitable[None]],
    ) -> FileInfo:
        """`save(chunks)`, within `owner`'s storage quota (507 past it, nothing kept)."""
        if self.settings.storage_quota is None:
            return await save(chunks)
        room = await self._room(owner, 0)
        quota = self.settings.storage_quota

        async def metered() -> AsyncIterator[bytes]:
            # Stops the upload as it passes the quota: storage then keeps nothing.
            seen = 0
            async for chunk in chunks:
                seen += len(chunk)
                if seen > room:
                    raise self._full(quota - room, quota)
                yield chunk

        info = await save(metered())
        await self._count_file(owner, info, delete)
        return info

    async def deleted(self, info: FileInfo) -> None:
        """A file is gone: its bytes no longer count."""
        if self.settings.storage_quota is not None:
            await self.coordination.add(self._pool(info.owner), -info.size)

    async def create_upload(
        self,
        client: str,
        owner: str | None,
        length: int,
        create: Callable[[], Awaitable[Upload]],
        abort: Callable[[str], Awaitable[None]],
    ) -> Upload:
        """`create()` a resumable upload, within `client`'s open uploads (429)
        and `owner`'s storage quota (507, by its declared length)."""
        if self.settings.storage_quota is not None:
            await self._room(owner, length)
        upload = await create()
        limit = self.settings.max_open_uploads
        wait = await self.coordination.hold(
            "uploads:" + client, upload.id, limit, self.settings.upload_expiry
        )
        if wait is not None:
            await abort(upload.id)  # counted after it was made: take it back
            raise OverQuota(
                "max_open_uploads",
                f"this client has {limit} unfinished uploads, the most it may: finish "
                "or delete one (DELETE /uploads/{id}), then try again",
                retry_after=wait,
            )
        return upload

    @staticmethod
    def _creator(upload: Upload, conn: HTTPConnection) -> str:
        # The upload's client: its owner with a token; with access control
        # off, the address finishing it (usually its creator's; if not, the
        # creator's slot frees when the upload would have expired).
        return "sub:" + upload.owner if upload.owner else client_key(OPEN, conn)

    async def upload_finished(self, conn: HTTPConnection, upload: Upload, storage: Storage) -> None:
        """If `upload` is finished: it is no longer open, and its file counts
        against its owner's storage quota (past it: 507, the file and the
        upload removed)."""
        if upload.file is None:
            return
        with contextlib.suppress(BrokerUnavailable):
            await self.coordination.drop("uploads:" + self._creator(upload, conn), upload.id)
        if self.settings.storage_quota is not None:
            file = upload.file
            info = FileInfo(file, upload.name, upload.length, upload.type, "", 0, upload.owner)

            async def remove(_: str) -> None:
                with contextlib.suppress(StorageError):
                    await storage.delete(file)
                with contextlib.suppress(StorageError):
                    await storage.abort(upload.id)

            await self._count_file(upload.owner, info, remove)

    async def upload_aborted(self, conn: HTTPConnection, upload: Upload) -> None:
        """`upload` was deleted: it is no longer open."""
        with contextlib.suppress(BrokerUnavailable):
            await self.coordination.drop("uploads:" + self._creator(upload, conn), upload.id)

    # -------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing


def _route_path(scope: Scope) -> str:
    # The path within this app: mounted under /a, `path` is /a/healthz and `root_path` /a.
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class ConnectionQuota:
    """ASGI middleware: each HTTP request and WebSocket holds one of its client's
    connection slots while it is open (probes and metrics excepted)."""

    def __init__(self, app: ASGIApp, quotas: Quotas, guard: Guard) -> None:
        self.app = app
        self.quotas = quotas
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or _route_path(scope) in UNCOUNTED:
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        try:
            identity = await self.guard.identify(conn)
        except HTTPException:
            # A bad token: the route answers 401; till then it counts as its address.
            identity = OPEN
        client = scope[CLIENT_SCOPE_KEY] = client_key(identity, scope)
        try:
            member = await self.quotas.open_connection(client)
        except OverQuota as exc:
            if scope["type"] == "websocket":
                await deny_websocket(WebSocket(scope, receive, send), exc)
            else:
                response = JSONResponse({"detail": exc.detail}, exc.status_code, exc.headers)
                await response(scope, receive, send)
            return
        release = _Release(self.quotas, client, member)
        try:
            await self.app(scope, receive, send)
        except BaseException:
            await release(None)
            raise
        handoff = handed_off()
        if handoff is None:
            await release(None)
        else:
            handoff.after(release)  # a stream holds its slot until it ends (handoff.py)


class _Release:
    """Give a connection's slot back (shielded: a cancelled connection must
    still give it back). An object with slots: it waits with every open stream."""

    __slots__ = ("client", "member", "quotas")

    def __init__(self, quotas: Quotas, client: str, member: str | None) -> None:
        self.quotas, self.client, self.member = quotas, client, member

    async def __call__(self, _: BaseException | None) -> None:
        with anyio.CancelScope(shield=True):
            await self.quotas.close_connection(self.client, self.member)
