"""Signed file links: a download URL that works without a token, until it expires.

    POST /files/<id>/links  {"expires_in": <seconds>}  (needs files: read)
        -> 201 {"url": "/files/<id>?exp=<unix time>&sig=<hex>", "expires": <unix time>}

The link is for handing a file to something that cannot hold a token (an
`<img>`, a `<video>`, another service). Its signature covers the file's path
and the expiry (`Guard.sign`, with a key derived from the link secret): change
either, or the signature, or wait past `exp`, and the download answers 403.

The download route asks `link_grants` first: a valid link stands in for the
token's `files: read`; a request with no `exp`/`sig` is left to the token.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.requests import HTTPConnection

from ..storage import FileNotFound, valid_id
from .bodies import read_limited
from .errors import ACCESS, error_responses, storage_error, storage_errors
from .guard import Guard

if TYPE_CHECKING:
    from ..app import Tidewire

__all__ = ["MAX_LINK_SECONDS", "LinkRequest", "add_link_routes", "file_path", "link_grants"]

#: The longest a link may live: a link cannot be taken back before it expires
#: (short of changing the link secret), so it should not outlive a week.
MAX_LINK_SECONDS = 7 * 24 * 3600
_LINK_PARAMS = ("exp", "sig")


def file_path(file_id: str) -> str:
    """What a link's signature covers: the file's path, whatever prefix the app is mounted at."""
    return f"/files/{file_id}"


class LinkRequest(BaseModel):
    """How long the link works."""

    expires_in: Annotated[
        int, Field(gt=0, le=MAX_LINK_SECONDS, description="seconds, at most a week")
    ] = 3600

    @field_validator("expires_in", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        # `true` or `"60"` are mistakes, not durations; `60.0` is JSON's 60.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("expires_in is a number of seconds")
        return value


class Link(BaseModel):
    url: str
    expires: int


def link_grants(guard: Guard, conn: HTTPConnection, file_id: str) -> bool:
    """Whether this request reads `file_id` by a signed link rather than by a token.

    True for a valid, unexpired link to this very file; False when the
    request carries neither `exp` nor `sig` (the token decides); 403 when it
    carries a link that does not hold (tampered, for another file, expired):
    a link is judged as a link, never quietly retried as something else.
    """
    query = conn.query_params
    if not any(name in query for name in _LINK_PARAMS):
        return False
    exp, sig = query.get("exp", ""), query.get("sig", "")
    # Only the expiry as it was signed: `0<exp>` is the same time, another link.
    canonical = len(exp) <= 12 and exp.isascii() and exp.isdigit() and exp == str(int(exp))
    if canonical and guard.link_valid(file_path(file_id), exp, sig):
        return True
    if exp.isdigit() and len(exp) <= 12 and int(exp) < time.time():
        raise HTTPException(403, "this link has expired: ask for a new one")
    raise HTTPException(403, "this link is not valid: use it exactly as it was given")


def add_link_routes(router: APIRouter, tw: Tidewire) -> None:
    """`POST /files/{id}/links`."""

    @router.post(
        "/files/{file_id}/links",
        tags=["files"],
        status_code=201,
        summary="A link that downloads the file without a token until it expires",
        response_model=Link,
        responses=error_responses(*ACCESS, 400, 404, 413, 422),
        # The route reads its body itself, with a bound (FastAPI would read any size).
        openapi_extra={
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": LinkRequest.model_json_schema()}},
            }
        },
    )
    async def create_link(request: Request, file_id: str) -> JSONResponse:
        # `read`, or `read:own` for one's own file: whoever may download it may share it.
        from .files import readable  # files.py imports this module (link_grants)

        identity = await tw.guard.check(request, "files:read", file_id)
        if not valid_id(file_id):
            raise storage_error(FileNotFound(file_id))
        with storage_errors():
            await readable(tw, identity, await tw.storage.info(file_id))
        body = await read_limited(request, tw.settings.max_body_bytes)
        try:
            asked = (
                LinkRequest.model_validate(orjson.loads(body)) if body.strip() else LinkRequest()
            )
        except orjson.JSONDecodeError as exc:
            raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
        except ValidationError as exc:
            # As FastAPI reports a body it validates itself: a 422 naming the field.
            errors = exc.errors(include_url=False, include_context=False)
            raise RequestValidationError(
                [{**error, "loc": ("body", *error["loc"])} for error in errors]
            ) from None
        expires = int(time.time()) + asked.expires_in
        query = urlencode({"exp": expires, "sig": tw.guard.sign(file_path(file_id), expires)})
        link = {"url": f"{file_path(file_id)}?{query}", "expires": expires}
        return JSONResponse(link, status_code=201)
