"""What every workload shares: sizes, the run's context, servers that always stop, medians."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .profile import Spy
from .servers import Server

__all__ = [
    "LIMITS_OFF",
    "QUICK",
    "Ctx",
    "Servers",
    "Sizes",
    "busy_cpu",
    "limits_checks",
    "median",
]


@dataclass
class Sizes:
    w1_events: int = 50_000
    rounds: int = 3
    w2_clients: int = 200
    w2_events: int = 20
    w2_interval: float = 0.05
    w3_subscribers: tuple[int, ...] = (1000, 10_000)  # each server is run with each
    w3_rate: float = 100.0
    w3_seconds: float = 10.0
    # Subscribers per load process (at least 2 processes): one Python process per core at
    # most, but not a whole W3 in one event loop, whose lag would show up as latency.
    w3_per_proc: int = 2500
    w3_publishers: tuple[int, ...] = (1,)  # publisher connections: 1, or up to N (<= 32)
    w4_conns: int = 5000
    w5_bytes: int = 1 << 30
    w5b_bytes: int = 128 << 20
    w5b_clients: int = 8
    w6_bytes: int = 1 << 30
    # Writing 1 GiB into the page cache of this VM takes anywhere from 1 to 3 s from one
    # upload to the next, whichever server: W6 needs more rounds for a steady median.
    w6_rounds: int = 5
    w9_channels: int = 100  # of 1,000 retained events each
    w9_runs: int = 10  # of 10,000 retained events each


QUICK = Sizes(
    w1_events=5000,
    rounds=1,
    w3_subscribers=(200, 1000),
    w3_seconds=3.0,
    w4_conns=1000,
    w5_bytes=64 << 20,
    w5b_bytes=16 << 20,
    w6_bytes=64 << 20,
    w6_rounds=1,
    w9_channels=20,
    w9_runs=2,
)


@dataclass
class Ctx:
    sizes: Sizes
    work: Path
    nofile: int
    tidewire: str | None  # None when usable, else why not
    nchan: str | None
    redis: str | None = None  # None when redis-server can be started, else why not
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

    def start(self, server: Server, profile: bool = True) -> Server:
        """Start `server`; with --profile, py-spy it if it is tidewire (unless `profile` is
        False: a server with several workers has none of them yet when it listens)."""
        self.started.append(server)
        server.start()
        if profile and server.name.startswith("tidewire"):
            # granian and hypercorn serve from a worker process: sample that one.
            name = server.name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
            self.spy(server.processes()[-1].pid, f"{self.label}-{name}")
        return server

    def spy(self, pid: int, name: str) -> None:
        """With --profile, py-spy `pid` until the workload ends."""
        if self.ctx.profile is not None:
            self.spies.append(Spy(pid, self.ctx.profile / f"{name}.txt"))

    def __exit__(self, *exc: object) -> None:
        for spy in self.spies:
            self.ctx.profiles.append(spy.stop())
        for s in self.started:
            s.stop()


def busy_cpu() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


LIMITS_OFF = " (limits off)"  # suffix of a row whose server has every limit out of reach
LIMITS_MAX_COST = 0.05  # of events/s, or of p99 latency


def limits_checks(
    rows: list[dict[str, Any]], key: str, *, higher: bool, match: tuple[str, ...] = ()
) -> list[str]:
    """Each row at the default limits against its "(limits off)" twin (same `match` keys):
    the ratio of `key` (events/s, higher is better; a latency, lower is better)."""
    checks = []
    for r in rows:
        twin = next(
            (
                o
                for o in rows
                if o["server"] == r["server"] + LIMITS_OFF and all(o[m] == r[m] for m in match)
            ),
            None,
        )
        if twin is None or not twin[key] or not r[key]:
            continue
        x = r[key] / twin[key] if higher else twin[key] / r[key]
        where = "".join(f", {r[m]:,} {m}" for m in match)
        # CPU per event moves less with the machine's other load than rates and latencies.
        cpu = "server_us_per_event"
        also = (
            f"; server CPU {r[cpu]:.1f} vs {twin[cpu]:.1f} us/event"
            if r.get(cpu) is not None and twin.get(cpu) is not None
            else ""
        )
        checks.append(
            f"{r['server']}{where}: {key} {r[key]:,.1f} vs {twin[key]:,.1f}, {x:.2f}x of "
            f"limits off (goal >= {1 - LIMITS_MAX_COST:.2f}x){also}: "
            + ("PASS" if x >= 1 - LIMITS_MAX_COST else "FAIL")
        )
    return checks
