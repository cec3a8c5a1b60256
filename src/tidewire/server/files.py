"""Routes for files: upload (multipart or a raw body), list, download, delete.

    POST   /files              multipart, one or more `file` parts -> 201 [metadata]
    PUT    /files/<name>       the raw body is the file (curl -T)  -> 201 metadata
    GET    /files              metadata, newest first, paged by a cursor
    GET    /files?name=<name>  [the newest file of that name], or []
    GET    /files/<id>         the bytes (HEAD too): see downloads.py
    GET    /files/<id>/meta    metadata
    DELETE /files/<id>

and the original service's `POST /uploadfile/` and `POST /downloadfile/`.

Uploads stream: each file part of a multipart body goes, as it arrives,
straight into `Storage.save` (multipart.py says why we parse it ourselves),
so a file is written once and memory stays flat whatever its size. The parts
around the routes each have a module: names.py (what a file may be called),
headers.py (ranges, validators, types), downloads.py (sending a file),
errors.py (what a storage error tells the client).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qs, urlencode

import anyio
import orjson
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from python_multipart.multipart import parse_options_header
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.requests import ClientDisconnect

from ..storage import FileInfo, FileNotFound, Storage, TooLarge, valid_id
from .downloads import send_file
from .errors import error_responses, show, storage_error, storage_errors
from .headers import content_length, upload_type
from .multipart import BadMultipart, MultipartStream, decode
from .names import MAX_NAME, NAME_SCHEMA, clean_name

if TYPE_CHECKING:
    from ..app import Tidewire

__all__ = ["MAX_FILES", "FileMetadata", "add_file_routes", "add_original_file_routes"]

#: Most files one multipart request may carry.
MAX_FILES = 100
#: Largest JSON or form body `/downloadfile/` reads to find a file name.
MAX_SMALL_BODY = 64 << 10

# -- receiving -------------------------------------------------------------


def _file_id(file_id: str) -> str:
    """`file_id`, if it has the shape of an id: any other string never reaches the storage."""
    if not valid_id(file_id):
        raise storage_error(FileNotFound(file_id))
    return file_id


def _refuse_declared(request: Request, limit: int | None) -> None:
    """413 before reading a body whose declared length is over the limit."""
    declared = content_length(request.headers)
    if limit is not None and declared is not None and declared > limit:
        raise storage_error(TooLarge(f"more than {limit} bytes", limit))


def _boundary(request: Request, hint: str) -> bytes:
    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data":
        raise HTTPException(415, f"send multipart/form-data: {hint}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "the multipart/form-data Content-Type has no boundary")
    return boundary


def _looked_up(name: str, where: str) -> str:
    """A name to look a file up by, checked by the rule uploads follow.

    Any string would be safe to compare, but one that no upload may store
    (a bidi control, a control character) is refused as it would be there,
    naming what to fix, rather than answered with "no such file".
    """
    try:
        return clean_name(name)
    except ValueError as exc:
        raise HTTPException(422, f"{exc}: {where} names the file") from None


async def _discard(storage: Storage, files: list[FileInfo]) -> None:
    # Shielded: a cancelled request must still take back what it stored.
    with anyio.CancelScope(shield=True):
        for info in files:
            with suppress(FileNotFound):
                await storage.delete(info.id)


async def receive_files(request: Request, tw: Tidewire, *, most: int = MAX_FILES) -> list[FileInfo]:
    """Store each `file` part of a multipart request, streaming; all of them or none.

    The size limit applies to each file, as it streams: the length of a
    multipart body does not say how large its files are.
    """
    hint = "one or more file fields named 'file', e.g. curl -F file=@photo.jpg URL"
    boundary = _boundary(request, hint)
    storage = tw.storage
    saved: list[FileInfo] = []
    try:
        reader = MultipartStream(request.stream(), boundary)
        while (part := await reader.next_part()) is not None:
            if part.field != "file" or not part.filename:
                continue  # another field, or a file input left empty
            if len(saved) == most:
                raise HTTPException(413, f"at most {most} file(s) per request")
            try:
                name = clean_name(part.filename)
            except ValueError as exc:
                raise HTTPException(422, f"{exc}: {show(part.filename)}") from None
            with storage_errors():
                info = await storage.save(
                    reader.body(),
                    name=name,
                    type=upload_type(part.type, name),
                    limit=tw.settings.max_file_size,
                )
            saved.append(info)
    except BaseException as exc:
        await _discard(storage, saved)
        if isinstance(exc, BadMultipart):
            raise HTTPException(400, f"malformed multipart body: {exc}") from None
        raise
    if not saved:
        raise HTTPException(422, f"no file in the request: send {hint}")
    return saved


# -- OpenAPI ---------------------------------------------------------------


class FileMetadata(BaseModel):
    """A stored file, as the file routes describe it."""

    id: str
    name: str
    size: int
    type: str
    sha256: str
    created: float
    url: str


class OriginalUpload(FileMetadata):
    filename: str


def _request_body(content: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    """`openapi_extra` for a body the route reads itself (FastAPI cannot see it)."""
    return {"requestBody": {"required": required, "content": content}}


def _files_form(file: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "properties": {"file": file}, "required": ["file"]}
    return _request_body({"multipart/form-data": {"schema": schema}})


_BINARY = {"type": "string", "format": "binary"}
_FILENAME = {
    "schema": {
        "type": "object",
        "properties": {"filename": NAME_SCHEMA},
        "required": ["filename"],
    }
}
_MULTIPART_BODY = _files_form({"type": "array", "items": _BINARY, "minItems": 1})
_ONE_FILE_BODY = _files_form(_BINARY)
# An empty body is an empty file.
_RAW_BODY = _request_body({"application/octet-stream": {"schema": _BINARY}}, required=False)
# Or `?filename=`, for the original's clients: the summary says so.
_FILENAME_BODY = _request_body(
    {"application/json": _FILENAME, "application/x-www-form-urlencoded": _FILENAME}
)
# A download is in the file's own type, whatever that is; so is one range.
_ANY = {"*/*": {"schema": _BINARY}}
_CONTENT: dict[int | str, dict[str, Any]] = {
    200: {"description": "The file, in its own type", "content": _ANY},
    206: {
        "description": "The requested range; several as multipart/byteranges",
        "content": {**_ANY, "multipart/byteranges": {"schema": _BINARY}},
    },
    304: {"description": "Not modified (If-None-Match / If-Modified-Since)"},
    **error_responses(404, 416, 422),
}
#: Where the storage may refuse an upload (errors.py's table).
_STORING = (400, 413, 422, 507)
_NAME = {
    "name": "file_id",
    "in": "path",
    "required": True,
    "description": (
        "the new file's name: only a label, the server makes its id. "
        "`<id>/meta` is a file's metadata, not a name (405)."
    ),
    "schema": NAME_SCHEMA,
}


class UploadName(PathConvertor):
    """The name in `PUT /files/<name>`: any path but a file's metadata, `<id>/meta`.

    A name may hold slashes (`../../etc/passwd` is a fine label), so the PUT
    route takes a whole path; without this, `PUT /files/<id>/meta` stored a
    file named `<id>/meta` rather than answer 405 as for any resource that
    only has GET. In the router's regex, so that Allow says the same.
    """

    regex = r"(?![^/]+/meta$).*"


register_url_convertor("upload_name", UploadName())


# -- /files ----------------------------------------------------------------


def add_file_routes(router: APIRouter, tw: Tidewire) -> None:
    """`/files`: upload, list, download, metadata, delete.

    Listing: `GET /files` answers a JSON list of metadata, newest first, as
    the contract says; when there are more, the next page's cursor is in the
    `Tidewire-Next-Cursor` header and in `Link: </files?...>; rel="next"`.

    Behind nginx, with `Settings(accel_redirect="/_tidewire_files/")`, a GET
    of a local file answers with our headers and `X-Accel-Redirect:
    /_tidewire_files/<id>`, and nginx sends the bytes from an internal
    location aliased to the storage's `files/` folder. nginx keeps only some
    of our headers (Content-Type, Content-Disposition...), so the location
    puts back the others::

        location /_tidewire_files/ {
            internal;
            alias /srv/tidewire/data/files/;
            etag off;
            add_header ETag $upstream_http_etag;
            add_header X-Content-Type-Options nosniff always;
            add_header Content-Security-Policy $upstream_http_content_security_policy;
        }
    """

    async def get_info(file_id: str) -> FileInfo:
        with storage_errors():
            return await tw.storage.info(_file_id(file_id))

    @router.post(
        "/files",
        tags=["files"],
        status_code=201,
        summary="Upload files (multipart, one or more `file` fields)",
        response_model=None,
        responses={201: {"model": list[FileMetadata]}, **error_responses(415, *_STORING)},
        openapi_extra=_MULTIPART_BODY,
    )
    async def upload_files(request: Request) -> Response:
        try:
            saved = await receive_files(request, tw)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is there to read it
        return JSONResponse([info.json() for info in saved], status_code=201)

    # The same path as GET /files/{file_id}, as a URL cannot tell a name from
    # an id: the parameter is declared here, where it can say it is a name.
    @router.put(
        "/files/{file_id:upload_name}",
        tags=["files"],
        status_code=201,
        summary="Upload a file as the raw body (curl -T FILE URL)",
        response_model=None,
        responses={
            201: {
                "model": FileMetadata,
                "headers": {"Location": {"schema": {"type": "string"}}},
            },
            **error_responses(*_STORING),
        },
        openapi_extra={**_RAW_BODY, "parameters": [_NAME]},
    )
    async def put_file(request: Request) -> Response:
        """The name in the URL is only the file's label; the server makes its id."""
        filename = request.path_params["file_id"]
        try:
            name = clean_name(filename)
        except ValueError as exc:
            raise HTTPException(422, f"{exc}: PUT /files/<name> names the file") from None
        _refuse_declared(request, tw.settings.max_file_size)
        kind = upload_type(request.headers.get("content-type"), name)
        try:
            with storage_errors():
                info = await tw.storage.save(
                    request.stream(), name=name, type=kind, limit=tw.settings.max_file_size
                )
        except ClientDisconnect:
            return Response(status_code=400)
        return JSONResponse(info.json(), status_code=201, headers={"location": info.url})

    @router.get(
        "/files",
        tags=["files"],
        summary="List files, newest first",
        response_model=None,
        responses={200: {"model": list[FileMetadata]}, **error_responses(400, 422)},
    )
    async def list_files(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000, description="files per page")] = 50,
        cursor: Annotated[
            str | None,
            Query(
                max_length=200,
                description="Tidewire-Next-Cursor of a page; not with `name`",
                # What storages make (a file id); any other string is a 400.
                json_schema_extra={"pattern": "^[0-9a-v]{22}$"},
            ),
        ] = None,
        name: Annotated[
            str | None,
            Query(
                min_length=1,
                max_length=MAX_NAME,
                description="only the newest file of exactly this name: a list of one, or none",
                # The name rule itself (names.py), so the spec and the check agree.
                json_schema_extra=NAME_SCHEMA,
            ),
        ] = None,
    ) -> Response:
        if name is not None:
            return await newest_named(name, cursor)
        try:
            with storage_errors():
                page = await tw.storage.list(limit=limit, cursor=cursor)
        except ValueError:
            raise HTTPException(
                400, "bad cursor: pass the Tidewire-Next-Cursor of a page"
            ) from None
        headers = {}
        if page.next is not None:
            query = urlencode({"limit": limit, "cursor": page.next})
            headers["tidewire-next-cursor"] = page.next
            headers["link"] = f'<{request.url.path}?{query}>; rel="next"'
        return JSONResponse([info.json() for info in page.files], headers=headers)

    async def newest_named(name: str, cursor: str | None) -> Response:
        # Storage keeps an index by name that answers "the newest" without a
        # scan (`Storage.find`), not a listing by name; the newest is what
        # clients that know files by name want (`Client.download(name)`).
        if cursor is not None:
            raise HTTPException(400, "?name= answers one file: leave out the cursor")
        name = _looked_up(name, "?name=")
        with storage_errors():
            try:
                found = [await tw.storage.find(name)]
            except FileNotFound:
                found = []
        return JSONResponse([info.json() for info in found])

    # PUT /files/{file_id:upload_name} also matches "/files/", so the usual slash
    # redirect would not happen: GET /files/ would be a 405 instead of the list.
    router.add_api_route("/files/", list_files, methods=["GET"], include_in_schema=False)

    async def get_file(request: Request, file_id: str, download: bool = False) -> Response:
        """The file's bytes; `?download=1` makes any file an attachment."""
        return await send_file(request, tw, await get_info(file_id), attachment=download)

    for method, summary in (("GET", "Download a file"), ("HEAD", "A file's headers")):
        router.add_api_route(
            "/files/{file_id}",
            get_file,
            methods=[method],
            tags=["files"],
            summary=summary + " (Range, If-Range, If-None-Match)",
            response_model=None,
            # The file's own type, not JSON: _CONTENT says which.
            response_class=Response,
            responses=_CONTENT,
        )

    @router.get(
        "/files/{file_id}/meta",
        tags=["files"],
        summary="A file's metadata",
        response_model=None,
        responses={200: {"model": FileMetadata}, **error_responses(404)},
    )
    async def file_meta(file_id: str) -> Response:
        return JSONResponse((await get_info(file_id)).json())

    @router.delete(
        "/files/{file_id}",
        tags=["files"],
        status_code=204,
        summary="Delete a file",
        responses=error_responses(404),
    )
    async def delete_file(file_id: str) -> Response:
        with storage_errors():
            await tw.storage.delete(_file_id(file_id))
        return Response(status_code=204)


