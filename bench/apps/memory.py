"""The tidewire app for W9: the demo stream and channels, with histories that expire quickly.

The same `demo` generator `tidewire serve` runs; only the settings differ, so that W9 can
see within a minute whether the memory of expired runs and trimmed channels goes back to
the operating system: finished runs are forgotten after `BENCH_RUN_TTL` seconds (default
3), channel events after `BENCH_CHANNEL_AGE` seconds (default 8; trimmed when the channel
is next published to or read).
"""

import os

from tidewire import Settings, Tidewire
from tidewire.demo import demo

settings = Settings(
    run_ttl=float(os.environ.get("BENCH_RUN_TTL", "3")),
    channel_max_len=1_000,
    channel_max_age=float(os.environ.get("BENCH_CHANNEL_AGE", "8")),
)
tw = Tidewire(settings=settings)
tw.stream(name="demo")(demo)
