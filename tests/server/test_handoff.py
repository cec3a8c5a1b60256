"""Long-lived responses are handed off (server/handoff.py): an idle stream keeps none of
the request's middleware and routing frames, and every layer still ends it."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable
from typing import Any

import pytest
from starlette.types import Message
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from tidewire import Tidewire
from tidewire.server.caching import _GZip, _Identity
from tidewire.server.drain import _Closing
from tidewire.server.handoff import HANDOFF, Handoff, hand_off
from tidewire.server.origins import _CorsSend
from tidewire.server.protocol import HeaderLimitedProtocol


def await_chain(task: asyncio.Task[Any]) -> list[str]:
    """The coroutines a task is suspended in, outermost first."""
    names = []
    coro: Any = task.get_coro()
    while coro is not None and hasattr(coro, "cr_frame"):
        names.append(coro.__qualname__)
        coro = coro.cr_await
    return names


async def idle_subscription(
    tw: Tidewire, while_idle: Callable[[], None] | None = None
) -> tuple[list[str], list[Message], int, int]:
    """Open `GET /channels/idle/events` on the app, as a server would, and leave:
    the coroutines its task waits in while idle, what was sent, and the requests in
    flight while it was open and after it ended. `while_idle` runs while it is idle."""
    sent: list[Message] = []
    started, gone = asyncio.Event(), asyncio.Event()
    first = True

    async def receive() -> Message:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            started.set()

    path = "/channels/idle/events"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"accept", b"text/event-stream")],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    async with tw.app.router.lifespan_context(tw.app):
        task = asyncio.create_task(tw.app(scope, receive, send))
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.05)  # idle: waiting for the next event
        chain = await_chain(task)
        if while_idle is not None:
            while_idle()
        open_in_flight = tw.drain_state.in_flight
        gone.set()
        await asyncio.wait_for(task, 10)
    return chain, sent, open_in_flight, tw.drain_state.in_flight


def test_an_idle_stream_keeps_no_middleware_or_routing_frame() -> None:
    chain, sent, _, _ = asyncio.run(idle_subscription(Tidewire()))
    # Only the app's top and the response itself (before: every layer, 25 more frames).
    assert chain[0].endswith("__call__") and chain[1] == "LogResponse.__call__", chain
    layers = [name for name in chain if "Middleware" in name or "Router" in name]
    assert layers == [], chain
    assert len(chain) <= 8, chain
    # And every layer still saw the response start: request id, CORS's Vary, no-store left alone.
    start = dict(sent[0]["headers"])
    assert sent[0]["status"] == 200 and b"x-request-id" in start
    assert b"Origin" in start.get(b"vary", b"")


def test_an_idle_stream_keeps_none_of_its_layers_send_wrappers() -> None:
    # They act on the response's start only: once it is sent, a handed-off
    # stream writes below them, and holding them cost ~0.6 KB an idle stream
    # (bench W4). They still saw the start.
    kept: list[str] = []

    def wrappers() -> None:
        gc.collect()
        kinds = (_CorsSend, _Closing, _Identity, _GZip)
        kept.extend(type(o).__name__ for o in gc.get_objects() if isinstance(o, kinds))

    _, sent, _, _ = asyncio.run(idle_subscription(Tidewire(), wrappers))
    assert kept == []
    start = dict(sent[0]["headers"])
    assert sent[0]["type"] == "http.response.start" and b"x-request-id" in start
    assert b"Origin" in start.get(b"vary", b"")
    assert sent[1]["type"] == "http.response.body" and sent[1]["body"].startswith(b"retry:")


def test_a_handed_off_stream_is_in_flight_until_it_ends() -> None:
    _, sent, open_in_flight, after = asyncio.run(idle_subscription(Tidewire()))
    assert (open_in_flight, after) == (1, 0)
    assert sent[-1]["type"] == "http.response.body"


def test_a_stream_runs_where_it_is_routed_when_no_handoff_is_offered() -> None:
    async def offered() -> tuple[bool, bool]:
        response: Any = object()

        async def nothing(*_: Any) -> Any:
            return None

        none = hand_off(response, nothing, nothing)
        token = HANDOFF.set(Handoff())
        try:
            return none, hand_off(response, nothing, nothing)
        finally:
            HANDOFF.reset(token)

    assert asyncio.run(offered()) == (False, True)


def test_the_protocols_own_attributes_do_not_grow_its_dict() -> None:
    # uvicorn's protocol has 27 attributes in its __dict__; past 30 a dict stops sharing
    # its keys and takes 1.6 KB instead of 0.3, with every connection (bench W4).
    async def dicts() -> tuple[dict[str, Any], dict[str, Any]]:
        config = Config(app=_asgi_app)
        config.load()
        theirs = HttpToolsProtocol(config, ServerState(), {})
        ours = HeaderLimitedProtocol(config, ServerState(), {})
        return theirs.__dict__, ours.__dict__

    theirs, ours = asyncio.run(dicts())
    assert set(ours) <= set(theirs)  # ours are all in slots
    # Its keys shared (a few hundred bytes), whatever other tests made of the
    # class's shared keys meanwhile (which moves the size by a few bytes).
    assert sys.getsizeof(ours) < 1024, sys.getsizeof(ours)


async def _asgi_app(scope: Any, receive: Any, send: Any) -> None:
    pass


def test_every_cleanup_runs_when_one_fails_and_the_failure_is_raised_after() -> None:
    handoff = Handoff()
    ran: list[str] = []

    async def failing(_: BaseException | None) -> None:
        ran.append("access line")
        raise RuntimeError("logging failed")

    async def release(_: BaseException | None) -> None:
        ran.append("slot released")

    handoff.after(failing)
    handoff.after(release)
    with pytest.raises(RuntimeError, match="logging failed"):
        asyncio.run(handoff.ended(None))
    assert ran == ["access line", "slot released"]
