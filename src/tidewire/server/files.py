"""Routes for files: upload (multipart or a raw body), list, download, delete.

    POST   /files              multipart, one or more `file` parts -> 201 [metadata]
    PUT    /files/<name>       the raw body is the file (curl -T)  -> 201 metadata
    GET    /files              metadata, newest first, paged by a cursor
    GET    /files?name=<name>  [the newest file of that name], or []
    GET    /files/<id>         the bytes (HEAD too): see downloads.py
    GET    /files/<id>/meta    metadata
    DELETE /files/<id>

(The original service's `POST /uploadfile/` and `POST /downloadfile/` are
compat.py's, on top of `receive_files` and `send_file`.)

Uploads stream: each file part of a multipart body goes, as it arrives,
straight into `Storage.save` (multipart.py says why we parse it ourselves),
so a file is written once and memory stays flat whatever its size. The parts
around the routes each have a module: names.py (what a file may be called),
headers.py (ranges, validators, types), downloads.py (sending a file),
errors.py (what a storage error tells the client).
"""

from __future__ import annotations

from contextlib import suppress
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlencode

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from python_multipart.multipart import parse_options_header
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.requests import ClientDisconnect

from ..auth import Identity
from ..metrics import uploaded
from ..storage import FileInfo, FileNotFound, TooLarge, valid_id
from ..wire import NEXT_CURSOR_HEADER
from .downloads import send_file
from .errors import ACCESS, error_responses, show, storage_error, storage_errors
from .headers import content_length, upload_type
from .links import link_grants
from .multipart import BadMultipart, MultipartStream
from .names import MAX_NAME, NAME_SCHEMA, clean_name

if TYPE_CHECKING:
    from ..app import Tidewire

__all__ = [
    "BINARY",
    "FILE_CONTENT",
    "MAX_FILES",
    "STORING",
    "FileMetadata",
    "add_file_routes",
    "files_form",
    "looked_up",
    "multipart_boundary",
    "own_only",
    "owner_of_new",
    "readable",
    "receive_files",
    "request_body",
]

#: Most files one multipart request may carry.
MAX_FILES = 100

# -- who may ---------------------------------------------------------------


def owner_of_new(tw: Tidewire, identity: Identity) -> str | None:
    """Who owns what `identity` uploads: its `sub`; nobody with access control off."""
    return identity.sub if tw.guard.on else None


def own_only(identity: Identity) -> str | None:
    """The owner a listing or lookup is limited to: the identity itself, for `read:own`."""
    if identity.admin or "read" in identity.files:
        return None
    return identity.sub


async def readable(tw: Tidewire, identity: Identity, info: FileInfo) -> FileInfo:
    """`info`, once `identity` passed the `files:read` check: with `read:own`
    only, the file must be its own (else 403, naming what is missing)."""
    if own_only(identity) is not None and info.owner != identity.sub:
        await tw.guard.require(identity, "files:read", info.id, owner=info.owner or "")
    return info


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


