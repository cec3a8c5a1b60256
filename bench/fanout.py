"""W3 fan-out: SSE subscribers of one channel, a publisher at a steady rate.

Servers side by side in one run: tidewire with one worker on its in-memory broker, tidewire
with two workers sharing a Redis of our own (`--workers 2 --broker redis://...`), and nginx +
Nchan, each with every subscriber count of `Sizes.w3_subscribers`. Both workers listen on
one socket (uvicorn's), so the kernel spreads the subscribers and the publisher's
connections between them; the table says how evenly.

The machine has 2 cores for the server, Redis, and the load generator together, so every
row also shows how busy the whole machine was: near 100% of both cores, the result is the
machine's limit, not the server's alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from .clients import Watchers, run_load
from .harness import LIMITS_OFF, Ctx, Servers, busy_cpu, limits_checks
from .servers import (
    BASE,
    BASE_SRC,
    Server,
    from_base,
    nchan,
    redis,
    skipped,
    tidewire,
    tidewire_granian,
    tidewire_on,
    unlimited,
)

__all__ = ["w3"]

MEMORY, REDIS, NCHAN = "tidewire, 1 worker, memory", "tidewire, 2 workers, redis", "nchan"
#: MEMORY with every limit out of reach, beside it: what the limits at their defaults cost.
MEMORY_UNLIMITED = MEMORY + LIMITS_OFF
#: MEMORY's app and settings served by granian (BENCH_TIDEWIRE_ON=...,granian): whether
#: `tidewire serve` should offer it.
MEMORY_GRANIAN = "tidewire (granian), 1 worker, memory"
P99_TARGET_MS = 250.0  # at the largest subscriber count, on 2 workers


@dataclass
class Setup:
    """One server of W3: how to start it (and what it needs), where to subscribe and publish."""

    name: str
    start: Callable[[Servers], tuple[Server, Server | None]]  # (server, its broker if any)
    sub: str  # paths, with {ch} for the channel
    pub: str
    workers: int = 1


def setups(ctx: Ctx) -> tuple[list[Setup], list[str]]:
    out: list[Setup] = []
    notes: list[str] = []
    channel = "/channels/{ch}/events"
    if ctx.tidewire is None:

        def memory(srv: Servers) -> tuple[Server, Server | None]:
            return srv.start(tidewire("tidewire", None, ctx.work)), None

        def shared(srv: Servers) -> tuple[Server, Server | None]:
            broker = srv.start(redis(ctx.work))
            url = f"redis://127.0.0.1:{broker.port}/0"
            server = tidewire("tidewire-redis", None, ctx.work, "--workers", "2", "--broker", url)
            return srv.start(server, profile=False), broker

        def memory_unlimited(srv: Servers) -> tuple[Server, Server | None]:
            return srv.start(unlimited(tidewire(MEMORY_UNLIMITED, None, ctx.work))), None

        def base(
            start: Callable[[Servers], tuple[Server, Server | None]],
        ) -> Callable[[Servers], tuple[Server, Server | None]]:
            def started(srv: Servers) -> tuple[Server, Server | None]:
                # Started from BASE_SRC: srv.start runs what it is given, so the base
                # server is made here and the original start only names its flags.
                return start(BaseServers(srv))

            return started

        def memory_granian(srv: Servers) -> tuple[Server, Server | None]:
            return srv.start(tidewire_granian(MEMORY_GRANIAN, ctx.work, ctx.nofile)), None

        # `tidewire serve` (uvicorn) unless BENCH_TIDEWIRE_ON leaves it out; granian only
        # when it names it. The granian row has no base row: it is a comparison of servers.
        uvicorn = tidewire_on("uvicorn")
        if uvicorn:
            out.append(Setup(MEMORY, memory, channel, channel))
            if BASE_SRC is not None:
                out.append(Setup(MEMORY + BASE, base(memory), channel, channel))
        if tidewire_on("granian", default=False):
            out.append(Setup(MEMORY_GRANIAN, memory_granian, channel, channel))
        if uvicorn:
            out.append(Setup(MEMORY_UNLIMITED, memory_unlimited, channel, channel))
        if uvicorn and ctx.redis is None:
            out.append(Setup(REDIS, shared, channel, channel, workers=2))
            if BASE_SRC is not None:
                out.append(Setup(REDIS + BASE, base(shared), channel, channel, workers=2))
        elif uvicorn:
            notes.append(f"tidewire on redis not run: {ctx.redis}")
    if ctx.nchan is None:

        def nchan_(srv: Servers) -> tuple[Server, Server | None]:
            return srv.start(nchan(ctx.work, ctx.nofile)), None

        out.append(Setup(NCHAN, nchan_, "/sub?id={ch}", "/pub?id={ch}"))
    else:
        notes.append(f"nchan not run: {ctx.nchan}")
    return [setup for setup in out if not skipped(setup.name)], notes


class BaseServers:
    """`Servers` that starts every `tidewire serve` from BASE_SRC (other servers as they are)."""

    def __init__(self, srv: Servers) -> None:
        self.srv = srv

    def start(self, server: Server, **kwargs: Any) -> Server:
        if server.argv[1:3] == ["-m", "tidewire"]:
            server = from_base(server)
            server.name += BASE
            server.log = server.log.with_name(server.log.stem + "-base.log")
        return self.srv.start(server, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.srv, name)


def w3(ctx: Ctx) -> dict[str, Any]:
    s = ctx.sizes
    rows: list[dict[str, Any]] = []
    checks: list[str] = []
    todo, notes = setups(ctx)
    if BASE_SRC is not None:
        # A change against its base: each `--rounds` times, interleaved (A B C A B C), as
        # one run of each is within the noise of this machine.
        todo = todo * ctx.sizes.rounds
    if ctx.tidewire is not None:
        checks.append(f"tidewire not run: {ctx.tidewire}")
    for setup in todo:
        with Servers(ctx, "w3") as srv:
            server, broker = setup.start(srv)
            if setup.workers > 1:
                wait_for_workers(server, setup.workers, setup.sub.format(ch="warmup"))
                if ctx.profile is not None:
                    for i, p in enumerate(workers(server)):
                        base = "-base" if setup.name.endswith(BASE) else ""
                        srv.spy(p.pid, f"w3-tidewire-redis{base}-worker{i + 1}")
            for n in s.w3_subscribers:
                for conns in s.w3_publishers:
                    ch = f"fanout-{n}-{conns}"  # a fresh channel per run
                    paths = setup.sub.format(ch=ch), setup.pub.format(ch=ch)
                    rows.append(fanout(ctx, setup, server, broker, paths, n, conns))
    for r in rows:
        nchan_row = next(
            (b for b in rows if b["server"] == NCHAN and b["subscribers"] == r["subscribers"]),
            None,
        )
        ok = nchan_row is not None and nchan_row is not r and r["p99_ms"] > 0
        r["vs"] = {"nchan": nchan_row["p99_ms"] / r["p99_ms"]} if ok and nchan_row else {}
    checks += w3_checks(rows, max(s.w3_subscribers))
    checks += limits_checks(rows, "p99_ms", higher=False, match=("subscribers",))
    params = {
        "subscribers": "/".join(f"{n:,}" for n in s.w3_subscribers),
        "rate_per_s": s.w3_rate,
        "seconds": s.w3_seconds,
        "subscribers_per_load_process": s.w3_per_proc,
    }
    return {"params": params, "rows": rows, "checks": checks, "notes": notes}


def w3_checks(rows: list[dict[str, Any]], most: int) -> list[str]:
    checks = []
    for r in rows:
        if not r["server"].startswith("tidewire"):
            continue
        what = f"{r['server']}, {r['subscribers']:,} subscribers"
        good = r["lost"] == 0 and not r["problems"]  # None: the publisher failed
        checks.append(f"{what}: lost {r['lost']} (target 0): " + ("PASS" if good else "FAIL"))
        if r["server"] in (REDIS, REDIS + BASE) and r["subscribers"] == most:
            ok = r["p99_ms"] <= P99_TARGET_MS
            checks.append(
                f"{what}: p99 {r['p99_ms']:,.1f} ms (target <= {P99_TARGET_MS:.0f} ms): "
                + ("PASS" if ok else "FAIL")
                + (f" ({r['bound']})" if r["bound"] else "")
            )
    return checks


def workers(server: Server) -> list[psutil.Process]:
    """uvicorn's worker processes: the children that hold its listening socket."""
    out = []
    for p in server.processes()[1:]:
        try:
            if any(c.status == psutil.CONN_LISTEN for c in p.net_connections("tcp")):
                out.append(p)
        except psutil.Error:
            pass
    return out


