"""Streams and runs.

A *stream* is a registered generator function (`stream`); a *run* is one
execution of it, writing its events into a log that any number of watchers
read. `sources` runs the generators (sync ones in a thread each), `local`
owns the runs of this process, and `cluster` what involves the others that
share its broker: leases, watchers' positions, cancels from elsewhere.
"""

from .cluster import CancelNotConfirmed
from .local import Run, Runs, TooManyRuns, Watcher
from .stream import RESERVED_PARAMS, StreamFunction, encode_item

__all__ = [
    "RESERVED_PARAMS",
    "CancelNotConfirmed",
    "Run",
    "Runs",
    "StreamFunction",
    "TooManyRuns",
    "Watcher",
    "encode_item",
]
