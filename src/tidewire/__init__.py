"""tidewire: stream Python generators, channels and files over NDJSON, SSE and WebSocket."""

from .app import Tidewire
from .broker import BadPosition, Batch, Broker, Retention
from .broker.memory import MemoryBroker
from .client import AsyncClient, Client
from .config import Settings
from .events import Blob, Event, Message

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BadPosition",
    "Batch",
    "Blob",
    "Broker",
    "Client",
    "Event",
    "MemoryBroker",
    "Message",
    "Retention",
    "Settings",
    "Tidewire",
    "__version__",
]
