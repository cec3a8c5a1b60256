"""tidewire: stream Python generators, channels and files over NDJSON, SSE and WebSocket.

The names here are the user's API. Brokers (`tidewire.broker`), storages
(`tidewire.storage`) and the rest stay importable from their modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import Tidewire
    from .client import AsyncClient, Client
    from .config import Settings
    from .events import Blob, Message

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Blob", "Client", "Message", "Settings", "Tidewire", "__version__"]


#: Where each name of the API lives. Each is loaded on first use, so that
#: importing any part of tidewire loads only that part: `import
#: tidewire.client` (a script, the CLI's client commands) loads neither the
#: server side (FastAPI, Starlette) nor `Settings` (pydantic-settings).
_HOMES = {
    "AsyncClient": ".client",
    "Blob": ".events",
    "Client": ".client",
    "Message": ".events",
    "Settings": ".config",
    "Tidewire": ".app",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tidewire' has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # found here from now on, without this function
    return value
