"""`Tidewire`: streams, runs and channels behind one FastAPI app or router."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import cached_property
from typing import Any, TypeVar, overload

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from .auth import Authorize
from .blobs import Blobs
from .broker import Broker, BrokerUnavailable, sweep_forever
from .broker import from_url as broker_from_url
from .channels import Channels
from .config import Settings
from .heap import trim_forever
from .quotas import ConnectionQuota, Quotas
from .runs import Runs, StreamFunction
from .server.caching import NotStored, compressed
from .server.channels import add_channel_routes
from .server.files import add_file_routes
from .server.guard import Guard
from .server.links import add_link_routes
from .server.logs import redact_server_logs
from .server.methods import method_not_allowed
from .server.origins import Cors, OriginCheck
from .server.routing import broker_unavailable
from .server.streams import add_stream_routes
from .server.uploads import add_upload_routes, expire_uploads
from .server.web import add_web_routes
from .storage import Storage, from_url

__all__ = ["Tidewire"]

logger = logging.getLogger("tidewire")

F = TypeVar("F", bound=Callable[..., Any])


class Tidewire:
    """Streams, runs and channels.

    tw = Tidewire()

    @tw.stream
    async def count(n: int = 3):
        for i in range(n):
            yield {"i": i}

    app = tw.app            # a FastAPI app, or:
    my_app.include_router(tw.router)
    """

    def __init__(
        self,
        *,
        broker: Broker | None = None,
        storage: Storage | None = None,
        settings: Settings | None = None,
        title: str = "tidewire",
        authorize: Authorize | None = None,
    ) -> None:
        # Without settings, from the environment: `tidewire serve` hands its
        # worker processes their settings (auth, origins) that way.
        self.settings = settings or Settings.from_env()
        #: Who may call which route (see server/guard.py); `authorize(identity,
        #: action, resource)` is a rule of the application's own, after the token's.
        self.guard = Guard(self.settings, authorize)
        # As for storage, the command line names the broker in the environment.
        self.broker: Broker = broker or broker_from_url(
            os.environ.get("TIDEWIRE_BROKER"), lease=self.settings.lease
        )
        if self.broker.max_retained_bytes is None:
            self.broker.max_retained_bytes = self.settings.max_retained_bytes
        self._storage = storage
        self.title = title
        self.streams: dict[str, StreamFunction] = {}
        # Blobs over the inline limit go to storage, made when first needed.
        blobs = Blobs(lambda: self.storage, self.settings.inline_blob_limit)
        self.runs = Runs(self.broker, self.settings, blobs)
        self.channels = Channels(self.broker, self.settings, blobs)
        #: What one client may hold and how fast it may publish (see quotas.py).
        self.quotas = Quotas(self.broker, self.settings, self.runs.instance)
        self.runs.quotas = self.quotas

    @cached_property
    def storage(self) -> Storage:
        """Where files go: as given, else as the environment names it, else ./data."""
        # The command line names the storage in the environment, so that
        # every worker process it starts builds the same one.
        return self._storage or from_url(
            os.environ.get("TIDEWIRE_STORAGE"), data_dir=os.environ.get("TIDEWIRE_DATA_DIR")
        )

    @overload
    def stream(self, func: F) -> F: ...
    @overload
    def stream(
        self, *, name: str | None = None, description: str | None = None
    ) -> Callable[[F], F]: ...

    def stream(
        self,
        func: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
    ) -> Any:
        """Register a sync or async generator function as a stream.

        Its parameters, with their type hints and defaults, are the stream's
        parameters; its docstring is the description.
        """

        def register(func: F) -> F:
            stream_name = name or func.__name__
            if stream_name in self.streams:
                raise ValueError(f"a stream named {stream_name!r} is already registered")
            doc = description if description is not None else inspect.getdoc(func) or ""
            self.streams[stream_name] = StreamFunction(func, stream_name, doc)
            return func

        return register(func) if func is not None else register

    async def publish(self, channel: str, data: Any, *, event: str = "message") -> str:
        """Publish to a channel from server code; returns the event's id."""
        return await self.channels.publish(channel, data, event)

    async def aclose(self) -> None:
        """Cancel the running runs and close the broker."""
        await self.runs.aclose()
        await self.quotas.aclose()
        await self.broker.aclose()
        if "storage" in self.__dict__:
            await self.storage.aclose()

    @asynccontextmanager
    async def lifespan(self, _: Any = None) -> AsyncIterator[None]:
        # Stale resumable uploads are swept in the background for as long as we serve.
        sweeper = asyncio.get_running_loop().create_task(expire_uploads(self))
        # Memory freed by trimmed histories goes back to the system (see heap).
        trimmer = asyncio.get_running_loop().create_task(trim_forever())
        # Idle channels are dropped (max_channels counts the others).
        idle = min(60.0, self.settings.channel_idle_ttl / 4)
        logs = asyncio.get_running_loop().create_task(sweep_forever(self.broker, idle))
        try:
            yield
        finally:
            for task in (sweeper, trimmer, logs):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.aclose()

    @cached_property
    def router(self) -> APIRouter:
        """Every route of tidewire's HTTP contract, to mount in an existing FastAPI app."""
        # One flat router: each nested include_router adds a layer of routing
        # frames that every open stream holds for its whole life.
        router = APIRouter(lifespan=self.lifespan)
        add_stream_routes(router, self)
        add_channel_routes(router, self)
        add_file_routes(router, self)
        add_link_routes(router, self)
        add_upload_routes(router, self)
        add_web_routes(router, self)

        @router.get("/healthz", tags=["health"], summary="Liveness")
        async def healthz() -> dict[str, Any]:
            return {"status": "ok", "streams": len(self.streams)}

        return router

    @cached_property
    def app(self) -> FastAPI:
        """A FastAPI app with tidewire's routes."""
        app = FastAPI(title=self.title)
        app.include_router(self.router)
        app.add_exception_handler(BrokerUnavailable, _broker_unavailable)
        # Several routes share a path (/files/{id}): Allow names all their methods.
        app.add_exception_handler(405, method_not_allowed(self.router))
        app.add_exception_handler(Exception, _internal_error)
        # Outermost last: JSON answers are marked before gzip sees them.
        app.add_middleware(NotStored)
        app.add_middleware(compressed)
        # A client over its connections is refused before any route runs;
        # inside CORS, so that a page can read the 429.
        app.add_middleware(ConnectionQuota, quotas=self.quotas, guard=self.guard)
        # Origins are checked whether access control is on or off (origins.py
        # says why); CORS outside it, so that preflights never reach a route.
        app.add_middleware(OriginCheck, allow_origins=self.settings.allow_origins)
        app.add_middleware(Cors, allow_origins=self.settings.allow_origins)
        # `?access_token=` and `?sig=` stay out of uvicorn's request lines.
        redact_server_logs()
        return app


async def _broker_unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BrokerUnavailable)
    logger.warning("%s %s: %s", request.method, request.url.path, exc)
    return broker_unavailable(exc)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log, never to the client.
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)
