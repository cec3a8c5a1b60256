"""File transfers for `Client` and `AsyncClient`: upload, download, find.

Each transfer is written once, as a generator that yields the HTTP calls it
needs (`_Call`) and is sent their responses back ("sans-I/O"). `_run` and
`_arun` are the only code that touches the network, so the sync and async
clients cannot drift apart. `_arun` also steps the flow in a thread of its
own: whatever a flow does between requests (hashing a resumed `.part`,
reading a file, the resume store, waiting for its threads) stays off the
event loop. The local files are `_files`'; the tus headers `_tus`'.

Uploads. A file smaller than `tus_threshold`, or one whose size cannot be
known (a pipe), goes up in one multipart `POST /files` (framed here: see
`multipart_head`). A larger one goes by tus (`/uploads/`) in `chunk_size`
PATCHes, and its upload URL is remembered in an `UploadStore` under the
file's fingerprint: the same upload run again, after a crash or from another
process, goes on from where the server got to.

Downloads write `<name>.part` and rename it only once its sha256 is the
file's; a `.part` left by an interrupted download is continued with `Range`
and `If-Range`, so a file that changed on the server is sent whole instead.

Both check the sha256 the server reports against the bytes on this side,
hashed as they pass; only the part a resumed transfer had moved before is
read again, to hash it.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeAlias, TypeVar

import httpx

from ..storage import valid_id
from ._files import PartFile, Source, SourceFile, UploadStore, destination
from ._tus import (
    FILE_HEADER,
    TUS,
    TusState,
    tus_create_headers,
    tus_location,
    tus_patch_headers,
    tus_state,
)
from .exceptions import (
    ChecksumMismatch,
    HTTPStatusError,
    ProtocolError,
    raise_for_status,
    status_error,
    translate,
)

__all__ = [
    "Progress",
    "adownload",
    "afind",
    "aupload",
    "download",
    "find",
    "multipart_head",
    "upload",
]

Progress: TypeAlias = Callable[[int, int | None], None]
"""`progress(done, total)`: bytes moved so far, and the size when known."""

T = TypeVar("T")

#: Progress is reported about this often (and once at the end).
PROGRESS_STEP = 256 << 10
#: 409s in a row (someone else moving the upload on) before giving up.
MAX_CONFLICTS = 3
#: Bytes per tus PATCH. Each PATCH waits for its answer before the next one
#: starts, so small ones cost round trips; the body is streamed 1 MiB at a
#: time, so a large one costs no memory, and the server keeps what arrived
#: of a PATCH that is cut off, so it costs nothing on resume either.
PATCH_SIZE = 32 << 20
#: What a download asks the socket for at a time. httpcore asks for 64 KiB
#: (`HTTP11Connection.READ_NUM_BYTES`), and around each read h11 and httpx
#: run a loop of Python whose cost per GiB was a third of the client's CPU.
DOWNLOAD_READ = 1 << 20
#: Files of this size or more go up by tus, resumably; smaller ones in one POST.
TUS_THRESHOLD = 8 << 20


# -- progress --------------------------------------------------------------


class _Ticker:
    """Calls `progress` about every `PROGRESS_STEP` bytes, and at the end with done == total."""

    def __init__(self, progress: Progress | None, total: int | None) -> None:
        self.progress = progress
        self.total = total
        self._last: int | None = None

    def __call__(self, done: int) -> None:
        last = self._last
        if self.progress is None or done == last:
            return
        if last is None or abs(done - last) >= PROGRESS_STEP or done == self.total:
            self._last = done
            self.progress(done, self.total)

    def end(self, done: int) -> None:
        # An unknown total is known at the end: the last call says so.
        unknown = self.total is None
        self.total = done
        if self.progress is not None and (self._last != done or unknown):
            self._last = done
            self.progress(done, self.total)


# -- what the requests and answers say (pure) -----------------------------


def multipart_body(source: SourceFile, boundary: str, tick: _Ticker) -> Iterator[bytes]:
    """The whole file as a one-file multipart body (of a pipe: to its end)."""
    tick(0)
    yield multipart_head(boundary, source.name, source.type)
    yield from source.chunks(0, source.size, tick)
    yield multipart_tail(boundary)


def multipart_headers(source: SourceFile, boundary: str) -> dict[str, str]:
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if source.size is not None:
        head = multipart_head(boundary, source.name, source.type)
        length = len(head) + source.size + len(multipart_tail(boundary))
        headers["Content-Length"] = str(length)
    return headers


def multipart_head(boundary: str, name: str, type: str | None) -> bytes:
    """The start of a one-file `multipart/form-data` body, up to the file's first byte.

    We frame the body ourselves, rather than through httpx's `files=`, for
    two reasons: the name goes as a quoted-string with backslash escapes,
    where httpx writes a `"` as `%22` (the HTML5 way, which no server can tell
    from a name with "%22" in it); and a file's body has a Content-Length and
    goes in 1 MiB reads rather than chunked in 64 KiB ones.
    """
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
        f"Content-Type: {type or 'application/octet-stream'}\r\n\r\n"
    ).encode()


def multipart_tail(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode()


def _range_start(response: httpx.Response) -> int | None:
    header = response.headers.get("content-range", "")
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", header)
    return int(match.group(1)) if match else None


def _json_answer(response: httpx.Response) -> Any:
    raise_for_status(response)
    try:
        return response.json()
    except ValueError:
        raise ProtocolError(
            f"{response.request.method} {response.request.url} did not answer JSON"
        ) from None


def _file_meta(value: Any, response: httpx.Response) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("sha256"), str):
        raise ProtocolError(
            f"{response.request.method} {response.request.url} did not answer a file's metadata"
        )
    return value


@dataclass(frozen=True, slots=True)
class _Wanted:
    """The file a download is after, from its metadata."""

    id: str
    name: str
    size: int
    sha256: str

    @classmethod
    def of(cls, meta: dict[str, Any]) -> _Wanted:
        try:
            wanted = cls(str(meta["id"]), str(meta["name"]), int(meta["size"]), meta["sha256"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"not a file's metadata: {meta!r:.200}") from None
        if not valid_id(wanted.id):  # the sha256 is checked by _file_meta
            raise ProtocolError(f"not a file's metadata: {meta!r:.200}")
        return wanted


# -- the flows (no I/O of their own) ---------------------------------------


class _Sink(Protocol):
    def write(self, data: bytes) -> Future[None] | None:
        """Keep `data`; a write still in flight to wait for before the next, if any."""


@dataclass(frozen=True, slots=True)
class _Call:
    """One HTTP request a flow needs made."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] | None = None
    content: bytes | Iterator[bytes] | None = None
    #: Streams the answer: called with it (body unread), says where the body
    #: goes; None (or no `into`) reads it whole. Called where the flow runs.
    into: Callable[[httpx.Response], _Sink | None] | None = None


