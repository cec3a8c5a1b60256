"""The protocol's literals, defined once: header names, event types, media types, tus constants.

Server, client and CLI spell these the same way because they read them from
here (docs/http.md is the contract they spell). Pure constants: this module
imports nothing, so the client can use it without loading a web framework.
Header names are written as the contract writes them; HTTP compares them
case-insensitively, and ASGI sends them lowercased.
"""

from __future__ import annotations

__all__ = [
    "AFTER_HEADER",
    "CANCELLED",
    "END",
    "ERROR",
    "FILE_HEADER",
    "GAP",
    "LAST_EVENT_ID",
    "NDJSON",
    "NEXT_CURSOR_HEADER",
    "OFFSET_STREAM",
    "POSITION",
    "RESERVED_EVENTS",
    "RUN_HEADER",
    "RUN_ID_SEPARATOR",
    "SSE",
    "TERMINAL_EVENTS",
    "TUS_EXTENSIONS",
    "TUS_VERSION",
    "UNAVAILABLE",
    "WARNING_HEADER",
]

# -- headers -----------------------------------------------------------------

#: The run a response streams (start, watch).
RUN_HEADER = "Tidewire-Run"
#: Where a channel subscription began: resume from it to miss nothing.
AFTER_HEADER = "Tidewire-After"
#: The cursor of the next page of `GET /files`.
NEXT_CURSOR_HEADER = "Tidewire-Next-Cursor"
#: The file a finished tus upload became.
FILE_HEADER = "Tidewire-File"
#: Where a reader resumes (what EventSource sends back); wins over `?after=`.
LAST_EVENT_ID = "Last-Event-ID"
#: Something the client asked for was taken otherwise (an id ahead of the log).
WARNING_HEADER = "Tidewire-Warning"

# -- media types ---------------------------------------------------------------

#: One `{id, event, data}` envelope per line.
NDJSON = "application/x-ndjson"
#: Server-sent events (what `Accept` asks for, without parameters).
SSE = "text/event-stream"

# -- event types -----------------------------------------------------------------

#: A run finished; its last event.
END = "end"
#: A run failed (`{"type", "message"}`); its last event.
ERROR = "error"
#: A run was cancelled; its last event.
CANCELLED = "cancelled"
#: This reader fell behind the retained history (`{"missed": N}`).
GAP = "gap"
#: Not an event of the log (no id): the broker is unreachable; resume later.
UNAVAILABLE = "unavailable"
#: SSE only, with empty data: the block that gives a response's starting
#: position as its id before there is any event (browsers dispatch nothing).
POSITION = "position"

# -- ids -------------------------------------------------------------------------

#: A run's event ids are `<run id>.<the log's id>`, so that one names its run.
RUN_ID_SEPARATOR = "."

#: The events that end a run's log.
TERMINAL_EVENTS = frozenset({END, ERROR, CANCELLED})
#: Event types only the server emits: publishers and producers may not use them.
RESERVED_EVENTS = frozenset({*TERMINAL_EVENTS, GAP, UNAVAILABLE})

# -- tus -------------------------------------------------------------------------

#: The one tus version spoken (`Tus-Resumable`, `Tus-Version`).
TUS_VERSION = "1.0.0"
#: `Tus-Extension`: what the server supports beyond the core protocol.
TUS_EXTENSIONS = ("creation", "creation-with-upload", "termination", "checksum", "expiration")
#: The body type of a PATCH (and of a POST carrying the first bytes).
OFFSET_STREAM = "application/offset+octet-stream"
