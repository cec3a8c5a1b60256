"""Routes for channels: publish over HTTP or WebSocket, subscribe on any transport."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import APIRouter, HTTPException, Path, Query, Request, WebSocket
from starlette.datastructures import UploadFile

from ..broker import BrokerUnavailable, TooManyLogs
from ..channels import CHANNEL_NAME
from ..events import RESERVED, Blob, ForgedBlob, TooDeep, check_no_file_refs, load_json
from ..quotas import client_key
from ..wire import AFTER_HEADER
from .bodies import read_limited
from .errors import ACCESS, error_responses
from .routing import (
    EVENTS_RESPONSE,
    add_stream_route,
    deny_websocket,
    negotiate,
    resume_position,
)
from .transport import LogCursor, LogResponse, ahead_header, ahead_notice, stream_websocket

if TYPE_CHECKING:
    from ..app import Tidewire

__all__ = ["add_channel_routes"]

# OpenAPI: read_message reads the body itself, so FastAPI cannot see it.
_FORM = {"schema": {"type": "object", "description": "fields become data, files blobs"}}
_PUBLISH_BODY = {
    "requestBody": {
        "required": True,  # an empty body is not JSON: 400
        "content": {
            "application/json": {"schema": {"description": "any JSON: the event's data"}},
            "text/plain": {"schema": {"type": "string"}},
            "application/x-www-form-urlencoded": _FORM,
            "multipart/form-data": _FORM,
        },
    }
}
_NAME = {"type": "string", "pattern": CHANNEL_NAME.pattern}
_AFTER_HEADER = {
    AFTER_HEADER: {
        "description": "where the subscription began: resume from it to miss nothing",
        "schema": {"type": "string"},
    }
}


async def read_message(request: Request, limit: int) -> Any:
    """A published event's data: a JSON body, form fields and files, or plain text.

    The body is read whole, up to `limit` bytes (413 past it), whatever its
    type: a multipart file is as much a part of the event as a JSON value
    (form parsing alone would take files of any size).
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_limited(request, limit, "a published event")
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_part_size=limit)
        data: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                kind = value.content_type or "application/octet-stream"
                data[key] = Blob(await value.read(), kind)
            else:
                data[key] = value
        return data
    if kind == "text/plain":
        return body.decode("utf-8", "replace")
    if kind in ("", "application/json") or kind.endswith("+json"):
        try:
            data = load_json(body)
            check_no_file_refs(data)
            return data
        except (TooDeep, ForgedBlob) as exc:
            raise HTTPException(422, str(exc)) from None
        except orjson.JSONDecodeError as exc:
            raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
    raise HTTPException(415, f"publish JSON, text/plain or a form, not {kind!r}")


