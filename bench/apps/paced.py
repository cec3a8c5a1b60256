"""The tidewire app for W2: a SYNC generator in the original service's style."""

import time
from collections.abc import Iterator

from tidewire import Tidewire

tw = Tidewire()


@tw.stream
def paced(n: int = 20, interval: float = 0.05) -> Iterator[dict[str, str]]:
    for i in range(n):
        time.sleep(interval)  # blocking on purpose: this is how the original paces its events
        yield {"text": str(i)}
