"""Routes for streams and runs: start a run, watch it on any transport, cancel it."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import pydantic
from fastapi import APIRouter, HTTPException, Request, WebSocket
from fastapi.responses import JSONResponse, Response

from ..auth import Identity
from ..broker import BadPosition, BrokerUnavailable
from ..events import Envelope, TooDeep, load_json
from ..quotas import client_key
from ..runs import RESERVED_PARAMS, CancelNotConfirmed, Run, StreamFunction, TooManyRuns
from ..wire import LAST_EVENT_ID, RUN_HEADER, RUN_ID_SEPARATOR
from .bodies import read_limited
from .errors import ACCESS, error_responses
from .routing import (
    EVENTS_RESPONSE,
    RUN_ID_PATTERN,
    add_stream_route,
    deny_websocket,
    negotiate,
    resume_parameters,
    resume_position,
)
from .transport import LogCursor, LogResponse, ahead_header, ahead_notice, stream_websocket

if TYPE_CHECKING:
    from ..app import Tidewire

__all__ = ["add_stream_routes", "read_params", "validate"]

_RUN_HEADER = {RUN_HEADER: {"description": "the run's id", "schema": {"type": "string"}}}
_PARAMS = {"type": "object", "description": "the stream's parameters (GET /streams lists them)"}
#: A run's parameters may come in a body too; the route reads it itself.
_PARAMS_BODY = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {"schema": _PARAMS},
            "application/x-www-form-urlencoded": {"schema": _PARAMS},
        },
    }
}
_START_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {**EVENTS_RESPONSE, "headers": _RUN_HEADER},
    204: {
        "description": (
            "A reconnect (`Last-Event-ID`) whose run is gone, or has finished and was "
            "read to its end: nothing more will come (EventSource stops)"
        )
    },
    202: {
        "description": "Detached (`?detach=true`): where to watch the run",
        "headers": _RUN_HEADER,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "run": {"type": "string"},
                        "events": {"type": "string"},
                        "ws": {"type": "string"},
                    },
                    "required": ["run", "events", "ws"],
                }
            }
        },
    },
    # 400: a body that is not JSON, or a Last-Event-ID that is not a run's event id;
    # 503: too many runs, or no broker.
    **error_responses(*ACCESS, 400, 404, 413, 415, 422, 503),
}


async def read_params(request: Request | WebSocket, limit: int) -> dict[str, tuple[Any, str]]:
    """A stream's parameters from the query string and, for POST, a JSON or form body.

    The body is read whole, up to `limit` bytes (413 past it: the whole body,
    files of a multipart form included). Returns `{name: (value, where)}`;
    `where` is "query" or "body", for error messages.
    """
    values: dict[str, tuple[Any, str]] = {}
    for key in request.query_params:
        if key not in RESERVED_PARAMS:
            found = request.query_params.getlist(key)
            values[key] = (found if len(found) > 1 else found[0], "query")
    if not isinstance(request, Request) or request.method != "POST":
        return values
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await read_limited(request, limit, "a stream's parameters")
    body: Any
    if kind == "application/json" or kind.endswith("+json"):
        try:
            body = load_json(raw or b"{}")
        except TooDeep as exc:
            raise HTTPException(422, str(exc)) from None
        except orjson.JSONDecodeError as exc:
            raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPException(422, "a JSON body must be an object of parameters")
    elif kind in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.form(max_part_size=limit)
        body = {key: form.getlist(key)[-1] for key in form}
    elif kind == "" and not raw:
        body = {}
    else:
        raise HTTPException(
            415, f"send parameters as JSON or a form, not {kind!r} (or in the query string)"
        )
    values.update({key: (value, "body") for key, value in body.items()})
    return values


def validate(
    check: Callable[[dict[str, Any]], dict[str, Any]], values: dict[str, tuple[Any, str]]
) -> dict[str, Any]:
    """`check(values)` (a stream's `validate`), its errors a 422 naming query or body."""
    try:
        return check({key: value for key, (value, _) in values.items()})
    except pydantic.ValidationError as exc:
        detail = []
        for error in exc.errors(include_url=False, include_context=False, include_input=False):
            field = str(error["loc"][0]) if error["loc"] else ""
            where = values[field][1] if field in values else "query"
            detail.append(
                {"loc": [where, *error["loc"]], "msg": error["msg"], "type": error["type"]}
            )
        raise HTTPException(422, detail) from None


def add_stream_routes(router: APIRouter, tw: Tidewire) -> None:
    runs = tw.runs
    guard = tw.guard
    drain = tw.drain_state

    def get_stream(name: str) -> StreamFunction:
        stream = tw.streams.get(name)
        if stream is None:
            raise HTTPException(404, f"no stream named {name!r}; GET /streams lists them")
        return stream

    async def start_run(
        conn: Request | WebSocket,
        stream: StreamFunction,
        params: dict[str, Any],
        identity: Identity,
        *,
        attached: bool,
    ) -> Run:
        client = client_key(identity, conn)
        try:
            return await runs.start(
                stream, params, attached=attached, sub=identity.sub, client=client
            )
        except TooManyRuns as exc:
            raise HTTPException(503, f"{exc}; try again later", {"retry-after": "1"}) from None

    async def get_run(run_id: str, identity: Identity) -> Run:
        run = await runs.get(run_id)
        # Someone else's run is answered as one that does not exist: run ids
        # are not secrets (they are in URLs and logs), so their existence is.
        if run is None or not guard.owns(identity, run.sub):
            raise HTTPException(404, f"no run {run_id!r} (unknown, or finished and expired)")
        return run

    def cursor(run: Run, after: str, *, new: bool = False) -> LogCursor:
        # A new run's first watcher starts before any event; one that comes
        # later holds every retained event until its first batch is delivered.
        watcher = runs.watch(run, 0 if new else None)
        # Watching a run that another process executes: check now and then
        # that the process is alive, or the watcher could wait forever.
        check = None if run.local else tw.settings.lease / 3
        prefix = run.id + RUN_ID_SEPARATOR
        return LogCursor(
            tw.broker,
            run.log,
            after,
            tw.settings.heartbeat,
            watcher,
            check,
            prefix=prefix,
            budget=tw.settings.subscriber_buffer_bytes,
        )

    def http_stream(
        request: Request, run: Run, cur: LogCursor, notice: Envelope | None = None
    ) -> LogResponse:
        headers = {RUN_HEADER: run.id, **ahead_header(notice)}
        return LogResponse(
            cur, negotiate(request), headers, tw.settings.sse_retry_ms, notice, drain
        )

    def log_position(run: Run, after: str) -> str:
        """The log's own id in a run's event id (`<run id>.<log id>`; the log's id
        alone is taken too): 400 for an id of another run or not an id at all."""
        owner, dot, position = after.partition(RUN_ID_SEPARATOR)
        if dot:
            if owner != run.id:
                raise HTTPException(400, f"event id {after!r} is of another run, not {run.id!r}")
            after = position
        check_position(after)
        return after

    async def finished_at(run: Run, after: str) -> bool:
        """Whether a reader at `after` (the log's id) has had all of a finished run."""
        batch = await tw.broker.read(run.log, after, limit=1, timeout=0)
        return batch.ended and not batch.events and not batch.missed and not batch.restarted

    async def watch_from(request: Request, run: Run, after: str) -> Response:
        """Stream a run from a position (the log's id), or 204 if nothing more will come."""
        if await finished_at(run, after):
            # EventSource stops on 204; on a 200 that ends it would come back
            # every `retry` until the run expires.
            return Response(status_code=204, headers={RUN_HEADER: run.id})
        cur = cursor(run, after)
        try:
            notice = await ahead_notice(cur)
        except BrokerUnavailable:
            cur.close()
            raise
        return http_stream(request, run, cur, notice)

    async def resume(
        request: Request, stream: StreamFunction, last_id: str, identity: Identity
    ) -> Response:
        """A reconnect to /streams/{name}: resume the run the id came from; never start one."""
        run_id, dot, position = last_id.partition(RUN_ID_SEPARATOR)
        if not dot or not re.fullmatch(RUN_ID_PATTERN, run_id):
            raise HTTPException(
                400,
                f"Last-Event-ID {last_id!r} is not the id of a run's event "
                "(send none to start a run)",
            )
        check_position(position)
        run = await runs.get(run_id)
        if run is None or not guard.owns(identity, run.sub):
            # Gone, or another identity's (which is answered as gone): nothing will come.
            return Response(status_code=204)
        if run.stream != stream.name:
            raise HTTPException(
                400, f"Last-Event-ID {last_id!r} is of a run of stream {run.stream!r}"
            )
        return await watch_from(request, run, position)

    @router.get(
        "/streams",
        tags=["streams"],
        summary="The registered streams and their parameters",
        # Never 403: the list shows what the token may start.
        responses=error_responses(401, 429),
    )
    async def list_streams(request: Request) -> list[dict[str, Any]]:
        """With access control on: only the streams this token may start."""
        identity = await guard.identify(request)
        return [
            stream.schema()
            for stream in tw.streams.values()
            if await may_start(identity, stream.name)
        ]

    async def may_start(identity: Identity, name: str) -> bool:
        try:
            await guard.require(identity, "stream", name)
        except HTTPException:
            return False
        return True

    async def start_get(request: Request, name: str) -> Response:
        # `detach` is not a GET parameter: a GET must not start a run that
        # outlives it (a link, a prefetch or an <img> would start runs nobody watches).
        if request.query_params.get("detach", "false").lower() not in ("false", "0", ""):
            raise HTTPException(
                405, "?detach=true starts a run in the background: use POST", {"allow": "POST"}
            )
        return await start(request, name)

    async def start(request: Request, name: str, detach: bool = False) -> Response:
        drain.refuse()  # a run, or a watch of one (a reconnect)
        identity = await guard.check(request, "stream", name)
        stream = get_stream(name)
        last_id = request.headers.get(LAST_EVENT_ID)
        if last_id:
            return await resume(request, stream, last_id, identity)
        params = validate(stream.validate, await read_params(request, tw.settings.max_body_bytes))
        run = await start_run(request, stream, params, identity, attached=not detach)
        if detach:
            body = {
                "run": run.id,
                "events": request.url_for("watch_run", run_id=run.id).path,
                "ws": request.url_for("watch_run_ws", run_id=run.id).path,
            }
            return JSONResponse(body, status_code=202, headers={RUN_HEADER: run.id})
        return http_stream(request, run, cursor(run, "0", new=True))

    reconnect = {
        **resume_parameters(tw.broker, run="must")[1],
        "description": (
            "an event id of a run of this stream (EventSource sends it when it "
            "reconnects): resume that run rather than start one; 204 if it is gone"
        ),
    }
    # GET and POST as two routes, so that each has its own OpenAPI operation.
    for method, endpoint, responses in (
        ("GET", start_get, {k: v for k, v in _START_RESPONSES.items() if k != 202}),
        ("POST", start, _START_RESPONSES),
    ):
        router.add_api_route(
            "/streams/{name}",
            endpoint,
            methods=[method],
            tags=["streams"],
            summary="Start a run and stream its events (NDJSON, or SSE by Accept)",
            response_model=None,
            response_class=Response,
            responses=responses,
            openapi_extra={
                **(_PARAMS_BODY if method == "POST" else {}),
                "parameters": [reconnect],
            },
        )

    @router.websocket("/streams/{name}/ws")
    async def start_ws(websocket: WebSocket, name: str) -> None:
        try:
            drain.refuse()
            identity = await guard.check(websocket, "stream", name)
            stream = get_stream(name)
            params = validate(
                stream.validate, await read_params(websocket, tw.settings.max_body_bytes)
            )
            run = await start_run(websocket, stream, params, identity, attached=True)
        except (HTTPException, BrokerUnavailable) as exc:
            await deny_websocket(websocket, exc)
            return
        cur = cursor(run, "0", new=True)
        await stream_websocket(websocket, cur, {RUN_HEADER: run.id}, drain=drain)

    @router.get(
        "/runs/{run_id}",
        tags=["streams"],
        summary="A run's state",
        # Another identity's run is a 404, as one that does not exist: never 403.
        responses=error_responses(401, 404, 429, 503),
    )
    async def run_info(request: Request, run_id: str) -> dict[str, Any]:
        return (await get_run(run_id, await guard.identify(request))).info()

    async def watch(request: Request) -> Response:
        """Watch a run: history first, then live; resume with Last-Event-ID or ?after=."""
        drain.refuse()
        identity = await guard.identify(request)
        run = await get_run(request.path_params["run_id"], identity)
        after = log_position(run, resume_position(request, "0"))
        # Last-Event-ID wins over ?after=, but a malformed one is still an error.
        log_position(run, request.query_params.get("after") or "0")
        return await watch_from(request, run, after)

    add_stream_route(
        router,
        "/runs/{run_id}/events",
        watch,
        name="watch_run",
        tag="streams",
        broker=tw.broker,
        run="may",
        # 400: a position that is not an id of this broker.
        responses={
            200: {**EVENTS_RESPONSE, "headers": _RUN_HEADER},
            204: {"description": "the run has finished and was read to its end"},
            **error_responses(400, 401, 404, 503),
        },
    )

    @router.websocket("/runs/{run_id}/ws", name="watch_run_ws")
    async def watch_ws(websocket: WebSocket, run_id: str) -> None:
        try:
            drain.refuse()
            run = await get_run(run_id, await guard.identify(websocket))
            after = log_position(run, resume_position(websocket, "0"))
        except (HTTPException, BrokerUnavailable) as exc:
            await deny_websocket(websocket, exc)
            return
        cur = cursor(run, after)
        try:
            notice = await ahead_notice(cur)
        except BrokerUnavailable as exc:
            cur.close()
            await deny_websocket(websocket, exc)
            return
        headers = {RUN_HEADER: run.id, **ahead_header(notice)}
        # At a finished run's end: no 204 here (a handshake is not a watch);
        # the socket closes at once with 1000, as it does after `end`.
        await stream_websocket(websocket, cur, headers, notice=notice, drain=drain)

    @router.delete(
        "/runs/{run_id}",
        tags=["streams"],
        summary="Cancel a run: its generator is closed",
        responses=error_responses(*ACCESS, 404, 409, 503),
    )
    async def cancel(request: Request, run_id: str) -> dict[str, Any]:
        run = await get_run(run_id, await guard.identify(request))
        # Returns once the generator's `finally` has run, here or elsewhere.
        try:
            cancelled = await runs.cancel(run)
        except CancelNotConfirmed as exc:
            raise HTTPException(503, str(exc), {"retry-after": "1"}) from None
        if not cancelled and run.state != "cancelled":
            raise HTTPException(409, f"run {run_id!r} already ended: {run.state}")
        return run.info()

    def check_position(after: str) -> None:
        try:
            tw.broker.check_id(after)
        except BadPosition as exc:
            raise HTTPException(400, str(exc)) from None
