"""The web page: `GET /` and its static files under `/web/`.

The page is plain HTML, CSS and ES modules from `tidewire/web/` (no build
step). Files are looked up by Starlette's `StaticFiles`, which refuses paths
outside that folder and answers `If-None-Match` / `If-Modified-Since` with
`304`. Our own files are revalidated on every use (`no-cache`), so a new
version of the page shows at once; the vendored libraries live in folders
named by their version, so they can be cached for good.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from starlette.staticfiles import StaticFiles

if TYPE_CHECKING:
    from ..app import Tidewire

__all__ = ["WEB_DIR", "add_web_routes"]

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# Python's mimetypes (and /etc/mime.types) differ between systems on these;
# module scripts must be served with a JavaScript type or browsers refuse them.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".map": "application/json",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
REVALIDATE = "no-cache"
FOREVER = "public, max-age=31536000, immutable"
# The page only loads its own files; images may be data: or blob: URLs.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
    "script-src 'self'; connect-src 'self' ws: wss:; object-src 'none'; "
    "base-uri 'self'; frame-ancestors 'self'"
)


def add_web_routes(router: APIRouter, tw: Tidewire) -> None:
    """Serve the page at `/` and its files at `/web/{path}`."""
    files = StaticFiles(directory=WEB_DIR, check_dir=False)

    async def serve(path: str, request: Request) -> Response:
        if path.startswith(".") or "/." in path:
            raise HTTPException(404, "not found")
        # A missing file raises Starlette's HTTPException(404): a JSON 404 like any other.
        response = await files.get_response(path, request.scope)
        suffix = Path(path).suffix.lower()
        if suffix in CONTENT_TYPES and response.status_code == 200:
            response.headers["content-type"] = CONTENT_TYPES[suffix]
        response.headers["cache-control"] = FOREVER if path.startswith("vendor/") else REVALIDATE
        response.headers["x-content-type-options"] = "nosniff"
        return response

    @router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page(request: Request) -> Response:
        response = await serve("index.html", request)
        response.headers["content-security-policy"] = CSP
        return response

    @router.api_route("/web/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def web_file(path: str, request: Request) -> Response:
        return await serve(path, request)
