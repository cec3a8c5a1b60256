"""The original service's routes, kept working for its clients, over tidewire's storage.

    GET  /stream          lines of `{"text": "<i>", "img": "<base64 PNG>"}`, as the original sent
    POST /stream          the same; parameters from the query, a JSON or a form body (the
                          original client's `stream()` helper POSTs)
    POST /uploadfile/     multipart `file` -> 200 {"filename", ...metadata}
    POST /downloadfile/   the file named by `filename` (query, form or JSON), by name or id

The original wrote uploads to `uploads/<the client's file name>` and sent back
whatever path `/downloadfile/` was given. Here files go through the storage as
everywhere (files.py receives them, downloads.py sends them): names are labels.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qs

import orjson
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from ..storage import FileInfo, FileNotFound, valid_id
from .bodies import read_limited
from .downloads import send_file
from .drain import Drain
from .errors import ACCESS, error_responses, show
from .files import (
    BINARY,
    FILE_CONTENT,
    STORING,
    FileMetadata,
    files_form,
    looked_up,
    multipart_boundary,
    own_only,
    owner_of_new,
    readable,
    receive_files,
    request_body,
)
from .guard import Guard
from .multipart import BadMultipart, MultipartStream, decode
from .names import NAME_SCHEMA
from .streams import read_params, validate

if TYPE_CHECKING:
    from ..app import Tidewire

__all__ = [
    "OriginalStreamParams",
    "OriginalUpload",
    "add_compat_routes",
    "add_original_file_routes",
    "add_original_stream_routes",
]

# -- /stream -----------------------------------------------------------------

Count = Annotated[int, Field(ge=0, le=10_000_000, description="how many events")]
Pause = Annotated[
    float, Field(ge=0, le=60, allow_inf_nan=False, description="seconds before each event")
]


class OriginalStreamParams(BaseModel):
    """`/stream`'s parameters; others are ignored, as the original ignored them."""

    n: Count = 10_000
    interval: Pause = 0.05


def _stream_params_body() -> dict[str, Any]:
    schema = OriginalStreamParams.model_json_schema()
    content = {"application/json": {"schema": schema}}
    content["application/x-www-form-urlencoded"] = {"schema": schema}
    query = [
        {"name": name, "in": "query", "required": False, "schema": field}
        for name, field in schema["properties"].items()
    ]
    return {"parameters": query, **request_body(content, required=False)}


#: The stream whose permission `/stream` needs: it is the demo's counter.
ORIGINAL_STREAM = "demo"


def add_original_stream_routes(
    router: APIRouter,
    frames: Sequence[bytes],
    guard: Guard | None = None,
    max_body: int = 1 << 20,
    drain: Drain | None = None,
) -> None:
    """`GET` and `POST /stream`: the original's counter, one line per event, cycling `frames`.

    With a `guard`, it needs what starting the stream `demo` needs (it is the
    same counter, in the original's format). A parameters body over
    `max_body` bytes is refused (413). With a `drain`, a stream starting
    while it drains gets 503, and a stream going on ends at its next line:
    the original's format has no notice to send, and a stream of hours must
    not hold the shutdown up to `drain_timeout`.
    """
    images = [base64.b64encode(frame).decode() for frame in frames]

    def respond(n: int, interval: float) -> StreamingResponse:
        if drain is not None:
            drain.refuse()

        async def lines() -> AsyncIterator[str]:
            for i in range(n):
                if interval:
                    await _pause(interval, drain)
                if drain is not None and drain.draining:
                    return
                line = {"text": str(i), "img": images[i % len(images)]}
                yield json.dumps(line, ensure_ascii=False) + "\n"

        return StreamingResponse(lines(), media_type="text/plain")

    @router.get(
        "/stream",
        tags=["compatibility"],
        summary="The original service's stream",
        responses=error_responses(*ACCESS),
    )
    async def original_stream(
        request: Request, n: Count = 10_000, interval: Pause = 0.05
    ) -> StreamingResponse:
        """Lines of `{"text": "<i>", "img": "<base64 PNG>"}`, exactly as the original sent them."""
        if guard is not None:
            await guard.check(request, "stream", ORIGINAL_STREAM)
        return respond(n, interval)

    def check(values: dict[str, Any]) -> dict[str, Any]:
        return OriginalStreamParams.model_validate(values).model_dump()

    @router.post(
        "/stream",
        tags=["compatibility"],
        summary="The original service's stream, for its client's POST",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/plain": {}}},
            **error_responses(*ACCESS, 400, 413, 415, 422),
        },
        openapi_extra=_stream_params_body(),
    )
    async def original_stream_post(request: Request) -> StreamingResponse:
        """As `GET /stream`; `n` and `interval` may come in a JSON or form body too."""
        if guard is not None:
            await guard.check(request, "stream", ORIGINAL_STREAM)
        params = validate(check, await read_params(request, max_body))
        return respond(params["n"], params["interval"])


# -- /uploadfile/, /downloadfile/ ---------------------------------------------


class OriginalUpload(FileMetadata):
    filename: str


_FILENAME = {
    "schema": {
        "type": "object",
        "properties": {"filename": NAME_SCHEMA},
        "required": ["filename"],
    }
}
_ONE_FILE_BODY = files_form(BINARY)
# Or `?filename=`, for the original's clients: the summary says so.
_FILENAME_BODY = request_body(
    {"application/json": _FILENAME, "application/x-www-form-urlencoded": _FILENAME}
)


