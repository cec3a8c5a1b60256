"""What every workload shares: sizes, the run's context, servers that always stop, medians."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .profile import Spy
from .servers import Server

__all__ = ["QUICK", "Ctx", "Servers", "Sizes", "median"]


@dataclass
class Sizes:
    w1_events: int = 50_000
    rounds: int = 3
    w2_clients: int = 200
    w2_events: int = 20
    w2_interval: float = 0.05
    w3_subscribers: int = 1000
    w3_rate: float = 100.0
    w3_seconds: float = 10.0
    w3_procs: int = 2  # subscriber processes: 100k deliveries/s is too much for one Python core
    w4_conns: int = 5000
    w5_bytes: int = 1 << 30
    w5b_bytes: int = 128 << 20
    w5b_clients: int = 8
    w6_bytes: int = 1 << 30
    # Writing 1 GiB into the page cache of this VM takes anywhere from 1 to 3 s from one
    # upload to the next, whichever server: W6 needs more rounds for a steady median.
    w6_rounds: int = 5


QUICK = Sizes(
    w1_events=5000,
    rounds=1,
    w3_subscribers=200,
    w3_seconds=3.0,
    w4_conns=1000,
    w5_bytes=64 << 20,
    w5b_bytes=16 << 20,
    w6_bytes=64 << 20,
    w6_rounds=1,
)


@dataclass
class Ctx:
    sizes: Sizes
    work: Path
    nofile: int
    tidewire: str | None  # None when usable, else why not
    nchan: str | None
    profile: Path | None = None  # where py-spy's profiles of tidewire go, if wanted
    profiles: list[str] = field(default_factory=list)


class Servers:
    """Starts servers and stops every one of them however the workload ends."""

    def __init__(self, ctx: Ctx, label: str) -> None:
        self.ctx, self.label = ctx, label
        self.started: list[Server] = []
        self.spies: list[Spy] = []

    def __enter__(self) -> Servers:
        return self

    def start(self, server: Server) -> Server:
        self.started.append(server)
        server.start()
        if self.ctx.profile is not None and server.name.startswith("tidewire"):
            # granian and hypercorn serve from a worker process: sample that one.
            pid = server.processes()[-1].pid
            name = server.name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
            self.spies.append(Spy(pid, self.ctx.profile / f"{self.label}-{name}.txt"))
        return server

    def __exit__(self, *exc: object) -> None:
        for spy in self.spies:
            self.ctx.profiles.append(spy.stop())
        for s in self.started:
            s.stop()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
