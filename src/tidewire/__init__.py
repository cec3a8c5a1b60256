"""tidewire: stream Python generators, channels and files over NDJSON, SSE and WebSocket.

The names here are the user's API. Brokers (`tidewire.broker`), storages
(`tidewire.storage`) and the rest stay importable from their modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import AsyncClient, Client
from .config import Settings
from .events import Blob, Message

if TYPE_CHECKING:
    from .app import Tidewire

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Blob", "Client", "Message", "Settings", "Tidewire", "__version__"]


def __getattr__(name: str) -> Any:
    # The server side is loaded on first use, so that `import tidewire.client`
    # (a script, the CLI's client commands) does not load FastAPI and Starlette.
    if name == "Tidewire":
        from .app import Tidewire

        return Tidewire
    raise AttributeError(f"module 'tidewire' has no attribute {name!r}")