Flow: TypeAlias = Generator[_Call, httpx.Response, T]


def _upload_flow(
    source: Source,
    *,
    name: str | None,
    type: str | None,
    server: str,
    progress: Progress | None,
    tus_threshold: int,
    chunk_size: int,
    store: UploadStore | None,
) -> Flow[dict[str, Any]]:
    if chunk_size < 1 or tus_threshold < 0:
        raise ValueError("chunk_size must be positive and tus_threshold not negative")
    with SourceFile.open(source, name=name, type=type) as src:
        tick = _Ticker(progress, src.size)
        if src.size is None or src.size < tus_threshold:
            boundary = secrets.token_hex(16)
            response = yield _Call(
                "POST",
                "/files",
                headers=multipart_headers(src, boundary),
                content=multipart_body(src, boundary, tick),
            )
            answer = _json_answer(response)
            if not isinstance(answer, list) or len(answer) != 1:
                raise ProtocolError(f"POST {response.request.url} did not answer [metadata]")
            meta = _file_meta(answer[0], response)
        else:
            key = f"{server.rstrip('/')} {src.fingerprint()}"
            file_id = yield from _tus_flow(src, key, store or UploadStore(), chunk_size, tick)
            response = yield _Call("GET", f"/files/{file_id}/meta")
            meta = _file_meta(_json_answer(response), response)
        expected = src.sha256()
        if meta["sha256"] != expected or meta.get("size") != src.hashed:
            where = f"{src.label} as stored on the server (file {meta.get('id')})"
            raise ChecksumMismatch(where, expected, meta["sha256"])
        tick.end(src.hashed)
        return meta


