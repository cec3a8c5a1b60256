"""Long-lived responses run at the top of the app, below none of its layers' frames.

An idle subscription's memory is what bounds how many a server holds (bench
W4), and most of it was the stack of the request: every middleware and
routing layer between the server and the endpoint is a coroutine frame (with
its locals) that stays alive for as long as the stream is open, about 25 of
them in tidewire's app, which FastAPI and Starlette add to.

So a `LeanEndpoint` does not run its stream where it was routed. It leaves
the response, with the `receive` and `send` it was given, in the request's
`Handoff` and returns; every layer then returns too, and the app's outermost
call (`Tidewire.app`, the one place that runs the hand-offs) runs the
response in its own frame. The `send` it runs with is still the one the
endpoint got: each layer's wrapper (request id, CORS headers, `Connection:
close` while draining, no-store marks) still sees the response's start, only
their frames are gone. What those layers do is done at the start (the app
hands off only when it holds no other), so a stream (transport.LogResponse)
writes the rest below them, with the server's own `send`, and keeps none of
their wrappers while it is open.

What a layer does when a request ends (its `finally`: the access line, the
in-flight count, the connection slot) must then wait for the stream's end: a
layer whose request was handed off gives that to `Handoff.after`
(`handed_off()` says whether it was). Layers that know nothing of this would
run theirs too early, so the app hands off only when every middleware it
holds is one of those that do (`Tidewire.app`); elsewhere (`tw.router` in
another app) no `Handoff` is current, and a `LeanEndpoint` runs its response
where it is, as any endpoint does.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Send

__all__ = ["HANDOFF", "Cleanup", "Handoff", "hand_off", "handed_off"]

#: What a layer runs once a handed-off response has ended: given the
#: exception it ended with, if any (then re-raised after every cleanup).
Cleanup = Callable[[BaseException | None], Awaitable[None]]


class Handoff:
    """One request's hand-off: the response left to run, and what runs after it.

    Slots: one of these stays alive with every open stream."""

    __slots__ = ("cleanups", "receive", "response", "send")

    def __init__(self) -> None:
        self.response: Response | None = None
        self.receive: Receive | None = None
        self.send: Send | None = None
        self.cleanups: list[Cleanup] = []

    def after(self, cleanup: Cleanup) -> None:
        """Run `cleanup` when the handed-off response ends (innermost layer first,
        as their `finally` blocks would have run)."""
        self.cleanups.append(cleanup)

    async def ended(self, error: BaseException | None) -> None:
        """The handed-off response has ended (`error`: how): run every cleanup."""
        self.response = self.receive = self.send = None
        failed: BaseException | None = None
        for cleanup in self.cleanups:
            # Each runs whatever the one before did, as nested `finally` blocks
            # would: a failed access line must not keep a connection slot held.
            try:
                await cleanup(error)
            except BaseException as exc:  # re-raised below, once all have run
                failed = failed or exc
        if failed is not None:
            raise failed


#: The current request's `Handoff`, where the app offers one (`Tidewire.app`).
#: Set in the request's own task: the server runs each request in a task of
#: its own, with a context of its own.
HANDOFF: contextvars.ContextVar[Handoff | None] = contextvars.ContextVar(
    "tidewire_handoff", default=None
)


def hand_off(response: Response, receive: Receive, send: Send) -> bool:
    """Leave `response` for the app's top to run; False (run it yourself) where
    no hand-off is offered."""
    handoff = HANDOFF.get()
    if handoff is None or handoff.response is not None:
        return False
    handoff.response, handoff.receive, handoff.send = response, receive, send
    return True


def handed_off() -> Handoff | None:
    """The current request's `Handoff` if its response was handed off (for a
    layer whose inner app just returned: its cleanup goes to `Handoff.after`)."""
    handoff = HANDOFF.get()
    if handoff is None or handoff.response is None:
        return None
    return handoff