def multipart_boundary(request: Request, hint: str) -> bytes:
    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data":
        raise HTTPException(415, f"send multipart/form-data: {hint}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "the multipart/form-data Content-Type has no boundary")
    return boundary


def looked_up(name: str, where: str) -> str:
    """A name to look a file up by, checked by the rule uploads follow.

    Any string would be safe to compare, but one that no upload may store
    (a bidi control, a control character) is refused as it would be there,
    naming what to fix, rather than answered with "no such file".
    """
    try:
        return clean_name(name)
    except ValueError as exc:
        raise HTTPException(422, f"{exc}: {where} names the file") from None


async def _discard(tw: Tidewire, files: list[FileInfo]) -> None:
    # Shielded: a cancelled request must still take back what it stored.
    with anyio.CancelScope(shield=True):
        for info in files:
            with suppress(FileNotFound):
                await tw.storage.delete(info.id)
                await tw.quotas.deleted(info)


async def receive_files(
    request: Request, tw: Tidewire, *, most: int = MAX_FILES, owner: str | None = None
) -> list[FileInfo]:
    """Store each `file` part of a multipart request, streaming; all of them or none.

    The size limit applies to each file, as it streams: the length of a
    multipart body does not say how large its files are. The files are `owner`'s.
    """
    hint = "one or more file fields named 'file', e.g. curl -F file=@photo.jpg URL"
    boundary = multipart_boundary(request, hint)
    storage = tw.storage
    saved: list[FileInfo] = []
    try:
        reader = MultipartStream(uploaded(request.stream()), boundary)
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
                info = await tw.quotas.save(
                    owner,
                    reader.body(),
                    partial(
                        storage.save,
                        name=name,
                        type=upload_type(part.type, name),
                        limit=tw.settings.max_file_size,
                        owner=owner,
                    ),
                    storage.delete,
                )
            saved.append(info)
    except BaseException as exc:
        await _discard(tw, saved)
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


def request_body(content: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    """`openapi_extra` for a body the route reads itself (FastAPI cannot see it)."""
    return {"requestBody": {"required": required, "content": content}}


def files_form(file: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "properties": {"file": file}, "required": ["file"]}
    return request_body({"multipart/form-data": {"schema": schema}})


BINARY = {"type": "string", "format": "binary"}
_MULTIPART_BODY = files_form({"type": "array", "items": BINARY, "minItems": 1})
# An empty body is an empty file.
_RAW_BODY = request_body({"application/octet-stream": {"schema": BINARY}}, required=False)
# A download is in the file's own type, whatever that is; so is one range.
_ANY = {"*/*": {"schema": BINARY}}
FILE_CONTENT: dict[int | str, dict[str, Any]] = {
    200: {"description": "The file, in its own type", "content": _ANY},
    206: {
        "description": "The requested range; several as multipart/byteranges",
        "content": {**_ANY, "multipart/byteranges": {"schema": BINARY}},
    },
    304: {"description": "Not modified (If-None-Match / If-Modified-Since)"},
    **error_responses(*ACCESS, 404, 416, 422),
}
_LINK_EXP = (
    "A signed link's expiry (unix time), with `sig`: together they stand in for a token "
    "(`POST /files/{file_id}/links` makes them); 403 once past, or if either was changed"
)
_LINK_SIG = "A signed link's signature, with `exp`"
#: Where the storage may refuse an upload (errors.py's table).
STORING = (400, 413, 422, 507)
_NAME = {
    "name": "file_id",
    "in": "path",
    "required": True,
    "description": (
        "the new file's name: only a label, the server makes its id. "
        "`<id>/meta` and `<id>/links` are a file's metadata and links, not names (405)."
    ),
    "schema": NAME_SCHEMA,
}


class UploadName(PathConvertor):
    """The name in `PUT /files/<name>`: any path but a file's metadata, `<id>/meta`
    (and its links, `<id>/links`, links.py's).

    A name may hold slashes (`../../etc/passwd` is a fine label), so the PUT
    route takes a whole path; without this, `PUT /files/<id>/meta` stored a
    file named `<id>/meta` rather than answer 405 as for any resource that
    only has GET. In the router's regex, so that Allow says the same.
    """

    regex = r"(?![^/]+/(?:meta|links)$).*"


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
    puts back the others: see `location /_tidewire_files/` in
    docs/deploy/nginx.conf, which tests/deploy/test_nginx.py runs.
    """

    guard = tw.guard

    async def get_info(file_id: str) -> FileInfo:
        with storage_errors():
            return await tw.storage.info(_file_id(file_id))

    async def get_readable(request: Request, file_id: str) -> FileInfo:
        # `read` or `read:own` before the lookup (no token, no answer about
        # what exists); then, for `read:own`, whose file it is.
        identity = await guard.check(request, "files:read", file_id)
        return await readable(tw, identity, await get_info(file_id))

    @router.post(
        "/files",
        tags=["files"],
        status_code=201,
        summary="Upload files (multipart, one or more `file` fields)",
        response_model=None,
        responses={201: {"model": list[FileMetadata]}, **error_responses(*ACCESS, 415, *STORING)},
        openapi_extra=_MULTIPART_BODY,
    )
    async def upload_files(request: Request) -> Response:
        tw.drain_state.refuse()
        # The names come with the body: the policy hook sees "" for them.
        identity = await guard.check(request, "files:write", "")
        try:
            saved = await receive_files(request, tw, owner=owner_of_new(tw, identity))
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
            **error_responses(*ACCESS, *STORING),
        },
        openapi_extra={**_RAW_BODY, "parameters": [_NAME]},
    )
    async def put_file(request: Request) -> Response:
        """The name in the URL is only the file's label; the server makes its id."""
        tw.drain_state.refuse()
        filename = request.path_params["file_id"]
        identity = await guard.identify(request)
        try:
            name = clean_name(filename)
        except ValueError as exc:
            raise HTTPException(422, f"{exc}: PUT /files/<name> names the file") from None
        await guard.require(identity, "files:write", name)
        _refuse_declared(request, tw.settings.max_file_size)
        kind = upload_type(request.headers.get("content-type"), name)
        try:
            with storage_errors():
                owner = owner_of_new(tw, identity)
                info = await tw.quotas.save(
                    owner,
                    uploaded(request.stream()),
                    partial(
                        tw.storage.save,
                        name=name,
                        type=kind,
                        limit=tw.settings.max_file_size,
                        owner=owner,
                    ),
                    tw.storage.delete,
                )
        except ClientDisconnect:
            return Response(status_code=400)
        return JSONResponse(info.json(), status_code=201, headers={"location": info.url})

    @router.get(
        "/files",
        tags=["files"],
        summary="List files, newest first",
        response_model=None,
        responses={200: {"model": list[FileMetadata]}, **error_responses(*ACCESS, 400, 422)},
    )
    async def list_files(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000, description="files per page")] = 50,
        cursor: Annotated[
            str | None,
            Query(
                max_length=200,
                description=f"{NEXT_CURSOR_HEADER} of a page; not with `name`",
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
        identity = await guard.check(request, "files:read", "")
        mine = own_only(identity)  # read:own lists only the identity's own files
        if name is not None:
            return await newest_named(name, cursor, mine)
        try:
            with storage_errors():
                page = await tw.storage.list(limit=limit, cursor=cursor, owner=mine)
        except ValueError:
            raise HTTPException(
                400, f"bad cursor: pass the {NEXT_CURSOR_HEADER} of a page"
            ) from None
        headers = {}
        if page.next is not None:
            query = urlencode({"limit": limit, "cursor": page.next})
            headers[NEXT_CURSOR_HEADER] = page.next
            headers["link"] = f'<{request.url.path}?{query}>; rel="next"'
        return JSONResponse([info.json() for info in page.files], headers=headers)

    async def newest_named(name: str, cursor: str | None, owner: str | None) -> Response:
        # Storage keeps an index by name that answers "the newest" without a
        # scan (`Storage.find`), not a listing by name; the newest is what
        # clients that know files by name want (`Client.download(name)`).
        if cursor is not None:
            raise HTTPException(400, "?name= answers one file: leave out the cursor")
        name = looked_up(name, "?name=")
        with storage_errors():
            try:
                found = [await tw.storage.find(name, owner=owner)]
            except FileNotFound:
                found = []
        return JSONResponse([info.json() for info in found])

    # PUT /files/{file_id:upload_name} also matches "/files/", so the usual slash
    # redirect would not happen: GET /files/ would be a 405 instead of the list.
    router.add_api_route("/files/", list_files, methods=["GET"], include_in_schema=False)

    async def get_file(
        request: Request,
        file_id: str,
        download: bool = False,
        # Declared for the OpenAPI page; `link_grants` reads them from the
        # query itself, as it was signed (strings: `0<exp>` is another link).
        exp: Annotated[str | None, Query(description=_LINK_EXP)] = None,
        sig: Annotated[str | None, Query(description=_LINK_SIG)] = None,
    ) -> Response:
        """The file's bytes; `?download=1` makes any file an attachment.

        `?exp=&sig=` (a signed link, links.py) stand in for a token.
        """
        if link_grants(tw.guard, request, file_id):
            info = await get_info(file_id)
        else:
            info = await get_readable(request, file_id)
        return await send_file(request, tw, info, attachment=download)

    for method, summary in (("GET", "Download a file"), ("HEAD", "A file's headers")):
        router.add_api_route(
            "/files/{file_id}",
            get_file,
            methods=[method],
            tags=["files"],
            summary=summary + " (Range, If-Range, If-None-Match)",
            response_model=None,
            # The file's own type, not JSON: FILE_CONTENT says which.
            response_class=Response,
            responses=FILE_CONTENT,
        )

    @router.get(
        "/files/{file_id}/meta",
        tags=["files"],
        summary="A file's metadata",
        response_model=None,
        responses={200: {"model": FileMetadata}, **error_responses(*ACCESS, 404)},
    )
    async def file_meta(request: Request, file_id: str) -> Response:
        return JSONResponse((await get_readable(request, file_id)).json())

    @router.delete(
        "/files/{file_id}",
        tags=["files"],
        status_code=204,
        summary="Delete a file",
        responses=error_responses(*ACCESS, 404),
    )
    async def delete_file(request: Request, file_id: str) -> Response:
        identity = await guard.identify(request)
        if not identity.admin and "delete" not in identity.files:
            # Refused before the lookup, as a token without the right learns nothing.
            await guard.require(identity, "files:delete", file_id)
        # `delete` covers the identity's own files (admin: any).
        info = await get_info(file_id)
        await guard.require(identity, "files:delete", file_id, owner=info.owner or "")
        with storage_errors():
            await tw.storage.delete(info.id)
        await tw.quotas.deleted(info)
        return Response(status_code=204)