# -- the original service --------------------------------------------------


async def _small_body(request: Request) -> bytes:
    too_large = HTTPException(413, f"send at most {MAX_SMALL_BODY} bytes: just the filename")
    declared = content_length(request.headers)
    if declared is not None and declared > MAX_SMALL_BODY:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_SMALL_BODY:
            raise too_large
    return bytes(body)


async def _form_field(request: Request, field: str) -> str | None:
    """A plain field of a small form body (urlencoded or multipart), read with a bound."""
    body = await _small_body(request)
    kind, _ = parse_options_header(request.headers.get("content-type"))
    if kind == b"application/x-www-form-urlencoded":
        values = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return values[field][-1] if field in values else None

    async def once() -> AsyncIterator[bytes]:
        yield body

    boundary = _boundary(request, "a form")
    value: str | None = None
    try:
        reader = MultipartStream(once(), boundary)
        while (part := await reader.next_part()) is not None:
            if part.field == field and part.filename is None:
                value = decode(b"".join([chunk async for chunk in reader.body()]))
    except BadMultipart as exc:
        raise HTTPException(400, f"malformed multipart body: {exc}") from None
    return value


async def _requested_name(request: Request) -> str:
    """`filename` from the query string, else a JSON or form body."""
    name = request.query_params.get("filename")
    if name is not None:
        return name
    kind, _ = parse_options_header(request.headers.get("content-type"))
    value: Any = None
    if kind == b"application/json" or kind.endswith(b"+json"):
        try:
            body = orjson.loads(await _small_body(request) or b"{}")
        except orjson.JSONDecodeError as exc:
            raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPException(422, 'send a JSON object: {"filename": "..."}')
        value = body.get("filename")
    elif kind in (b"application/x-www-form-urlencoded", b"multipart/form-data"):
        value = await _form_field(request, "filename")
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
        try:
            [info] = await receive_files(request, tw, most=1)
        except ClientDisconnect:
            return Response(status_code=400)
        # 200, as the original answered (its clients check for it).
        return JSONResponse({"filename": info.name, **info.json()})

    async def download(request: Request) -> Response:
        name = _looked_up(await _requested_name(request), "filename")
        info: FileInfo | None = None
        if valid_id(name):
            with suppress(FileNotFound):
                info = await tw.storage.info(name)
        if info is None:
            try:
                info = await tw.storage.find(name)
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
            {200: {"model": OriginalUpload}, **error_responses(415, *_STORING)},
            _ONE_FILE_BODY,
        ),
        (
            "/downloadfile",
            download,
            "The original service's download, by file name or id (or `?filename=`)",
            {**_CONTENT, **error_responses(400, 413, 415)},
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