def spread(server: Server) -> list[int]:
    """Established connections to the server's port, per worker process."""
    counts = []
    for p in workers(server):
        try:
            conns = p.net_connections("tcp")
        except psutil.Error:
            conns = []
        counts.append(
            sum(
                1
                for c in conns
                if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == server.port
            )
        )
    return counts


def wait_for_workers(server: Server, n: int, path: str, timeout: float = 60.0) -> None:
    """Until every worker accepts connections: the supervisor listens before they are up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        warm = Watchers(server.port, path, 40, 1, deadline_s=60)
        warm.ready(timeout=30)
        counts = spread(server)
        warm.stop(0, timeout=30)
        if len(counts) >= n and all(counts):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{server.name}: {n} workers were not all serving after {timeout:.0f} s")


class CpuSampler(threading.Thread):
    """CPU seconds used so far by each group of processes, and by the whole machine, every
    0.2 s: rates can then be taken over exactly the span in which deliveries happened, not
    over a window padded with connecting and draining."""

    def __init__(self, groups: dict[str, list[psutil.Process]], every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.groups, self.every = groups, every
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.last: dict[int, float] = {}  # a process's CPU when last seen (it may have exited)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.every)

    def sample(self) -> None:
        values = {"machine": busy_cpu()}
        for name, procs in self.groups.items():
            values[name] = sum(self.cpu(p) for p in procs)
        self.samples.append((time.time(), values))

    def cpu(self, p: psutil.Process) -> float:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total = t.user + t.system
            with contextlib.suppress(psutil.Error):
                for child in p.children(recursive=True):
                    c = child.cpu_times()
                    total += c.user + c.system
            self.last[p.pid] = total
        return self.last.get(p.pid, 0.0)

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.sample()

    def rates(self, t0: float, t1: float) -> dict[str, float]:
        """% of one core used by each group (and "machine") from t0 to t1 (time.time())."""
        before = [x for x in self.samples if x[0] <= t0] or self.samples[:1]
        after = [x for x in self.samples if x[0] >= t1] or self.samples[-1:]
        (a, va), (b, vb) = before[-1], after[0]
        return {k: 100 * (vb[k] - va[k]) / max(b - a, 1e-9) for k in va}


def fanout(
    ctx: Ctx,
    setup: Setup,
    server: Server,
    broker: Server | None,
    paths: tuple[str, str],
    subscribers: int,
    conns: int,
) -> dict[str, Any]:
    s = ctx.sizes
    sub, pub = paths
    messages = int(s.w3_rate * s.w3_seconds)
    procs = max(2, math.ceil(subscribers / s.w3_per_proc))
    w = Watchers(
        server.port,
        sub,
        subscribers,
        procs,
        deadline_s=s.w3_seconds + 300,
        messages=messages,
        latency_dir=ctx.work,
    )
    ready = w.ready(timeout=240)
    by_worker = spread(server) if setup.workers > 1 else []
    time.sleep(1.0)  # headers can precede the server's subscription bookkeeping
    sent_file = ctx.work / f"sent-{server.port}-{subscribers}.bin"
    groups = {"server": [psutil.Process(server.pid)]}
    if broker is not None:
        groups["redis"] = [psutil.Process(broker.pid)]
    for i, p in enumerate(w.procs):
        groups[f"load{i}"] = [psutil.Process(p.pid)]
    sampler = CpuSampler(groups)
    sampler.start()
    cfg = {
        "port": server.port,
        "path": pub,
        "rate": s.w3_rate,
        "messages": messages,
        "conns": conns,
        "sent_file": str(sent_file),
    }
    pub_res = run_load("publish", cfg, timeout=s.w3_seconds + 90)
    subs = w.stop(drain_s=60.0, timeout=240, sent_file=sent_file)
    sampler.stop()
    hist: dict[int, int] = {}
    for f in w.latency_files:
        if f.exists():
            for k, v in json.loads(f.read_bytes()).items():
                hist[int(k)] = hist.get(int(k), 0) + v
    p50, p99, most = percentiles(hist, 0.50, 0.99, 1.0)

    problems = [
        str(x.get("error") or x.get("failures"))
        for x in ready + subs
        if x.get("error") or x.get("failures")
    ]
    problems += [f"publisher: {e}" for e in pub_res.get("errors", [])]
    if pub_res.get("error"):
        problems.append(f"publisher: {pub_res['error']}")
    if any(x.get("timed_out") for x in subs):
        problems.append("subscribers hit their deadline before the harness said stop")
    if pub_res.get("unanswered"):
        problems.append(f"publisher: {pub_res['unanswered']} publishes unanswered after 60 s")
    good = [x for x in subs if "received" in x]
    if closed := sum(x["closed_by_server"] for x in good):
        problems.append(f"the server ended {closed} subscriptions")
    received = sum(x["received"] for x in good)
    sent = pub_res.get("sent", 0)
    span = max((x["last_delivery"] for x in good), default=0) - pub_res.get("first_ts", 0)
    # CPU while messages were being delivered: from the first publish to the last delivery.
    cpu = sampler.rates(pub_res.get("first_ts", 0), pub_res.get("first_ts", 0) + span)
    loads = [v for k, v in cpu.items() if k.startswith("load")]
    publisher = 100 * pub_res.get("client_cpu", 0.0) / max(pub_res.get("wall", 0.0), 1e-9)
    ours = cpu["server"] + cpu.get("redis", 0.0) + sum(loads) + publisher
    other: dict[str, int] = {}
    for x in good:
        for k, v in x["other_events"].items():
            other[k] = other.get(k, 0) + v
    row = {
        "server": setup.name,
        "subscribers": subscribers,
        "load_processes": procs,
        "conns": conns,
        "publisher": "1 connection" if conns == 1 else f"<= {conns} connections",
        "by_worker": by_worker,
        "published": sent,
        "publish_rate": sent / pub_res["wall"] if pub_res.get("wall") else 0.0,
        "deliveries": received,
        "deliveries_per_s": received / span if span > 0 else 0.0,
        # Reads with messages in them, per second: about how many writes the server made
        # (each carrying all the messages ready for that subscriber).
        "reads_per_s": sum(x.get("reads", 0) for x in good) / span if span > 0 else 0.0,
        "expected_per_s": subscribers * s.w3_rate,
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": most,
        # Counted by the subscribers: every scheduled message each of them never saw.
        "lost": sum(x["lost"] for x in good) if good and "sent" in pub_res else None,
        "duplicates": sum(x["duplicates"] for x in good),
        "unparsed": sum(x["unparsed"] for x in good),
        "other_events": other,
        "closed_by_server": sum(x["closed_by_server"] for x in good),
        "publish_rtt_p50_ms": pub_res.get("rtt_p50"),
        "publish_rtt_p99_ms": pub_res.get("rtt_p99"),
        "publish_connections_used": pub_res.get("connections"),
        "publish_response": pub_res.get("first_response"),
        "server_cpu_pct": cpu["server"],
        "broker_cpu_pct": cpu.get("redis"),
        "client_cpu_pct": sum(loads) + publisher,
        "client_cpu_max_proc_pct": max([*loads, publisher]),
        "machine_cpu_pct": cpu["machine"],  # % of one core: 200 is both cores
        # What the machine did besides this row's server, Redis and load generator.
        "other_cpu_pct": max(0.0, cpu["machine"] - ours),
        "problems": problems,
    }
    row["bound"] = bound(row, psutil.cpu_count() or 1)
    return row


def bound(row: dict[str, Any], cores: int) -> str:
    """Why a row may say more about the machine than about the server, or ""."""
    why = []
    if row["machine_cpu_pct"] >= 90 * cores:
        why.append(
            f"machine CPU-bound ({row['machine_cpu_pct']:.0f}% of {100 * cores}%, "
            f"{row['other_cpu_pct']:.0f}% of it other processes')"
        )
    if row["client_cpu_max_proc_pct"] >= 90:
        why.append(f"a load process at {row['client_cpu_max_proc_pct']:.0f}% of a core")
    return "; ".join(why)


def percentiles(hist: dict[int, int], *ps: float) -> list[float]:
    """Latency percentiles in ms from a histogram of 0.1 ms bins (exact to the bin)."""
    total = sum(hist.values())
    if not total:
        return [float("nan")] * len(ps)
    bins = sorted(hist.items())
    out = []
    for p in ps:
        rank, seen = min(total - 1, int(total * p)), 0
        for b, count in bins:
            seen += count
            if seen > rank:
                out.append(b / 10)
                break
    return out
