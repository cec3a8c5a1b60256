"""Route plumbing shared by the streams and channels routes.

What a route that serves a log needs besides the log itself: which format a
client asked for (`negotiate`) and where it resumes (`resume_position`); a
lean ASGI endpoint for long-lived responses (`LeanEndpoint`,
`add_stream_route`) and how that route is documented (`EVENTS_RESPONSE`,
`resume_parameters`); and the JSON refusals (`broker_unavailable`,
`deny_websocket`). Writing the log's events is transport.py's.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
from fastapi import APIRouter, HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from ..broker import BadPosition, Broker, BrokerUnavailable
from ..wire import LAST_EVENT_ID, NDJSON, RUN_ID_SEPARATOR, SSE
from .handoff import hand_off
from .transport import Format, LogResponse

logger = logging.getLogger("tidewire")

__all__ = [
    "EVENTS_RESPONSE",
    "RUN_ID_PATTERN",
    "LeanEndpoint",
    "add_stream_route",
    "broker_unavailable",
    "deny_websocket",
    "negotiate",
    "resume_parameters",
    "resume_position",
]


def negotiate(request: Request) -> Format:
    """SSE for clients that accept `text/event-stream`, NDJSON for everyone else."""
    return "sse" if SSE in request.headers.get("accept", "") else "ndjson"


def resume_position(request: Request | WebSocket, default: str) -> str:
    """Where a reader resumes: `Last-Event-ID` (what EventSource sends back) wins over `?after=`."""
    return request.headers.get(LAST_EVENT_ID) or request.query_params.get("after") or default


class LeanEndpoint:
    """An ASGI endpoint for a route whose response lives as long as its connection.

    A FastAPI path operation keeps its dependency machinery and exit stacks,
    and a Starlette one its exception wrappers, alive until the response
    ends: for an idle subscription that is over a third of what it costs
    (bench W4). Here the handler returns a response or raises HTTPException,
    and nothing else stays on the stack. A log's response is handed off
    (handoff.py): the app's top runs it, once every layer between has
    returned. (A class, not a function: Starlette routes to an object as to
    an ASGI app, without wrapping it.)
    """

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self.handler(Request(scope, receive))
        except HTTPException as exc:
            response = JSONResponse({"detail": exc.detail}, exc.status_code, exc.headers)
        except BrokerUnavailable as exc:
            response = broker_unavailable(exc)
        if isinstance(response, LogResponse) and hand_off(response, receive, send):
            return
        await response(scope, receive, send)


def broker_unavailable(exc: BrokerUnavailable) -> JSONResponse:
    """503 for a request that needs the broker while it is down.

    The body says nothing of why: the exception names the broker's host
    (and its URL may carry a password), which is the operator's business,
    so that goes to the log (masked, server/logs.py).
    """
    logger.warning("broker unavailable: %s", exc)
    return JSONResponse(
        {"detail": "the broker is unreachable; try again shortly"}, 503, {"retry-after": "2"}
    )


#: OpenAPI: a 200 that streams a log, NDJSON or (by `Accept`) SSE.
EVENTS_RESPONSE: dict[str, Any] = {
    "description": (
        "The events until the log ends: NDJSON, one `{id, event, data}` per line; "
        "or, for `Accept: text/event-stream`, SSE"
    ),
    # No schema: OpenAPI 3.1 cannot describe a sequence of JSON documents.
    "content": {NDJSON: {}, SSE: {}},
}


#: A run's id, as the start of its events' ids (`<run id>.<log id>`).
RUN_ID_PATTERN = "[0-9a-f]{16}"

RunPrefix = Literal["", "may", "must"]


def position_pattern(broker: Broker, *, run: RunPrefix = "") -> str:
    """The event ids `broker` takes as a position, as a pattern for the spec.

    Redis Streams ids (`1700000000000-42`, or `0`); memory's look the same
    (`<epoch>-<seq>`) but it also takes a bare number (an id of a tidewire
    from before epochs). Asked of the broker itself, so the spec says what
    `check_id` will accept. A run's event ids start with the run's id and a
    dot: a run's own routes take them with or without (`may`),
    /streams/{name} only with (`must`).
    """

    def takes(id: str) -> bool:
        try:
            broker.check_id(id)
        except BadPosition:
            return False
        return True

    bare, pair = takes("1"), takes("1-0")
    if bare and pair:
        ids = "[0-9]{1,19}(-[0-9]{1,19})?"
    elif pair:
        ids = "0|[0-9]{1,19}-[0-9]{1,19}"
    else:
        ids = "[0-9]{1,19}"
    if run:
        separator = re.escape(RUN_ID_SEPARATOR)
        ids = f"({RUN_ID_PATTERN}{separator}){'?' if run == 'may' else ''}({ids})"
    # Empty: as if not given.
    return f"^({ids})?$"


def resume_parameters(broker: Broker, *, run: RunPrefix = "") -> list[dict[str, Any]]:
    """OpenAPI parameters of every route that reads a log: where to resume."""
    schema = {"type": "string", "pattern": position_pattern(broker, run=run)}
    return [
        {
            "name": "after",
            "in": "query",
            "required": False,
            "schema": schema,
            "description": "resume after this event id (`0`: from the start)",
        },
        {
            "name": LAST_EVENT_ID,
            "in": "header",
            "required": False,
            "schema": schema,
            "description": "as `after`, and wins over it (EventSource sends it when it reconnects)",
        },
    ]


def add_stream_route(
    router: APIRouter,
    path: str,
    handler: Callable[[Request], Awaitable[Response]],
    *,
    name: str,
    tag: str,
    responses: dict[int | str, dict[str, Any]],
    broker: Broker,
    path_schemas: dict[str, dict[str, Any]] | None = None,
    run: RunPrefix = "",
) -> None:
    """Serve a long-lived GET stream through a `LeanEndpoint`, and document it.

    The same handler is also added as a FastAPI operation, after the lean
    route: that one always matches first, so the operation only gives the
    route its place on the OpenAPI page.
    """
    router.routes.append(Route(path, LeanEndpoint(handler), methods=["GET"], name=name))
    path_params = [
        {
            "name": param,
            "in": "path",
            "required": True,
            "schema": (path_schemas or {}).get(param, {"type": "string"}),
        }
        for param in re.findall(r"{(\w+)}", path)
    ]
    router.add_api_route(
        path,
        handler,
        methods=["GET"],
        name=f"{name}_openapi",
        tags=[tag],
        summary=(inspect.getdoc(handler) or "").split("\n")[0],
        response_class=Response,
        responses={200: EVENTS_RESPONSE, **responses},
        openapi_extra={"parameters": [*path_params, *resume_parameters(broker, run=run)]},
    )


async def deny_websocket(websocket: WebSocket, exc: HTTPException | BrokerUnavailable) -> None:
    """Refuse a WebSocket handshake with the same JSON error an HTTP request gets.

    Servers that cannot send an HTTP response here (the ASGI extension is
    optional) get a close code of 4000 + status instead.
    """
    if isinstance(exc, BrokerUnavailable):
        response = broker_unavailable(exc)
    else:
        response = JSONResponse({"detail": exc.detail}, exc.status_code, exc.headers)
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:
        reason = orjson.loads(response.body)["detail"]
        await websocket.close(4000 + response.status_code, str(reason)[:120])
