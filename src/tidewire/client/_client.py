"""`Client` and `AsyncClient`: twins with the same methods, on httpx and websockets.

Each is the I/O around the same pure pieces: `Session` decides what a stream
requests and what its bytes mean, `_transfers` plans uploads and downloads,
`_BaseClient` and `_BaseStream` hold what the twins keep, and the request
builders below are shared. Where the twins differ is only in `await`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Generic, Literal, Self, TypeVar
from urllib.parse import quote

import httpx
import orjson

from ..events import dump_data
from ..wire import NEXT_CURSOR_HEADER
from . import _transfers
from ._auth import BearerAuth, Token, TokenSource
from ._files import Source
from ._models import Event, decode
from ._session import Session, Target, Transport, accept
from ._transfers import Progress
from .exceptions import (
    ConnectError,
    HTTPStatusError,
    TransportError,
    raise_for_status,
    retry_after,
    status_error,
    translate,
)

if TYPE_CHECKING:
    # websockets is imported where a WebSocket is opened: a client that only
    # moves files (`tidewire download`) starts without it.
    import websockets
    from websockets.asyncio.client import ClientConnection as AsyncWebSocket
    from websockets.sync.client import ClientConnection as WebSocket

__all__ = ["AsyncClient", "AsyncStream", "Client", "Stream"]

DEFAULT_URL = "http://127.0.0.1:8000"

#: A file to publish with an event: a path, bytes, or (filename, bytes or file, type).
FileSpec = str | os.PathLike[str] | bytes | tuple[str, bytes | IO[bytes], str]
GapPolicy = Literal["raise", "yield"]


H = TypeVar("H", httpx.Client, httpx.AsyncClient)


class _BaseClient(Generic[H]):
    """What `Client` and `AsyncClient` share: their settings, and how a stream begins."""

    #: The httpx client class this one wraps.
    _http: Callable[..., H]

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float = 10.0,
        stream_timeout: float = 60.0,
        retries: int = 10,
        headers: Mapping[str, str] | None = None,
        token: TokenSource | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self.stream_timeout = stream_timeout
        self._headers = dict(headers or {})
        if token is not None and any(k.lower() == "authorization" for k in self._headers):
            raise ValueError("give the token as token=, not also as an Authorization header")
        self._stream_timeouts = httpx.Timeout(timeout, read=stream_timeout)
        self.http: H = self._http(base_url=self.url, timeout=timeout, headers=self._headers)
        #: The token, if any: sent as `Authorization: Bearer` to this server only.
        self.token: Token | None = None
        if token is not None:
            self.token = Token(token)
            self.http.auth = BearerAuth(self.token, self.http.base_url)

    def _run_session(
        self, name: str, params: dict[str, Any], transport: Transport, on_gap: GapPolicy
    ) -> Session:
        path = f"/streams/{_segment(name)}"
        if transport == "ws":
            start = Target("WS", f"{path}/ws", {k: _text(v) for k, v in params.items()})
        else:
            # POST with a JSON body keeps the parameters' types exactly.
            start = Target("POST", path, json=params, headers=accept(transport))
        return self._session(transport, on_gap, start=start)

    def _session(self, transport: Transport, on_gap: GapPolicy, **where: Any) -> Session:
        """A stream's session; `where`: a run to `start`, or a `run_id` or `channel` and `after`."""
        http = self.http
        return Session(
            transport,
            lambda value: decode(value, http),
            retries=self.retries,
            on_gap=on_gap,
            **where,
        )


