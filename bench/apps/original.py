"""The original FastAPI service (shared/ORIGINAL.md), as written, for W1 and W2.

Only its constants became query parameters (`n`, `interval`) and test.png is located next to
this file (the harness writes it). The upload/download endpoints are left out: no workload
uses them, and `/downloadfile/` would serve any path on the machine. It is started by the
harness with `uvicorn --loop uvloop --http httptools`, 1 worker, like every other server.
"""

import base64
import json
import os
import time
from collections.abc import Iterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

app = FastAPI()
IMAGE = os.path.join(os.path.dirname(__file__), "test.png")


def image_to_base64() -> str:
    with open(IMAGE, "rb") as image_file:
        # Read the image's bytes, base64-encode them, and turn the bytes into a str.
        image_binary = image_file.read()
        encoded_image = base64.b64encode(image_binary)
        encoded_image_string = encoded_image.decode("utf-8")
    return encoded_image_string


@app.get("/stream")
def stream_combined(n: int = 10000, interval: float = 0.05) -> StreamingResponse:
    def data_generator() -> Iterator[str]:
        for i in range(n):
            time.sleep(interval)
            yield json.dumps({"text": str(i), "img": image_to_base64()}, ensure_ascii=False) + "\n"

    return StreamingResponse(data_generator(), media_type="text/plain")
