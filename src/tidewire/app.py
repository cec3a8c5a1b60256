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
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .auth import Authorize
from .blobs import Blobs, expire_blobs, lifetimes
from .broker import Broker, BrokerUnavailable, sweep_forever
from .broker import from_url as broker_from_url
from .channels import Channels
from .config import Settings
from .heap import trim_forever
from .metrics import add_metrics_route, sample_forever, worker_exited
from .quotas import ConnectionQuota, Quotas
from .runs import Runs, StreamFunction
from .server.bodies import MinBodyRate
from .server.caching import compressed
from .server.channels import add_channel_routes
from .server.drain import SERVING, Drain, InFlight, readiness
from .server.files import add_file_routes
from .server.guard import Guard
from .server.handoff import HANDOFF, Handoff
from .server.links import add_link_routes
from .server.logs import REQUEST_ID, hide, hide_environment_secrets, redact_server_logs
from .server.methods import method_not_allowed
from .server.observe import REQUEST_ID_HEADER, Observe
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
        # The broker the settings name; an app built with `Settings(...)` of
        # its own still takes it from the environment, where `tidewire serve`
        # puts it for every worker (as it does the storage).
        self.broker: Broker = broker or broker_from_url(
            self.settings.broker or os.environ.get("TIDEWIRE_BROKER"),
            lease=self.settings.lease,
        )
        if self.broker.max_retained_bytes is None:
            self.broker.max_retained_bytes = self.settings.max_retained_bytes
        self._storage = storage
        self.title = title
        self.streams: dict[str, StreamFunction] = {}
        # Blobs over the inline limit go to storage, made when first needed;
        # they expire with the events that carry them (blobs.lifetimes).
        limit, (run_life, channel_life) = self.settings.inline_blob_limit, lifetimes(self.settings)
        self.runs = Runs(self.broker, self.settings, Blobs(lambda: self.storage, limit, run_life))
        self.channels = Channels(
            self.broker, self.settings, Blobs(lambda: self.storage, limit, channel_life)
        )
        #: What one client may hold and how fast it may publish (see quotas.py).
        self.quotas = Quotas(self.broker, self.settings, self.runs.instance)
        self.runs.quotas = self.quotas
        #: Whether this app drains, and what it waits for (see server/drain.py).
        self.drain_state = Drain()

    @cached_property
    def storage(self) -> Storage:
        """Where files go: as given, else as the environment names it, else ./data."""
        # The command line names the storage in the environment, so that
        # every worker process it starts builds the same one.
        return self._storage or from_url(
            self.settings.storage or os.environ.get("TIDEWIRE_STORAGE"),
            data_dir=self.settings.data_dir or os.environ.get("TIDEWIRE_DATA_DIR"),
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

    @property
    def draining(self) -> bool:
        """Whether a drain has begun: `/readyz` says 503, new work is refused."""
        return self.drain_state.draining

    async def drain(self, timeout: float | None = None) -> None:
        """Drain this app, as `tidewire serve` does at SIGTERM; call it from the
        shutdown of a server that embeds the app, before it stops.

        From now on `/readyz` answers 503 and new runs, uploads, watches and
        subscriptions get 503 with `Retry-After`; live streams get the
        `unavailable` notice and end (their clients resume elsewhere).
        Requests in flight (counted by `app`'s middleware: with only the
        `router` mounted, the server's own shutdown waits for them) and runs
        of this process get `timeout` seconds (`drain_timeout`) to finish;
        runs still running then are cancelled, and this returns once their
        `finally` has run (within `close_timeout`). On a broker no other
        process shares (memory), attached runs are cancelled at once: their
        watchers cannot resume anywhere (docs/operations.md).
        """
        timeout = self.settings.drain_timeout if timeout is None else timeout
        self.drain_state.begin()
        if not self.broker.shared:
            # The watchers of attached runs were just told to go, and none can
            # come back: no other process reads this broker, and this one
            # takes no new watches. Detached runs (jobs) get their time.
            for run in list(self.runs.runs_here()):
                if run.attached:
                    self.runs.cancel_here(run)
        finished = await self.drain_state.wait(timeout, lambda: self.runs.running > 0)
        if not finished:
            logger.warning(
                "drain: %d requests and %d runs still going after %gs; cancelling the runs",
                self.drain_state.in_flight,
                self.runs.running,
                timeout,
            )
        await self.runs.cancel_all()

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
        # Gauges of state (retained bytes) are sampled, not kept on the hot path.
        sampler = asyncio.get_running_loop().create_task(sample_forever(self.broker))
        # Blob files go when their events can no longer be read (blobs.py).
        every = min((life for life in lifetimes(self.settings) if life is not None), default=60)
        blobs = asyncio.get_running_loop().create_task(
            expire_blobs(lambda: self.storage, max(1.0, min(every / 4, 60.0)))
        )
        SERVING.add(self)  # what `tidewire serve` drains at SIGTERM
        try:
            yield
        finally:
            SERVING.discard(self)
            for task in (sweeper, trimmer, logs, sampler, blobs):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.aclose()
            worker_exited()

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
        add_metrics_route(router, self)

        @router.get("/healthz", tags=["health"], summary="Liveness")
        async def healthz() -> dict[str, Any]:
            return {"status": "ok", "streams": len(self.streams)}

        @router.get(
            "/readyz",
            tags=["health"],
            summary="Readiness: broker and storage answer, and no drain has begun",
            responses={503: {"description": "draining, or the broker or storage does not answer"}},
        )
        async def readyz() -> JSONResponse:
            status, body = await readiness(self)
            return JSONResponse(body, status)

        return router

    @cached_property
    def app(self) -> FastAPI:
        """A FastAPI app with tidewire's routes."""
        app = _App(title=self.title)
        app.include_router(self.router)
        app.add_exception_handler(BrokerUnavailable, _broker_unavailable)
        # Several routes share a path (/files/{id}): Allow names all their methods.
        app.add_exception_handler(405, method_not_allowed(self.router))
        app.add_exception_handler(Exception, _internal_error)
        # Innermost: bodies that stop coming are cut (408) under every route.
        app.add_middleware(
            MinBodyRate, rate=self.settings.min_body_rate, grace=self.settings.body_grace
        )
        # JSON answers marked no-store, then gzip: one layer (caching.py).
        app.add_middleware(compressed)
        # A client over its connections is refused before any route runs;
        # inside CORS, so that a page can read the 429.
        app.add_middleware(ConnectionQuota, quotas=self.quotas, guard=self.guard)
        # Requests in flight, which a drain waits for.
        app.add_middleware(InFlight, drain=self.drain_state)
        # Origins are checked whether access control is on or off (origins.py
        # says why); CORS outside it, so that preflights never reach a route.
        app.add_middleware(OriginCheck, allow_origins=self.settings.allow_origins)
        app.add_middleware(Cors, allow_origins=self.settings.allow_origins)
        # Outermost: every answer gets its request id, is counted and logged,
        # refusals included. One layer for all three (server/observe.py says why).
        app.add_middleware(Observe, routes=self.router.routes)
        # `?access_token=` and `?sig=` stay out of uvicorn's request lines,
        # and this app's secrets out of every line.
        redact_server_logs()
        settings = self.settings
        hide(settings.auth_secret, settings.link_secret, settings.metrics_token)
        hide_environment_secrets()
        return app


#: The middleware whose requests may be handed off (server/handoff.py): each
#: puts off its end-of-request work until the stream ends, or has none.
HANDS_OFF: frozenset[object] = frozenset(
    {Observe, Cors, OriginCheck, InFlight, ConnectionQuota, compressed, MinBodyRate}
)


class _App(FastAPI):
    """FastAPI, running the long-lived responses that its routes hand off
    (server/handoff.py) once every layer of the request has returned: an idle
    stream then holds this one frame, not one per layer."""

    _hands_off: bool | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        if self._hands_off is None:
            # Middleware added by others may not know to wait for a stream's
            # end: then streams run where they are routed. (Fixed once the
            # app has started: Starlette refuses middleware after.)
            self._hands_off = all(m.cls in HANDS_OFF for m in self.user_middleware)
        if not self._hands_off:
            await super().__call__(scope, receive, send)
            return
        handoff = Handoff()
        # Set while the handed-off response runs too (`handed_off()` tells it
        # that it was), and set back after; no token kept: it would stay
        # alive with every open stream.
        previous = HANDOFF.get()
        HANDOFF.set(handoff)
        try:
            await super().__call__(scope, receive, send)
            response = handoff.response
            if response is None:
                return
            # FastAPI's exit stack of the request, closed by now: not kept for the stream's life.
            # Nor the routing's state: nothing of FastAPI's runs for it now, and the
            # response reads none of it (Observe reads `endpoint` and `route`, kept).
            for key in ("fastapi_middleware_astack", "fastapi", "path_params"):
                scope.pop(key, None)
            # Run here, not in a method of the Handoff: one frame fewer per stream.
            # The layers' `send` and `receive` go to the response only, which
            # may let them go once it needs them no more (transport.LogResponse).
            run = response(scope, handoff.receive, handoff.send)  # type: ignore[arg-type]
            handoff.receive = handoff.send = None
            error: BaseException | None = None
            try:
                await run
            except BaseException as exc:
                error = exc
                raise
            finally:
                await handoff.ended(error)
                if error is not None and isinstance(error, Exception):
                    await self._server_error(scope, receive, send, response, error)
        finally:
            HANDOFF.set(previous)

    async def _server_error(
        self, scope: Scope, receive: Receive, send: Send, response: Response, exc: Exception
    ) -> None:
        """What Starlette's ServerErrorMiddleware, which has returned by now,
        does with an error: the app's handler logs it, and answers if it can."""
        handler = self.exception_handlers.get(Exception)
        if handler is None:
            return
        answer = handler(Request(scope), exc)
        if not isinstance(answer, Response):
            answer = await answer
        # A LogResponse starts at once; `_started` says whether it has.
        if not getattr(response, "_started", True):
            await answer(scope, receive, send)


async def _broker_unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BrokerUnavailable)
    logger.warning("%s %s: %s", request.method, request.url.path, exc)
    return broker_unavailable(exc)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log, never to the client.
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    # Answered outside the request middleware (server/observe.py), which left its id here.
    rid = REQUEST_ID.get()
    headers = {REQUEST_ID_HEADER: rid} if rid else None
    return JSONResponse({"detail": "internal server error"}, status_code=500, headers=headers)