def _tus_flow(
    source: SourceFile, key: str, store: UploadStore, chunk_size: int, tick: _Ticker
) -> Flow[str]:
    """Upload `source` by tus, resuming a remembered upload; the new file's id."""
    size = source.size
    assert size is not None
    state: TusState | None = None
    url = store.get(key)
    if url is not None:
        state = yield from _tus_head(url)
        if state is None or state.length not in (None, size):
            # Expired, or finished and forgotten, or (a fingerprint that
            # collided) not an upload of this size: start anew.
            state = None
            store.remove(key)
    if state is None or url is None:
        response = yield _Call(
            "POST", "/uploads/", headers=tus_create_headers(size, source.name, source.type)
        )
        raise_for_status(response)
        url = tus_location(response)
        store.put(key, url)
        state = tus_state(response, default=0)
    conflicts = 0
    while state.file is None:
        if state.offset >= size:
            raise ProtocolError(f"{url} has all {size} bytes but names no file ({FILE_HEADER})")
        tick(state.offset)
        length = min(chunk_size, size - state.offset)
        response = yield _Call(
            "PATCH",
            url,
            headers=tus_patch_headers(state.offset, length),
            content=source.chunks(state.offset, length, tick),
        )
        if response.status_code == 409 and conflicts < MAX_CONFLICTS:
            # Not where we thought: another process resuming the same file,
            # or a PATCH whose answer was lost. Ask where it is, and go on.
            conflicts += 1
            state = yield from _tus_head(url)
            if state is None:
                raise status_error(response)
            continue
        if response.status_code in (404, 410):
            store.remove(key)  # gone: the next try starts anew
        raise_for_status(response)
        state = tus_state(response)
        conflicts = 0
    store.remove(key)
    return state.file


def _tus_head(url: str) -> Flow[TusState | None]:
    """Where the upload at `url` is; None if the server no longer has it."""
    response = yield _Call("HEAD", url, headers=dict(TUS))
    if response.status_code in (404, 410):
        return None
    raise_for_status(response)
    return tus_state(response)


def _find_flow(id_or_name: str) -> Flow[dict[str, Any]]:
    """A file's metadata: by id, else the newest file of that name."""
    if not isinstance(id_or_name, str) or not id_or_name:
        raise ValueError("name the file: its id or its name")
    missing: HTTPStatusError | None = None
    if valid_id(id_or_name):
        response = yield _Call("GET", f"/files/{id_or_name}/meta")
        if response.status_code != 404:
            return _file_meta(_json_answer(response), response)
        missing = status_error(response)  # perhaps a name that looks like an id
    response = yield _Call("GET", "/files", params={"name": id_or_name})
    answer = _json_answer(response)
    # Compared here too: a server without `?name=` answers the whole list.
    named = [
        meta
        for meta in (answer if isinstance(answer, list) else [])
        if isinstance(meta, dict) and meta.get("name") == id_or_name
    ]
    if named:
        return _file_meta(named[0], response)
    if missing is not None:
        raise missing
    raise HTTPStatusError(
        404,
        f"no file has the id or name {id_or_name!r}; files() lists them",
        method="GET",
        url=str(response.request.url),
    )


