"""W5 reference: the least an ASGI app can do to send a file, a bare Starlette `FileResponse`.

`GET /{name}` sends `$BENCH_FILES/<name>`. It shows what each ASGI server makes of a
`FileResponse` with no framework, storage or metadata around it: on a server that offers
`http.response.pathsend` Starlette hands the path to the server; elsewhere it reads and sends
`FileResponse.chunk_size` bytes at a time (64 KiB, or `$BENCH_CHUNK`).
"""

import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

FILES = Path(os.environ.get("BENCH_FILES", "."))
CHUNK = int(os.environ.get("BENCH_CHUNK") or FileResponse.chunk_size)


async def send_file(request: Request) -> Response:
    path = FILES / Path(request.path_params["name"]).name  # no way out of FILES
    if not path.is_file():
        return PlainTextResponse("not found", status_code=404)
    response = FileResponse(path)
    response.chunk_size = CHUNK
    return response


app = Starlette(routes=[Route("/{name}", send_file)])