async def _form_field(request: Request, field: str, limit: int) -> str | None:
    """A plain field of a small form body (urlencoded or multipart), read with a bound."""
    body = await read_limited(request, limit, _NAME_BODY)
    kind, _ = parse_options_header(request.headers.get("content-type"))
    if kind == b"application/x-www-form-urlencoded":
        values = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return values[field][-1] if field in values else None

    async def once() -> AsyncIterator[bytes]:
        yield body

    boundary = multipart_boundary(request, "a form")
    value: str | None = None
    try:
        reader = MultipartStream(once(), boundary)
        while (part := await reader.next_part()) is not None:
            if part.field == field and part.filename is None:
                value = decode(b"".join([chunk async for chunk in reader.body()]))
    except BadMultipart as exc:
        raise HTTPException(400, f"malformed multipart body: {exc}") from None
    return value


#: What `/downloadfile/`'s body is for, in its 413.
_NAME_BODY = "the body (just the filename)"


async def _requested_name(request: Request, limit: int) -> str:
    """`filename` from the query string, else a JSON or form body."""
    name = request.query_params.get("filename")
    if name is not None:
        return name
    kind, _ = parse_options_header(request.headers.get("content-type"))
    value: Any = None
    if kind == b"application/json" or kind.endswith(b"+json"):
        try:
            body = orjson.loads(await read_limited(request, limit, _NAME_BODY) or b"{}")
        except orjson.JSONDecodeError as exc:
            raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPException(422, 'send a JSON object: {"filename": "..."}')
        value = body.get("filename")
    elif kind in (b"application/x-www-form-urlencoded", b"multipart/form-data"):
        value = await _form_field(request, "filename", limit)
    if value is None:
        raise HTTPException(
            422, 'name the file: ?filename=NAME, a form field, or JSON {"filename": NAME}'
        )
    if not isinstance(value, str):
        raise HTTPException(422, "filename must be a string")
    return value


def add_original_file_routes(router: APIRouter, tw: Tidewire) -> None:
    """The original service's `/uploadfile/` and `/downloadfile/`, on top of the storage.

    The original wrote uploads to `uploads/<the client's file name>` and sent
    back whatever path `/downloadfile/` was given. Here names are labels, as
    everywhere: `/downloadfile/` looks a file up by its id or its name.
    """

    async def upload(request: Request) -> Response:
        tw.drain_state.refuse()
        identity = await tw.guard.check(request, "files:write", "")
        try:
            [info] = await receive_files(request, tw, most=1, owner=owner_of_new(tw, identity))
        except ClientDisconnect:
            return Response(status_code=400)
        # 200, as the original answered (its clients check for it).
        return JSONResponse({"filename": info.name, **info.json()})

    async def download(request: Request) -> Response:
        identity = await tw.guard.check(request, "files:read", "")
        name = looked_up(await _requested_name(request, tw.settings.max_body_bytes), "filename")
        info: FileInfo | None = None
        if valid_id(name):
            with suppress(FileNotFound):
                info = await readable(tw, identity, await tw.storage.info(name))
        if info is None:
            try:
                # read:own finds the newest file of that name among its own.
                info = await tw.storage.find(name, owner=own_only(identity))
            except FileNotFound:
                raise HTTPException(
                    404,
                    f"no file named {show(name)}; "
                    "POST /uploadfile/ stores one, GET /files lists them",
                ) from None
        return await send_file(request, tw, info, attachment=True)

    Endpoint = Callable[[Request], Awaitable[Response]]
    routes: list[tuple[str, Endpoint, str, dict[int | str, dict[str, Any]], dict[str, Any]]] = [
        (
            "/uploadfile",
            upload,
            "The original service's upload (multipart `file`)",
            {200: {"model": OriginalUpload}, **error_responses(*ACCESS, 415, *STORING)},
            _ONE_FILE_BODY,
        ),
        (
            "/downloadfile",
            download,
            "The original service's download, by file name or id (or `?filename=`)",
            {**FILE_CONTENT, **error_responses(*ACCESS, 400, 413, 415)},
            _FILENAME_BODY,
        ),
    ]
    for path, endpoint, summary, responses, body in routes:
        # With and without the slash: the original client posts to /downloadfile,
        # and a redirect would cost a round trip (and, for some clients, the body).
        for slashed in (True, False):
            router.add_api_route(
                path + "/" if slashed else path,
                endpoint,
                methods=["POST"],
                tags=["compatibility"],
                summary=summary,
                response_model=None,
                # `responses` says which types: the file's own, or JSON.
                response_class=Response,
                responses=responses,
                openapi_extra=body,
                include_in_schema=slashed,
            )


async def _pause(seconds: float, drain: Drain | None) -> None:
    """Sleep `seconds` (up to a minute), or less once `drain` has begun."""
    if drain is None:
        await asyncio.sleep(seconds)
        return
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    # Polled: a drain happens once in a process's life, and a quarter of a
    # second late is well within any drain_timeout.
    while not drain.draining and (left := until - loop.time()) > 0:
        await asyncio.sleep(min(left, 0.25))


def add_compat_routes(router: APIRouter, tw: Tidewire, frames: Sequence[bytes]) -> None:
    """All of the original service's routes; `/stream` cycles `frames` as its images."""
    add_original_stream_routes(router, frames, tw.guard, tw.settings.max_body_bytes, tw.drain_state)
    add_original_file_routes(router, tw)
