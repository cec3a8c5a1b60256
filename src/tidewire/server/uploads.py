"""Resumable uploads: tus 1.0.0 at `/uploads/`.

    OPTIONS /uploads/        what this server supports (versions, extensions, limits)
    POST    /uploads/        begin an upload; its first bytes may come along (creation,
                             creation-with-upload) -> 201, Location: /uploads/<id>
    HEAD    /uploads/<id>    how far it got: Upload-Offset, Upload-Length
    PATCH   /uploads/<id>    more bytes at Upload-Offset -> 204, the new Upload-Offset
    DELETE  /uploads/<id>    give up (termination)

Extensions: creation, creation-with-upload, termination, checksum (sha1,
sha256, md5), expiration. The last byte turns the upload into a file: from
then on its responses carry `Tidewire-File: <file id>`.

The header parsers are pure functions raising `ValueError` with a message for
the client; the routes turn that into a 400. A file name is checked by the
same rule as everywhere (names.py), a type cleaned and guessed the same way
(headers.py), and a storage error answered from the same table (errors.py),
with tus's own headers on every answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from ..auth import Identity
from ..metrics import uploaded
from ..quotas import client_key
from ..storage import StorageError, Upload, UploadNotFound
from ..wire import FILE_HEADER, OFFSET_STREAM, TUS_EXTENSIONS, TUS_VERSION
from .drain import RETRY_AFTER
from .errors import ACCESS, Problem, error_responses, show, storage_error, storage_errors
from .headers import clean_type, content_length, essence, http_date, parse_size, upload_type
from .names import CONTROL, clean_name

if TYPE_CHECKING:
    from ..app import Tidewire

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "TUS_VERSION",
    "TusServer",
    "add_upload_routes",
    "expire_uploads",
    "file_name_and_type",
    "parse_checksum",
    "parse_metadata",
]

logger = logging.getLogger("tidewire")

EXTENSIONS = ",".join(TUS_EXTENSIONS)
#: hashlib names, as `Storage.append` takes them; the spec requires sha1.
CHECKSUM_ALGORITHMS = ("sha1", "sha256", "md5")

# A page on another origin (or a client reading headers through fetch) only
# sees the response headers listed here.
_EXPOSE = ", ".join(
    (
        "Location",
        "Upload-Offset",
        "Upload-Length",
        "Upload-Metadata",
        "Upload-Expires",
        "Tus-Resumable",
        "Tus-Version",
        "Tus-Extension",
        "Tus-Max-Size",
        "Tus-Checksum-Algorithm",
        FILE_HEADER,
    )
)
_ALWAYS = {"Tus-Resumable": TUS_VERSION, "Access-Control-Expose-Headers": _EXPOSE}

NAME_KEYS = ("filename", "name")  # tus-js-client and Uppy send `filename`
TYPE_KEYS = ("filetype", "type", "contentType")
DEFAULT_NAME = "upload"


# -- headers (pure) --------------------------------------------------------


def parse_metadata(header: str | None) -> dict[str, bytes]:
    """`Upload-Metadata`: comma-separated `key base64value` pairs (the value may be absent)."""
    if header is None or not header.strip():
        return {}
    pairs: dict[str, bytes] = {}
    for item in header.split(","):
        parts = item.strip().split(" ")
        key = parts[0]
        if not key:
            raise ValueError("Upload-Metadata has an empty pair: it is `key base64,key base64`")
        if len(parts) > 2:
            raise ValueError(f"Upload-Metadata: {key!r} has more than one value")
        if key in pairs:
            raise ValueError(f"Upload-Metadata: {key!r} is given twice")
        encoded = parts[1] if len(parts) == 2 else ""
        try:
            # Some clients leave the padding out; nothing else is forgiven.
            pairs[key] = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error:
            raise ValueError(f"Upload-Metadata: the value of {key!r} is not base64") from None
    return pairs


def _text(metadata: dict[str, bytes], keys: tuple[str, ...]) -> tuple[str, str]:
    """The first non-empty value of `keys` as text, and its key; empty strings if none."""
    for key in keys:
        if metadata.get(key):
            try:
                return key, metadata[key].decode()
            except UnicodeDecodeError:
                raise ValueError(f"Upload-Metadata: {key!r} is not UTF-8 text") from None
    return "", ""


def file_name_and_type(metadata: dict[str, bytes]) -> tuple[str, str]:
    """The file's name and media type from upload metadata, with defaults.

    The name is checked as a `PUT` checks it; a blank one is no name. The
    type is stored as a multipart or `PUT` upload's would be: a generic or
    empty one (a browser gives an empty type for files it does not know) is
    guessed from the name. A malformed type is refused rather than ignored,
    since a tus client sets it on purpose.
    """
    key, name = _text(metadata, NAME_KEYS)
    if not name.strip():
        name = DEFAULT_NAME
    try:
        clean_name(name)
    except ValueError as exc:
        raise ValueError(f"{exc}: Upload-Metadata {key!r} names the file") from None
    key, kind = _text(metadata, TYPE_KEYS)
    if CONTROL.search(kind):
        raise ValueError(f"Upload-Metadata: {key!r} contains control characters")
    if kind.strip() and clean_type(kind) is None:
        raise ValueError(f"Upload-Metadata: {show(kind)} is not a media type like text/plain")
    return name, upload_type(kind, name)


def parse_checksum(header: str) -> tuple[str, bytes]:
    """`Upload-Checksum: <algorithm> <base64 digest>` -> (algorithm, digest)."""
    algorithm, _, encoded = header.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise ValueError(
            f"Upload-Checksum: unsupported algorithm {algorithm[:20]!r};"
            f" use one of {', '.join(CHECKSUM_ALGORITHMS)}"
        )
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error:
        raise ValueError("Upload-Checksum: the digest is not base64") from None
    size = hashlib.new(algorithm).digest_size
    if len(digest) != size:
        raise ValueError(
            f"Upload-Checksum: a {algorithm} digest is {size} bytes, not {len(digest)}"
        )
    return algorithm, digest


# -- responses -------------------------------------------------------------


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status, detail, headers={**_ALWAYS, **(headers or {})})


def _bad(exc: ValueError) -> HTTPException:
    return _error(400, str(exc))


def _state(upload: Upload) -> dict[str, str]:
    """Headers saying where an upload is, and what it became once finished."""
    headers = {
        **_ALWAYS,
        "Upload-Offset": str(upload.offset),
        "Upload-Length": str(upload.length),
    }
    if upload.file is None:
        headers["Upload-Expires"] = http_date(upload.expires)
    else:
        headers[FILE_HEADER] = upload.file
    return headers


def _has_body(request: Request) -> bool:
    if "transfer-encoding" in request.headers:
        return True
    length = request.headers.get("content-length", "0").strip()
    return length != "0" and length != ""


def _checksum(request: Request) -> tuple[str, bytes] | None:
    header = request.headers.get("upload-checksum")
    if header is None:
        return None
    try:
        return parse_checksum(header)
    except ValueError as exc:
        raise _bad(exc) from None


def _check_live(upload: Upload) -> None:
    # The storage forgets expired uploads by itself; this covers one that
    # still hands back an expired one before its cleanup has run.
    if upload.file is None and upload.expires <= time.time():
        raise _error(410, f"this upload expired at {http_date(upload.expires)}; start a new one")


Handler = Callable[[Request, str], Awaitable[Response]]

_RESOURCE_DOC = (
    f"tus {TUS_VERSION} upload resource. Send `Tus-Resumable: {TUS_VERSION}`. "
    "Clients that cannot send PATCH or DELETE may POST with `X-HTTP-Method-Override`."
)


def _header(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": True,
        "schema": schema,
        "description": description,
    }


_SIZE = {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}
_VERSION = _header(
    "Tus-Resumable", {"type": "string", "enum": [TUS_VERSION]}, "the tus version: 412 otherwise"
)
_OFFSET = _header("Upload-Offset", _SIZE, "where these bytes go: the upload's offset (HEAD)")
_STATE_HEADERS = {
    name: {"schema": {"type": "string"}} for name in ("Tus-Resumable", "Upload-Offset")
}


class TusServer:
    """The tus handlers of one `Tidewire`: one method per request type.

    tus lets `X-HTTP-Method-Override` name the method, so the routes go to
    `collection` and `resource`, which dispatch by the effective method
    (what Starlette's `HTTPEndpoint` does by the request's own).
    """

    def __init__(self, tw: Tidewire) -> None:
        self.tw = tw
        self.on_collection: dict[str, Handler] = {"OPTIONS": self.options, "POST": self.create}
        self.on_upload: dict[str, Handler] = {
            "OPTIONS": self.options,
            "HEAD": self.head,
            "PATCH": self.patch,
            "DELETE": self.delete,
        }

    @staticmethod
    def check_version(request: Request) -> None:
        version = request.headers.get("tus-resumable")
        if version != TUS_VERSION:
            said = "no Tus-Resumable header" if version is None else f"Tus-Resumable: {version}"
            raise _error(
                412,
                f"{said}: this server speaks tus {TUS_VERSION}",
                {"Tus-Version": TUS_VERSION},
            )

    async def find(self, request: Request, id: str) -> Upload:
        """The upload `id`, if it is the caller's: anyone else's is not found, as
        an unknown one (its id travels in URLs and logs; its bytes are private)."""
        guard = self.tw.guard
        identity: Identity = request.state.identity
        with storage_errors(_ALWAYS):
            upload = await self.tw.storage.upload(id)
            if guard.on and not guard.owns(identity, upload.owner):
                raise UploadNotFound(id)
        await guard.require(identity, "files:write", upload.name)
        _check_live(upload)
        return upload

    async def options(self, request: Request, id: str) -> Response:
        headers = {
            **_ALWAYS,
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": EXTENSIONS,
            "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS),
        }
        if self.tw.settings.max_file_size is not None:
            headers["Tus-Max-Size"] = str(self.tw.settings.max_file_size)
        return Response(status_code=204, headers=headers)

    async def create(self, request: Request, _: str) -> Response:
        # A new upload goes elsewhere while draining; PATCHes of one begun here go on.
        if self.tw.draining:
            detail = "this server is shutting down; create the upload on another"
            raise _error(503, detail, {"Retry-After": str(RETRY_AFTER)})
        identity: Identity = request.state.identity
        self.check_version(request)
        for unsupported in ("upload-defer-length", "upload-concat"):
            if unsupported in request.headers:
                raise _error(400, f"{unsupported.title()} is not supported: send Upload-Length")
        try:
            length = parse_size(request.headers.get("upload-length"), "Upload-Length")
            raw = request.headers.get("upload-metadata", "")
            # Kept with the upload and sent back on every HEAD: bounded as a
            # body that is not a file is (the header limit alone may be higher).
            metadata_limit = self.tw.settings.max_body_bytes
            if len(raw) > metadata_limit:
                raise _error(413, f"Upload-Metadata may be at most {metadata_limit} bytes")
            name, kind = file_name_and_type(parse_metadata(raw))
        except ValueError as exc:
            raise _bad(exc) from None
        await self.tw.guard.require(identity, "files:write", name)
        limit = self.tw.settings.max_file_size
        if limit is not None and length > limit:
            raise _error(413, f"Upload-Length {length} is over the limit of {limit} bytes")
        # creation-with-upload: bytes in the POST are the upload's first bytes.
        with_body = essence(request.headers.get("content-type", "")) == OFFSET_STREAM
        if not with_body and _has_body(request):
            raise _error(415, f"a POST with a body must be Content-Type: {OFFSET_STREAM}")
        checksum = _checksum(request) if with_body else None
        sent = content_length(request.headers)
        if with_body and sent is not None and sent > length:
            raise _error(413, f"the body has {sent} bytes but Upload-Length is {length}")

        expires = time.time() + self.tw.settings.upload_expiry
        owner = identity.sub if self.tw.guard.on else None
        with storage_errors(_ALWAYS):
            # Within the client's open uploads and its owner's storage quota.
            upload = await self.tw.quotas.create_upload(
                client_key(identity, request),
                owner,
                length,
                partial(
                    self.tw.storage.create_upload,
                    length=length,
                    name=name,
                    type=kind,
                    metadata=raw,
                    expires=expires,
                    owner=owner,
                ),
                self.tw.storage.abort,
            )
        if with_body and upload.file is None:
            try:
                upload = await self.tw.storage.append(
                    upload.id, 0, uploaded(request.stream()), checksum=checksum
                )
            except ClientDisconnect:
                # Nobody to answer; the bytes that came stay until the upload expires.
                return Response(status_code=400)
            except StorageError as exc:
                # The client never learns this upload's URL: nothing should stay behind.
                with contextlib.suppress(UploadNotFound):
                    await self.tw.storage.abort(upload.id)
                await self.tw.quotas.upload_aborted(request, upload)
                raise storage_error(exc, _ALWAYS) from None
        await self.tw.quotas.upload_finished(request, upload, self.tw.storage)
        location = request.url_for("upload", id=upload.id).path
        return Response(status_code=201, headers={**_state(upload), "Location": location})

    async def head(self, request: Request, id: str) -> Response:
        self.check_version(request)
        upload = await self.find(request, id)
        headers = {**_state(upload), "Cache-Control": "no-store"}
        if upload.metadata:
            headers["Upload-Metadata"] = upload.metadata
        return Response(status_code=200, headers=headers)

    async def patch(self, request: Request, id: str) -> Response:
        self.check_version(request)
        if essence(request.headers.get("content-type", "")) != OFFSET_STREAM:
            raise _error(415, f"PATCH needs Content-Type: {OFFSET_STREAM}")
        try:
            offset = parse_size(request.headers.get("upload-offset"), "Upload-Offset")
        except ValueError as exc:
            raise _bad(exc) from None
        checksum = _checksum(request)
        # Refuse before reading the body, which may be gigabytes.
        upload = await self.find(request, id)
        if offset != upload.offset:
            raise _error(409, f"Upload-Offset is {offset} but the upload is at {upload.offset}")
        sent = content_length(request.headers)
        if sent is not None and offset + sent > upload.length:
            raise _error(
                413, f"{sent} bytes at offset {offset} go past Upload-Length {upload.length}"
            )
        try:
            with storage_errors(_ALWAYS):
                upload = await self.tw.storage.append(
                    id, offset, uploaded(request.stream()), checksum=checksum
                )
        except ClientDisconnect:
            # The storage kept what arrived: the client resumes from there.
            return Response(status_code=400)
        await self.tw.quotas.upload_finished(request, upload, self.tw.storage)
        return Response(status_code=204, headers=_state(upload))

    async def delete(self, request: Request, id: str) -> Response:
        self.check_version(request)
        upload = await self.find(request, id)
        with storage_errors(_ALWAYS):
            await self.tw.storage.abort(id)
        await self.tw.quotas.upload_aborted(request, upload)
        return Response(status_code=204, headers=dict(_ALWAYS))

    async def dispatch(self, handlers: dict[str, Handler], request: Request, id: str) -> Response:
        # tus: X-HTTP-Method-Override, when present, *is* the method.
        method = request.headers.get("x-http-method-override", request.method)
        handler = handlers.get(method.strip().upper())
        if handler is None:
            allowed = ", ".join(handlers)
            raise _error(405, f"{method[:20]!r} is not allowed here", {"Allow": allowed})
        if handler != self.options:
            # Who asks, before anything else is looked at; OPTIONS stays open
            # (it says what the server supports, and browsers send it bare).
            request.state.identity = await self.tw.guard.identify(request)
        return await handler(request, id)

    async def collection(self, request: Request) -> Response:
        return await self.dispatch(self.on_collection, request, "")

    async def resource(self, request: Request, id: str) -> Response:
        return await self.dispatch(self.on_upload, request, id)


def add_upload_routes(router: APIRouter, tw: Tidewire) -> None:
    """`/uploads/` and `/uploads/{id}`, served by a `TusServer`, and their OpenAPI operations."""
    settings = tw.settings
    tus = TusServer(tw)
    collection, resource = tus.collection, tus.resource

    def add(
        path: str,
        endpoint: Callable[..., Awaitable[Response]],
        method: str,
        summary: str,
        *,
        status: int,
        name: str,
        description: str = _RESOURCE_DOC,
        include: bool = True,
        responses: dict[int | str, dict[str, Any]] | None = None,
        openapi: dict[str, Any] | None = None,
    ) -> None:
        router.add_api_route(
            path,
            endpoint,
            methods=[method],
            tags=["uploads"],
            summary=summary,
            description=description,
            name=name,
            status_code=status,
            response_class=Response,
            include_in_schema=include,
            responses=responses,
            openapi_extra=openapi,
        )

    # Upload-Metadata and Upload-Checksum are only described, not declared as
    # parameters: their rules (base64 of UTF-8 names, a digest of the body)
    # are more than a schema says, and a declared parameter would be filled
    # with values that the spec calls valid and the server refuses.
    found: dict[int | str, dict[str, Any]] = {
        **error_responses(*ACCESS, 404, 410, 412),
        404: {
            "description": "No such upload, or it expired or was terminated",
            "model": Problem,
        },
    }
    most = settings.max_file_size
    length = _header(
        "Upload-Length",
        {**_SIZE, "maximum": _SIZE["maximum"] if most is None else most},
        "the upload's size in bytes: at most Tus-Max-Size (413 otherwise)",
    )
    created: dict[int | str, dict[str, Any]] = {
        201: {"description": "Created", "headers": {"Location": {"schema": {"type": "string"}}}},
        **error_responses(*ACCESS, 400, 412, 413, 415, 460, 507),
    }
    for path, include in (("/uploads/", True), ("/uploads", False)):
        add(
            path,
            collection,
            "OPTIONS",
            "What the tus server supports",
            status=204,
            name="uploads_options",
            description="Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm.",
            include=include,
        )
        add(
            path,
            collection,
            "POST",
            "Begin a resumable upload (tus creation)",
            status=201,
            name="uploads",
            description=(
                "`Upload-Length` (required), `Upload-Metadata` (`filename`, `filetype`, base64). "
                f"A body with `Content-Type: {OFFSET_STREAM}` is the upload's first bytes. "
                "Answers `Location` of the upload, `Upload-Offset`, `Upload-Expires`."
            ),
            include=include,
            responses=created,
            openapi={"parameters": [_VERSION, length]},
        )
    patched: dict[int | str, dict[str, Any]] = {
        **found,
        204: {"description": "Stored", "headers": _STATE_HEADERS},
        **error_responses(*ACCESS, 400, 409, 413, 415, 460, 507),
    }
    bytes_body = {"required": True, "content": {OFFSET_STREAM: {"schema": {"type": "string"}}}}
    patch_doc = {"parameters": [_VERSION, _OFFSET], "requestBody": bytes_body}
    version_doc = {"parameters": [_VERSION]}
    override = "PATCH or DELETE, for clients that can only POST (X-HTTP-Method-Override)"
    for method, summary, status, name, responses, openapi in (
        ("HEAD", "How far an upload got", 200, "upload", found, version_doc),
        ("PATCH", "Add bytes to an upload", 204, "upload_patch", patched, patch_doc),
        ("DELETE", "Terminate an upload", 204, "upload_delete", found, version_doc),
        ("POST", override, 204, "upload_override", None, None),
        ("OPTIONS", "What the tus server supports", 204, "upload_options", None, None),
    ):
        add(
            "/uploads/{id}",
            resource,
            method,
            summary,
            status=status,
            name=name,
            responses=responses,
            openapi=openapi,
            # Not in the spec: OPTIONS, as usual; and the override POST, which
            # is PATCH or DELETE as its header says (the description tells
            # it): one OpenAPI operation cannot be either.
            include=method not in ("OPTIONS", "POST"),
        )


async def expire_uploads(tw: Tidewire) -> None:
    """Remove stale unfinished uploads now and every few minutes, until cancelled.

    Meant to run for the app's whole life (started from its lifespan). A
    failed sweep is logged and the next one comes as usual.
    """
    interval = max(1.0, min(tw.settings.upload_expiry / 4, 300.0))
    while True:
        try:
            removed = await tw.storage.expire()
            if removed:
                logger.info("removed %d expired uploads", removed)
        except Exception:
            logger.exception("removing expired uploads failed")
        await asyncio.sleep(interval)