class _BaseStream:
    """What `Stream` and `AsyncStream` share: the session, and what it knows."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._started = False

    @property
    def run_id(self) -> str | None:
        """The run being followed (None for a channel)."""
        return self._session.run_id

    @property
    def last_id(self) -> str | None:
        """The id of the last event delivered: where a reconnect resumes."""
        return self._session.last_id

    @property
    def reconnects(self) -> int:
        """How many times the connection was made again."""
        return self._session.reconnects

    def _run_to_cancel(self) -> str:
        if self.run_id is None:
            raise TypeError("only a run can be cancelled; this stream follows a channel")
        return self.run_id

    def _opened(self, headers: Mapping[str, str]) -> None:
        self._session.opened(headers)
        self._started = True


class Client(_BaseClient[httpx.Client]):
    """A tidewire server, seen from Python.

    ```python
    with Client("http://127.0.0.1:8000") as tw:
        with tw.stream("demo", n=5) as events:
            for event in events:
                print(event.id, event.data)
    ```

    `timeout` bounds connecting and every ordinary request; `stream_timeout`
    bounds the silence on a stream, so it must be longer than the server's
    heartbeat (15 s by default; the default here is 60 s). A stream whose
    connection drops reconnects by itself, up to `retries` times in a row,
    resuming after the last event it delivered.

    `token`: for a server with access control, a token (JWT) or a callable
    returning the current one. It is sent as `Authorization: Bearer` on every
    request and WebSocket handshake to this server (to no other). A callable
    is called again when a stream reconnects and when the server answers 401
    (the request is then sent once more), so a stream outlives its token.
    """

    _http = httpx.Client

    # -- streams ----------------------------------------------------------------------

    def stream(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        *,
        transport: Transport = "ndjson",
        on_gap: GapPolicy = "raise",
        **kwargs: Any,
    ) -> Stream:
        """Start a run of stream `name` and follow it: `with client.stream(...) as events:`."""
        return Stream(
            self, self._run_session(name, {**(params or {}), **kwargs}, transport, on_gap)
        )

    def watch(
        self,
        run_id: str,
        after: str | None = None,
        *,
        transport: Transport = "ndjson",
        on_gap: GapPolicy = "raise",
    ) -> Stream:
        """Follow a run that is already started: its history after `after`, then live."""
        return Stream(self, self._session(transport, on_gap, run_id=run_id, after=after))

    def subscribe(
        self,
        channel: str,
        after: str | None = None,
        *,
        transport: Transport = "ndjson",
        on_gap: GapPolicy = "raise",
    ) -> Stream:
        """Follow a channel: live from now, or after `after` (`"0"`: all it retains)."""
        return Stream(self, self._session(transport, on_gap, channel=channel, after=after))

    def publish(
        self,
        channel: str,
        data: Any = None,
        *,
        event: str | None = None,
        files: Mapping[str, FileSpec] | None = None,
    ) -> str:
        """Publish an event to a channel; returns its id."""
        with _publish_request(channel, data, event, files) as request:
            return str(self._request(**request)["id"])

    def streams(self) -> list[dict[str, Any]]:
        """The server's streams, with the JSON Schema of their parameters."""
        return list(self.get("/streams"))

    def run(self, run_id: str) -> dict[str, Any]:
        """A run's state: `{"id", "stream", "state", "events", "created", "ended"}`."""
        return dict(self.get(_run_path(run_id)))

    def cancel(self, run_id: str) -> dict[str, Any]:
        """Cancel a run; returns once its generator is closed. An ended run is left as is."""
        response = self._send("DELETE", _run_path(run_id))
        if response.status_code == 409:
            return self.run(run_id)
        raise_for_status(response)
        return dict(response.json())

    # -- files --------------------------------------------------------------------------

    def upload(
        self,
        source: Source,
        *,
        name: str | None = None,
        type: str | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Upload a file (multipart when small, resumable tus when large); its metadata."""
        return _transfers.upload(self.http, source, name=name, type=type, progress=progress)

    def download(
        self,
        file: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        resume: bool = True,
        progress: Progress | None = None,
    ) -> Path:
        """Download a file by id or name; continues a partial download; checks its sha256."""
        return _transfers.download(self.http, file, dest, resume=resume, progress=progress)

    def files(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Files' metadata, newest first (all of them, or the first `limit`)."""
        found: list[dict[str, Any]] = []
        params = _page_params(limit, found, None)
        while params is not None:
            response = self._send("GET", "/files", params=params)
            raise_for_status(response)
            found.extend(response.json())
            params = _page_params(limit, found, response)
        return found

    def delete(self, file_id: str) -> None:
        """Delete a file."""
        raise_for_status(self._send("DELETE", f"/files/{_segment(file_id)}"))

    # -- anything else ---------------------------------------------------------------------

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET a path of the server; its JSON (or text). 4xx/5xx raise `HTTPStatusError`."""
        return self._request("GET", path, params=params)

    def post(
        self,
        path: str,
        params: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        json: Any = None,
    ) -> Any:
        """POST to a path of the server (`data`: a form, `json`: a JSON body)."""
        return self._request("POST", path, params=params, data=data, json=json)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with translate():
            return self.http.request(method, path, **kwargs)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        raise_for_status(response)
        return _result(response)

    # -- connections for Stream ------------------------------------------------------------

    def _open(self, target: Target) -> tuple[Mapping[str, str], Generator[bytes | str]]:
        if target.method == "WS":
            import websockets

            sent = self.token.get() if self.token is not None else None
            try:
                ws = self._open_ws(target, sent)
            except websockets.InvalidStatus as exc:
                if not (_unauthorized(exc) and self.token is not None and self.token.refreshable):
                    raise _ws_error(exc, target) from exc
                try:  # once more, with a new token: as BearerAuth does for HTTP
                    ws = self._open_ws(target, self.token.refresh(sent))
                except Exception as again:
                    raise _ws_error(again, target) from again
            except Exception as exc:
                raise _ws_error(exc, target) from exc
            assert ws.response is not None
            return ws.response.headers, _ws_frames(ws)
        request = self.http.build_request(
            target.method,
            target.path,
            params=target.params,
            json=target.json,
            headers=target.headers,
            timeout=self._stream_timeouts,
        )
        with translate():
            response = self.http.send(request, stream=True)
        if response.status_code >= 400:
            with translate():
                response.read()
            response.close()
            raise status_error(response)
        return response.headers, _http_chunks(response)

    def _open_ws(self, target: Target, token: str | None) -> WebSocket:
        from websockets.sync.client import connect as connect_ws

        # Entered by hand: the connection outlives this call, and is closed
        # by the generator that reads it.
        ws: WebSocket = connect_ws(
            _ws_url(self.url, target),
            additional_headers=_with_token(self._headers, token),
            open_timeout=self.http.timeout.connect,
            **_WS_OPTIONS,
            ping_interval=self.stream_timeout / 2,
            ping_timeout=self.stream_timeout / 2,
        ).__enter__()
        return ws

    def _refresh_token(self) -> None:
        if self.token is not None:
            self.token.refresh(self.token.current)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient(_BaseClient[httpx.AsyncClient]):
    """`Client`'s twin for asyncio: the same methods, awaited.

    ```python
    async with AsyncClient("http://127.0.0.1:8000") as tw:
        async with tw.stream("demo", n=5) as events:
            async for event in events:
                print(event.id, event.data)
    ```
    """

    _http = httpx.AsyncClient

    # -- streams ----------------------------------------------------------------------

    def stream(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        *,
        transport: Transport = "ndjson",
        on_gap: GapPolicy = "raise",
        **kwargs: Any,
    ) -> AsyncStream:
        """Start a run of stream `name` and follow it: `async with client.stream(...)`."""
        session = self._run_session(name, {**(params or {}), **kwargs}, transport, on_gap)
        return AsyncStream(self, session)

    def watch(
        self,
        run_id: str,
        after: str | None = None,
        *,
        transport: Transport = "ndjson",
        on_gap: GapPolicy = "raise",
    ) -> AsyncStream:
        """Follow a run that is already started: its history after `after`, then live."""
        return AsyncStream(self, self._session(transport, on_gap, run_id=run_id, after=after))

    def subscribe(
        self,
        channel: str,
        after: str | None = None,
        *,
        transport: Transport = "ndjson",
        on_gap: GapPolicy = "raise",
    ) -> AsyncStream:
        """Follow a channel: live from now, or after `after` (`"0"`: all it retains)."""
        return AsyncStream(self, self._session(transport, on_gap, channel=channel, after=after))

    async def publish(
        self,
        channel: str,
        data: Any = None,
        *,
        event: str | None = None,
        files: Mapping[str, FileSpec] | None = None,
    ) -> str:
        """Publish an event to a channel; returns its id."""
        with _publish_request(channel, data, event, files) as request:
            return str((await self._request(**request))["id"])

    async def streams(self) -> list[dict[str, Any]]:
        """The server's streams, with the JSON Schema of their parameters."""
        return list(await self.get("/streams"))

    async def run(self, run_id: str) -> dict[str, Any]:
        """A run's state: `{"id", "stream", "state", "events", "created", "ended"}`."""
        return dict(await self.get(_run_path(run_id)))

    async def cancel(self, run_id: str) -> dict[str, Any]:
        """Cancel a run; returns once its generator is closed. An ended run is left as is."""
        response = await self._send("DELETE", _run_path(run_id))
        if response.status_code == 409:
            return await self.run(run_id)
        raise_for_status(response)
        return dict(response.json())

    # -- files --------------------------------------------------------------------------

    async def upload(
        self,
        source: Source,
        *,
        name: str | None = None,
        type: str | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Upload a file (multipart when small, resumable tus when large); its metadata."""
        return await _transfers.aupload(self.http, source, name=name, type=type, progress=progress)

    async def download(
        self,
        file: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        resume: bool = True,
        progress: Progress | None = None,
    ) -> Path:
        """Download a file by id or name; continues a partial download; checks its sha256."""
        return await _transfers.adownload(self.http, file, dest, resume=resume, progress=progress)

    async def files(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Files' metadata, newest first (all of them, or the first `limit`)."""
        found: list[dict[str, Any]] = []
        params = _page_params(limit, found, None)
        while params is not None:
            response = await self._send("GET", "/files", params=params)
            raise_for_status(response)
            found.extend(response.json())
            params = _page_params(limit, found, response)
        return found

    async def delete(self, file_id: str) -> None:
        """Delete a file."""
        raise_for_status(await self._send("DELETE", f"/files/{_segment(file_id)}"))

    # -- anything else ---------------------------------------------------------------------

    async def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET a path of the server; its JSON (or text). 4xx/5xx raise `HTTPStatusError`."""
        return await self._request("GET", path, params=params)

    async def post(
        self,
        path: str,
        params: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        json: Any = None,
    ) -> Any:
        """POST to a path of the server (`data`: a form, `json`: a JSON body)."""
        return await self._request("POST", path, params=params, data=data, json=json)

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with translate():
            return await self.http.request(method, path, **kwargs)

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._send(method, path, **kwargs)
        raise_for_status(response)
        return _result(response)

    # -- connections for AsyncStream --------------------------------------------------------

    async def _open(
        self, target: Target
    ) -> tuple[Mapping[str, str], AsyncIterator[bytes | str], httpx.Response | AsyncWebSocket]:
        if target.method == "WS":
            import websockets

            sent = await self.token.aget() if self.token is not None else None
            try:
                ws = await self._open_ws(target, sent)
            except websockets.InvalidStatus as exc:
                if not (_unauthorized(exc) and self.token is not None and self.token.refreshable):
                    raise _ws_error(exc, target) from exc
                try:  # once more, with a new token: as BearerAuth does for HTTP
                    ws = await self._open_ws(target, await self.token.arefresh(sent))
                except Exception as again:
                    raise _ws_error(again, target) from again
            except Exception as exc:
                raise _ws_error(exc, target) from exc
            assert ws.response is not None
            return ws.response.headers, _async_ws_frames(ws), ws
        request = self.http.build_request(
            target.method,
            target.path,
            params=target.params,
            json=target.json,
            headers=target.headers,
            timeout=self._stream_timeouts,
        )
        with translate():
            response = await self.http.send(request, stream=True)
        if response.status_code >= 400:
            with translate():
                await response.aread()
            await response.aclose()
            raise status_error(response)
        return response.headers, _async_http_chunks(response), response

    async def _open_ws(self, target: Target, token: str | None) -> AsyncWebSocket:
        from websockets.asyncio.client import connect as aconnect_ws

        return await aconnect_ws(
            _ws_url(self.url, target),
            additional_headers=_with_token(self._headers, token),
            open_timeout=self.http.timeout.connect,
            **_WS_OPTIONS,
            ping_interval=self.stream_timeout / 2,
            ping_timeout=self.stream_timeout / 2,
        )

    async def _refresh_token(self) -> None:
        if self.token is not None:
            await self.token.arefresh(self.token.current)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Stream(_BaseStream):
    """Events of a run or channel, across reconnects: iterate it; `with` closes it.

    Entering opens the first connection, so a bad name or parameter raises
    there and `run_id` is known at once. Iterating ends after a run's `end` or
    `cancelled` event, raises `RunFailed` after `error`, and (by default)
    `StreamGap` when events were trimmed before this reader saw them. A
    channel's stream does not end by itself.
    """

    def __init__(self, client: Client, session: Session) -> None:
        super().__init__(session)
        self._client = client
        self._chunks: Generator[bytes | str] | None = None

    def cancel(self) -> dict[str, Any]:
        """Cancel the run; the stream then ends with its `cancelled` event."""
        return self._client.cancel(self._run_to_cancel())

    def __iter__(self) -> Iterator[Event]:
        session = self._session
        while not session.done:
            error: TransportError | HTTPStatusError | None = None
            try:
                if self._chunks is None:
                    self._connect()
                assert self._chunks is not None
                for chunk in self._chunks:
                    yield from session.feed(chunk)
                    if session.done:
                        break
            except (TransportError, HTTPStatusError) as exc:
                if not self._started:
                    raise  # the first connection failed: say so rather than retry
                error = exc
            self._disconnect()
            if not session.done:
                time.sleep(session.dropped(error))

    def _connect(self) -> None:
        if self._started:
            # A reconnect: the token the stream began with may have expired
            # while it ran (the server checks it when a connection starts).
            self._client._refresh_token()
        headers, self._chunks = self._client._open(self._session.target())
        self._opened(headers)

    def _disconnect(self) -> None:
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            chunks.close()

    def close(self) -> None:
        self._disconnect()

    def __enter__(self) -> Self:
        if self._chunks is None and not self._session.done:
            self._connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncStream(_BaseStream):
    """`Stream`'s twin for `AsyncClient`: `async with`, `async for`."""

    def __init__(self, client: AsyncClient, session: Session) -> None:
        super().__init__(session)
        self._client = client
        self._chunks: AsyncIterator[bytes | str] | None = None
        self._conn: httpx.Response | AsyncWebSocket | None = None

    async def cancel(self) -> dict[str, Any]:
        """Cancel the run; the stream then ends with its `cancelled` event."""
        return await self._client.cancel(self._run_to_cancel())

    async def __aiter__(self) -> AsyncIterator[Event]:
        session = self._session
        while not session.done:
            error: TransportError | HTTPStatusError | None = None
            try:
                if self._chunks is None:
                    await self._connect()
                assert self._chunks is not None
                async for chunk in self._chunks:
                    for event in session.feed(chunk):
                        yield event
                    if session.done:
                        break
            except (TransportError, HTTPStatusError) as exc:
                if not self._started:
                    raise  # the first connection failed: say so rather than retry
                error = exc
            await self._disconnect()
            if not session.done:
                await asyncio.sleep(session.dropped(error))

    async def _connect(self) -> None:
        if self._started:
            # A reconnect: the token the stream began with may have expired
            # while it ran (the server checks it when a connection starts).
            await self._client._refresh_token()
        headers, self._chunks, self._conn = await self._client._open(self._session.target())
        self._opened(headers)

    async def _disconnect(self) -> None:
        conn, self._conn, self._chunks = self._conn, None, None
        if isinstance(conn, httpx.Response):
            await conn.aclose()
        elif conn is not None:
            await conn.close()

    async def aclose(self) -> None:
        await self._disconnect()

    async def __aenter__(self) -> Self:
        if self._chunks is None and not self._session.done:
            await self._connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# -- what the twins share ---------------------------------------------------------------

# No compression: events are mostly base64 and JSON that is decoded once;
# frames may be as large as the inline blob limit allows.
_WS_OPTIONS: dict[str, Any] = {"compression": None, "max_size": 64 << 20}


@contextmanager
def _publish_request(
    channel: str, data: Any, event: str | None, files: Mapping[str, FileSpec] | None
) -> Iterator[dict[str, Any]]:
    """The request of a publish, as keyword arguments; closes the files it opened."""
    request: dict[str, Any] = {
        "method": "POST",
        "path": f"/channels/{_segment(channel)}/events",
        "params": {"event": event} if event else None,
    }
    if not files:
        request["content"] = dump_data(data)
        request["headers"] = {"content-type": "application/json"}
        yield request
        return
    if data is not None and not isinstance(data, Mapping):
        raise TypeError("with files, data must be a mapping of form fields (or None)")
    with ExitStack() as opened:

        def file(spec: FileSpec) -> Any:
            if isinstance(spec, (str, os.PathLike)):
                path = Path(spec)
                return (path.name, opened.enter_context(path.open("rb")))
            if isinstance(spec, bytes):
                return ("blob", spec)
            return spec

        request["data"] = {k: _text(v) for k, v in (data or {}).items()}
        request["files"] = {k: file(v) for k, v in files.items()}
        yield request


def _page_params(
    limit: int | None, found: list[dict[str, Any]], response: httpx.Response | None
) -> dict[str, Any] | None:
    """The query of the next page of `GET /files`, or None when done."""
    if limit is not None and len(found) >= limit:
        del found[limit:]
        return None
    params: dict[str, Any] = {"limit": min(limit - len(found), 1000) if limit else 1000}
    if response is not None:
        cursor = response.headers.get(NEXT_CURSOR_HEADER)
        if not cursor:
            return None
        params["cursor"] = cursor
    return params


def _result(response: httpx.Response) -> Any:
    if response.status_code == 204 or not response.content:
        return None
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return response.text


def _run_path(run_id: str) -> str:
    return f"/runs/{_segment(run_id)}"


def _segment(value: str) -> str:
    return quote(value, safe="")


def _text(value: Any) -> str:
    """A query or form value: a string as it is, anything else as JSON."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _ws_url(base: str, target: Target) -> str:
    url = httpx.URL(base + target.path, params=target.params)
    return str(url.copy_with(scheme="wss" if url.scheme == "https" else "ws"))


def _with_token(headers: Mapping[str, str], token: str | None) -> dict[str, str]:
    """A handshake's headers: the header, not `?access_token=`, which servers may log."""
    return {**headers, "Authorization": f"Bearer {token}"} if token else dict(headers)


def _unauthorized(exc: websockets.InvalidStatus) -> bool:
    return exc.response.status_code == 401


def _ws_error(exc: Exception, target: Target) -> Exception:
    """A failed WebSocket handshake as the error an HTTP request would give."""
    import websockets

    if isinstance(exc, websockets.InvalidStatus):
        response = exc.response
        try:
            detail: Any = orjson.loads(response.body or b"").get("detail")
        except (orjson.JSONDecodeError, AttributeError):
            detail = (response.body or b"").decode("utf-8", "replace") or response.reason_phrase
        return HTTPStatusError(
            response.status_code,
            detail,
            method="GET",
            url=target.path,
            retry_after=retry_after(response.headers.get("retry-after")),
        )
    return ConnectError(f"cannot open a WebSocket to {target.path}: {exc}")


def _http_chunks(response: httpx.Response) -> Generator[bytes]:
    try:
        with translate():
            yield from response.iter_bytes()
    finally:
        response.close()


async def _async_http_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    with translate():
        async for chunk in response.aiter_bytes():
            yield chunk


def _ws_frames(ws: WebSocket) -> Generator[bytes | str]:
    import websockets

    try:
        while True:
            try:
                frame = ws.recv()
            except websockets.ConnectionClosedOK:
                return
            except (websockets.ConnectionClosed, OSError) as exc:
                raise TransportError(f"the WebSocket broke: {exc}") from exc
            yield frame
    finally:
        ws.close()


async def _async_ws_frames(ws: AsyncWebSocket) -> AsyncIterator[bytes | str]:
    import websockets

    while True:
        try:
            frame = await ws.recv()
        except websockets.ConnectionClosedOK:
            return
        except (websockets.ConnectionClosed, OSError) as exc:
            raise TransportError(f"the WebSocket broke: {exc}") from exc
        yield frame
