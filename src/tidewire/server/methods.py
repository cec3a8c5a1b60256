"""Which methods a path allows: `405` with the whole `Allow`, and `OPTIONS`.

Starlette answers a method that a path does not serve with the `Allow` of the
first route whose path matches. Where several routes share a path (`GET`,
`HEAD` and `DELETE /files/{id}`, `PUT /files/{name}`) that is only some of
them: `OPTIONS /files/<id>` said `Allow: PUT`. Here the answer is the union
over every route of the router whose path matches, and `OPTIONS` of a path
is answered `204` with it (no route of ours serves `OPTIONS` but tus's).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route
from starlette.types import Scope

__all__ = ["allowed_methods", "method_not_allowed"]

#: The order methods are listed in.
ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(router: APIRouter, scope: Scope) -> set[str]:
    """The methods that `router`'s routes serve at the request's path."""
    methods: set[str] = set()
    for route in router.routes:
        # Only routes with methods: a Mount or a WebSocket route says nothing of them.
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                methods |= route.methods
    return methods


def _listed(methods: set[str]) -> str:
    return ", ".join(sorted(methods, key=lambda m: (ORDER.index(m) if m in ORDER else 99, m)))


def method_not_allowed(
    router: APIRouter,
) -> Callable[[Request, Exception], Awaitable[Response]]:
    """The app's handler for `405`: the whole `Allow`, or `204` for `OPTIONS`.

    For an app that serves `router` at its root (`Tidewire.app` does):
    `app.add_exception_handler(405, method_not_allowed(router))`.
    """

    async def answer(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        served = allowed_methods(router, request.scope)
        if not served or request.method in served:
            # Not a routing 405: a route that serves this method refused it
            # itself (tus, for an X-HTTP-Method-Override it does not know).
            return JSONResponse({"detail": exc.detail}, 405, exc.headers)
        allow = _listed(served | {"OPTIONS"})
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"Allow": allow})
        detail = f"{request.method[:20]} is not allowed here; this path allows {allow}"
        return JSONResponse({"detail": detail}, 405, {"Allow": allow})

    return answer