def add_channel_routes(router: APIRouter, tw: Tidewire) -> None:
    channels = tw.channels
    guard = tw.guard
    drain = tw.drain_state
    # The server refuses larger WebSocket frames itself when `tidewire serve`
    # runs it (ws_max_size, close 1009 before the frame is buffered); this is
    # the second line, for servers configured otherwise.
    max_event = tw.settings.max_event_bytes
    frame_too_large = f"frames may be at most {max_event} bytes"

    def log_of(name: str) -> str:
        try:
            return channels.log(name)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    def check_after(request: Request) -> None:
        # Last-Event-ID wins over ?after=, but a malformed one is still an error.
        after = request.query_params.get("after")
        if after:
            try:
                tw.broker.check_id(after)
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None

    async def start_position(log: str, after: str | None) -> str:
        if after is None:
            return await tw.broker.last_id(log)  # live from now
        try:
            tw.broker.check_id(after)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return after

    @router.post(
        "/channels/{name}/events",
        tags=["channels"],
        status_code=201,
        summary="Publish an event",
        # 422: a bad channel name, or a reserved event type.
        responses=error_responses(*ACCESS, 400, 413, 415, 422, 503),
        openapi_extra=_PUBLISH_BODY,
    )
    async def publish(
        request: Request,
        name: Annotated[str, Path(json_schema_extra={"pattern": CHANNEL_NAME.pattern})],
        event: Annotated[
            str,
            Query(
                description="the event's type",
                # events.py's rule, told in the spec; a bad type is a 422 from there.
                json_schema_extra={
                    "pattern": "^[^\\r\\n]{1,200}$",
                    "not": {"enum": sorted(RESERVED)},
                },
            ),
        ] = "message",
    ) -> dict[str, str]:
        identity = await guard.check(request, "publish", name)
        log_of(name)
        await tw.quotas.publish(client_key(identity, request))
        data = await read_message(request, tw.settings.max_event_bytes)
        try:
            return {"id": await channels.publish(name, data, event)}
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except TooManyLogs as exc:  # a new channel past max_channels
            retry = {"Retry-After": str(int(exc.retry_after))}
            raise HTTPException(429, str(exc), headers=retry) from None

    async def subscribe(request: Request) -> LogResponse:
        """Subscribe: live from now, or from Last-Event-ID / ?after= (0: all retained)."""
        drain.refuse()
        await guard.check(request, "subscribe", request.path_params["name"])
        log = log_of(request.path_params["name"])
        check_after(request)
        after = await start_position(log, resume_position(request, "") or None)
        cursor = LogCursor(
            tw.broker,
            log,
            after,
            tw.settings.heartbeat,
            budget=tw.settings.subscriber_buffer_bytes,
            skip_ahead=True,
        )
        notice = await ahead_notice(cursor)
        # Where "live from now" began, so that a client whose connection drops
        # before any event can resume from there and miss nothing. (SSE
        # clients, which cannot read headers, get it as the first block's id.)
        headers = {AFTER_HEADER: cursor.after, **ahead_header(notice)}
        return LogResponse(
            cursor, negotiate(request), headers, tw.settings.sse_retry_ms, notice, drain
        )

    add_stream_route(
        router,
        "/channels/{name}/events",
        subscribe,
        name="subscribe",
        tag="channels",
        broker=tw.broker,
        path_schemas={"name": _NAME},
        responses={
            200: {**EVENTS_RESPONSE, "headers": _AFTER_HEADER},
            **error_responses(*ACCESS, 400, 422, 503),
        },
    )

    @router.websocket("/channels/{name}/ws")
    async def subscribe_ws(websocket: WebSocket, name: str) -> None:
        try:
            drain.refuse()
            identity = await guard.check(websocket, "subscribe", name)
            log = log_of(name)
            after = await start_position(log, resume_position(websocket, "") or None)
        except (HTTPException, BrokerUnavailable) as exc:
            await deny_websocket(websocket, exc)
            return
        # Asked at the first frame, then known for the connection's life (as
        # its token is verified once): subscribers who never send pay nothing.
        publish_refused: list[str | None] = []

        async def may_publish() -> bool:
            if not publish_refused:
                try:
                    await guard.require(identity, "publish", name)
                    publish_refused.append(None)
                except HTTPException as exc:
                    publish_refused.append(str(exc.detail))
            refused = publish_refused[0]
            if refused is not None:
                # 1008: policy violation (RFC 6455, 7.4.1); a close reason is
                # at most 123 bytes.
                await websocket.close(1008, refused.encode()[:123].decode(errors="ignore"))
                return False
            return await tw.quotas.publish_frame(websocket, identity)

        async def on_text(text: str) -> None:
            if not await may_publish():
                return
            # The limit is in bytes, as sent: a character may be up to four of
            # them, so only a text that could be over it is encoded to count.
            if len(text) > max_event // 4 and len(text.encode()) > max_event:
                await websocket.close(1009, frame_too_large)
                return
            try:
                data = load_json(text)
            except TooDeep as exc:
                # 1007: the frame's data cannot be taken (RFC 6455, 7.4.1).
                await websocket.close(1007, str(exc))
                return
            except orjson.JSONDecodeError:
                data = text  # a frame that is not JSON is published as a string
            try:
                check_no_file_refs(data)
            except ForgedBlob as exc:
                await websocket.close(1008, str(exc)[:123])
                return
            await publish_frame(data)

        async def publish_frame(data: Any) -> None:
            try:
                await channels.publish(name, data)
            except TooManyLogs as exc:
                # 1013 "try again later" (RFC 6455, 7.4.1): a new channel past max_channels.
                await websocket.close(1013, str(exc)[:123])

        async def on_bytes(raw: bytes) -> None:
            if not await may_publish():
                return
            if len(raw) > max_event:
                await websocket.close(1009, frame_too_large)
                return
            await publish_frame(Blob(raw))

        cursor = LogCursor(
            tw.broker,
            log,
            after,
            tw.settings.heartbeat,
            budget=tw.settings.subscriber_buffer_bytes,
            skip_ahead=True,
        )
        try:
            notice = await ahead_notice(cursor)
        except BrokerUnavailable as exc:
            await deny_websocket(websocket, exc)
            return
        headers = {AFTER_HEADER: cursor.after, **ahead_header(notice)}
        await stream_websocket(websocket, cursor, headers, on_text, on_bytes, notice, drain)
