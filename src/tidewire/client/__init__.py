"""tidewire's Python client: `Client` and its asyncio twin `AsyncClient`.

```python
from tidewire.client import Client

with Client("http://127.0.0.1:8000") as tw:
    with tw.stream("demo", n=3) as events:
        for event in events:
            print(event.id, event.event, event.data)
    meta = tw.upload("photo.jpg", progress=lambda done, total: print(done, total))
    tw.download(meta["id"], "copy.jpg")
```

Errors are in `tidewire.client.exceptions`, one tree under `TidewireError`.
"""

from ._client import AsyncClient, AsyncStream, Client, Stream
from ._models import Event, RemoteBlob
from .exceptions import (
    ChecksumMismatch,
    ConnectError,
    Disconnected,
    HTTPStatusError,
    ProtocolError,
    ReadTimeout,
    RunFailed,
    StreamError,
    StreamGap,
    TidewireError,
    TransportError,
)

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "ChecksumMismatch",
    "Client",
    "ConnectError",
    "Disconnected",
    "Event",
    "HTTPStatusError",
    "ProtocolError",
    "ReadTimeout",
    "RemoteBlob",
    "RunFailed",
    "Stream",
    "StreamError",
    "StreamGap",
    "TidewireError",
    "TransportError",
]
