"""The HTTP and WebSocket side: routes by concern, the transport that writes logs, and the
pure header, name and multipart logic they share."""

import contextvars

from starlette.types import Send

#: The `send` the app's outermost layer (observe.Observe) was given, below none
#: of the app's own middleware, for the request being served. A stream writes
#: its events there once its first write has gone through them all
#: (transport.LogResponse): the layers inside act on a stream's start only, and
#: each would cost a call per event per subscriber. A context variable, not a
#: scope key: one more key makes every open stream's scope dict grow a size.
SERVER_SEND: contextvars.ContextVar[Send | None] = contextvars.ContextVar(
    "tidewire_server_send", default=None
)