def _download_flow(
    id_or_name: str,
    dest: str | os.PathLike[str] | None,
    *,
    resume: bool,
    progress: Progress | None,
) -> Flow[Path]:
    wanted = _Wanted.of((yield from _find_flow(id_or_name)))
    tick = _Ticker(progress, wanted.size)
    with PartFile(
        destination(dest, wanted.name),
        size=wanted.size,
        sha256=wanted.sha256,
        label=wanted.id,
        resume=resume,
        tick=tick,
    ) as part:
        tick(part.done)
        if part.done < wanted.size:
            # Ranges of an encoded body would be ranges of the encoding.
            headers = {"Accept-Encoding": "identity"}
            if part.done:
                headers["Range"] = f"bytes={part.done}-"
                # The ETag is the sha256: if the file changed, a 200 sends it whole.
                headers["If-Range"] = f'"{wanted.sha256}"'
            accepted = False

            def accept(response: httpx.Response) -> _Sink | None:
                """Whether the answer's body is to be written (else it is an error)."""
                nonlocal accepted
                if response.status_code == 206 and part.done:
                    if _range_start(response) != part.done:
                        raise ProtocolError(
                            f"asked for bytes {part.done}- of {wanted.id}, got"
                            f" {response.headers.get('content-range')!r}"
                        )
                elif response.status_code == 200:
                    part.restart()
                else:
                    return None
                accepted = True
                return part

            response = yield _Call("GET", f"/files/{wanted.id}", headers=headers, into=accept)
            if not accepted:
                raise_for_status(response)
                raise ProtocolError(
                    f"GET {response.request.url} answered {response.status_code}, not the file"
                )
        target = part.finish()
        tick.end(part.done)
        return target


# -- the I/O loops ---------------------------------------------------------


@contextmanager
def _larger_reads(response: httpx.Response) -> Iterator[None]:
    """While in the block, `response`'s connection reads `DOWNLOAD_READ` bytes at a time.

    httpcore has no setting for it, so the HTTP/1.1 connection under the
    response is found through httpx's and httpcore's stream wrappers (by
    their private names) and given its own `READ_NUM_BYTES`, then its
    class's back: other requests on the connection read as httpcore would.
    Where the wrappers differ (HTTP/2, a mock transport, another version),
    nothing changes and the body is read 64 KiB at a time, as before.
    """
    # httpx's BoundSyncStream -> its ResponseStream -> httpcore's PoolByteStream
    # -> HTTP11ConnectionByteStream, whose `_connection` it is.
    layer: Any = response.stream
    for name in ("_stream", "_httpcore_stream", "_stream", "_connection"):
        layer = getattr(layer, name, None)
    connection = layer
    if not isinstance(getattr(connection, "READ_NUM_BYTES", None), int):
        yield
        return
    connection.READ_NUM_BYTES = max(connection.READ_NUM_BYTES, DOWNLOAD_READ)
    try:
        yield
    finally:
        del connection.READ_NUM_BYTES


@dataclass(frozen=True, slots=True)
class _Return(Generic[T]):
    value: T


def _step(flow: Flow[T], response: httpx.Response | None) -> _Call | _Return[T]:
    """The flow's next call, or what it returned.

    Its return is not let out as `StopIteration`, which cannot cross from a
    thread into an asyncio future.
    """
    try:
        return flow.send(response)  # type: ignore[arg-type]  # None starts it
    except StopIteration as stop:
        return _Return(stop.value)


def _run(http: httpx.Client, flow: Flow[T]) -> T:
    try:
        step = _step(flow, None)
        while isinstance(step, _Call):
            step = _step(flow, _send(http, step))
        return step.value
    finally:
        flow.close()


def _send(http: httpx.Client, call: _Call) -> httpx.Response:
    with translate():
        request = http.build_request(
            call.method,
            call.url,
            headers=call.headers,
            params=call.params,
            content=call.content,
        )
        response = http.send(request, stream=call.into is not None)
        if call.into is not None:
            try:
                sink = call.into(response)
                if sink is None:
                    response.read()
                else:
                    with _larger_reads(response):
                        for data in response.iter_bytes():
                            if (backlog := sink.write(data)) is not None:
                                backlog.result()
            finally:
                response.close()
        return response


_Offload: TypeAlias = Callable[..., Awaitable[Any]]


