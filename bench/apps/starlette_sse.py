"""Baseline (c): `sse-starlette`'s EventSourceResponse over async generators."""

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI
from sse_starlette import EventSourceResponse

from .image import blob

app = FastAPI()
IMG = blob()


@app.get("/stream")
async def stream(n: int = 50000, interval: float = 0.0) -> EventSourceResponse:
    async def events() -> AsyncIterator[dict[str, str]]:
        for i in range(n):
            if interval:
                await asyncio.sleep(interval)
            data = json.dumps({"text": str(i), "img": IMG})
            yield {"id": str(i), "event": "message", "data": data}
        yield {"id": str(n), "event": "end", "data": "{}"}

    return EventSourceResponse(events())


@app.get("/paced")
async def paced(n: int = 20, interval: float = 0.05) -> EventSourceResponse:
    async def events() -> AsyncIterator[dict[str, str]]:
        for i in range(n):
            await asyncio.sleep(interval)
            yield {"id": str(i), "event": "message", "data": json.dumps({"text": str(i)})}
        yield {"id": str(n), "event": "end", "data": "{}"}

    return EventSourceResponse(events())


@app.get("/idle")
async def idle() -> EventSourceResponse:
    async def events() -> AsyncIterator[dict[str, str]]:
        await asyncio.Event().wait()  # never yields; sse-starlette pings every 15 s
        yield {"data": "unreachable"}

    return EventSourceResponse(events(), ping=15)
