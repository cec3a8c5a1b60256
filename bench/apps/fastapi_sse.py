"""Baseline (b): plain FastAPI endpoints using FastAPI's built-in `fastapi.sse`.

Events carry the same `id`, `event` and `data` as tidewire's, so the bytes per event match.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

from fastapi import FastAPI
from fastapi.sse import EventSourceResponse, ServerSentEvent

from .image import blob

app = FastAPI()
IMG = blob()


@app.get("/stream", response_class=EventSourceResponse)
async def stream(n: int = 50000, interval: float = 0.0) -> AsyncIterator[ServerSentEvent]:
    for i in range(n):
        if interval:
            await asyncio.sleep(interval)
        yield ServerSentEvent(id=str(i), event="message", data={"text": str(i), "img": IMG})
    yield ServerSentEvent(id=str(n), event="end", data={})


@app.get("/paced", response_class=EventSourceResponse)
async def paced(n: int = 20, interval: float = 0.05) -> AsyncIterator[ServerSentEvent]:
    for i in range(n):
        await asyncio.sleep(interval)
        yield ServerSentEvent(id=str(i), event="message", data={"text": str(i)})
    yield ServerSentEvent(id=str(n), event="end", data={})


@app.get("/paced_sync", response_class=EventSourceResponse)
def paced_sync(n: int = 20, interval: float = 0.05) -> Iterator[ServerSentEvent]:
    # The original's style (blocking sleep): FastAPI runs it in its thread pool.
    for i in range(n):
        time.sleep(interval)
        yield ServerSentEvent(id=str(i), event="message", data={"text": str(i)})
    yield ServerSentEvent(id=str(n), event="end", data={})


@app.get("/idle", response_class=EventSourceResponse)
async def idle() -> AsyncIterator[ServerSentEvent]:
    # Never yields: FastAPI sends its `: ping` keepalive while the watcher stays connected.
    await asyncio.Event().wait()
    yield ServerSentEvent(comment="unreachable")