async def _arun(http: httpx.AsyncClient, flow: Flow[T]) -> T:
    # The flow, and all it calls between requests, runs in one thread of its
    # own: in order, and never two steps at once. The event loop only sends
    # requests and receives answers.
    loop = asyncio.get_running_loop()
    local = ThreadPoolExecutor(1, thread_name_prefix="tidewire-flow")

    def offload(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return loop.run_in_executor(local, fn, *args)

    try:
        step: _Call | _Return[T] = await offload(_step, flow, None)
        while isinstance(step, _Call):
            step = await offload(_step, flow, await _asend(http, step, offload))
        return step.value
    finally:
        # Queued behind a step still running (when this task was cancelled
        # during it): closing runs the flow's cleanup, which may wait too.
        await offload(flow.close)
        local.shutdown(wait=False)


async def _asend(http: httpx.AsyncClient, call: _Call, offload: _Offload) -> httpx.Response:
    with translate():
        content = call.content
        request = http.build_request(
            call.method,
            call.url,
            headers=call.headers,
            params=call.params,
            # httpx takes only async iterators as an async client's body.
            content=_aiter(content, offload) if isinstance(content, Iterator) else content,
        )
        response = await http.send(request, stream=call.into is not None)
        if call.into is not None:
            try:
                sink = await offload(call.into, response)
                if sink is None:
                    await response.aread()
                else:
                    with _larger_reads(response):
                        async for data in response.aiter_bytes():
                            if (backlog := sink.write(data)) is not None:
                                await asyncio.wrap_future(backlog)
            finally:
                await response.aclose()
        return response


async def _aiter(chunks: Iterator[bytes], offload: _Offload) -> AsyncIterator[bytes]:
    # Each step reads the file (and may wait for the read ahead): off the loop.
    try:
        while (chunk := await offload(next, chunks, None)) is not None:
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await offload(close)


# -- the public twins ------------------------------------------------------


def upload(
    http: httpx.Client,
    source: Source,
    *,
    name: str | None = None,
    type: str | None = None,
    progress: Progress | None = None,
    tus_threshold: int = TUS_THRESHOLD,
    chunk_size: int = PATCH_SIZE,
    resume_store: UploadStore | None = None,
) -> dict[str, Any]:
    """Upload a file (a path, or a file object opened with 'rb'); its metadata.

    Files of `tus_threshold` bytes or more go by tus, resumably: run the same
    upload again after an interruption, even from another process, and it
    goes on from where the server got to. The sha256 the server reports is
    checked against the bytes read here (`ChecksumMismatch`).
    """
    return _run(
        http,
        _upload_flow(
            source,
            name=name,
            type=type,
            server=str(http.base_url),
            progress=progress,
            tus_threshold=tus_threshold,
            chunk_size=chunk_size,
            store=resume_store,
        ),
    )


async def aupload(
    http: httpx.AsyncClient,
    source: Source,
    *,
    name: str | None = None,
    type: str | None = None,
    progress: Progress | None = None,
    tus_threshold: int = TUS_THRESHOLD,
    chunk_size: int = PATCH_SIZE,
    resume_store: UploadStore | None = None,
) -> dict[str, Any]:
    """`upload`, for an async client."""
    return await _arun(
        http,
        _upload_flow(
            source,
            name=name,
            type=type,
            server=str(http.base_url),
            progress=progress,
            tus_threshold=tus_threshold,
            chunk_size=chunk_size,
            store=resume_store,
        ),
    )


def download(
    http: httpx.Client,
    id_or_name: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    resume: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Download a file, by id or (the newest of that) name; the path written.

    `dest`: a folder (the file keeps a safe form of its name), or a file's
    path; by default the current folder. The bytes go to `<path>.part`, which
    becomes `<path>` once its sha256 is right (else `ChecksumMismatch`, and
    the `.part` is removed). With `resume`, a `.part` left by an interrupted
    download is continued rather than started again.
    """
    return _run(http, _download_flow(id_or_name, dest, resume=resume, progress=progress))


async def adownload(
    http: httpx.AsyncClient,
    id_or_name: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    resume: bool = True,
    progress: Progress | None = None,
) -> Path:
    """`download`, for an async client."""
    return await _arun(http, _download_flow(id_or_name, dest, resume=resume, progress=progress))


def find(http: httpx.Client, id_or_name: str) -> dict[str, Any]:
    """A file's metadata, by id or (the newest of that) name; `HTTPStatusError` 404 if none."""
    return _run(http, _find_flow(id_or_name))


async def afind(http: httpx.AsyncClient, id_or_name: str) -> dict[str, Any]:
    """`find`, for an async client."""
    return await _arun(http, _find_flow(id_or_name))
