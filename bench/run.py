"""`python -m bench`: the workloads side by side in one run; writes results.md and results.json.

The machine is small and shared, so absolute numbers drift between runs: every server of a
workload runs in the same invocation, rounds are interleaved (A B C A B C ...), and the
report leads with ratios. Servers and load generators are separate processes; their CPU is
measured with psutil and reported next to each result.
"""

from __future__ import annotations

import argparse
import array
import base64
import json
import os
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from . import files, report
from .apps.image import PNG, ensure_png
from .clients import Watchers, run_load
from .harness import QUICK, Ctx, Servers, Sizes, median
from .servers import (
    Server,
    nchan,
    nchan_available,
    raise_nofile,
    tidewire,
    tidewire_available,
    uvicorn,
)

SSE, NDJSON = "text/event-stream", "application/x-ndjson"


@dataclass
class Target:
    """One row of a table: a server plus the request that exercises it."""

    name: str
    server: Server
    path: str
    accept: str
    framing: str  # "ndjson" or "sse": how the load generator counts events


# --- W1 -------------------------------------------------------------------------------------


def demo_png(port: int) -> bytes | None:
    """tidewire's demo image, so the baselines send the very same bytes per event."""
    url = f"http://127.0.0.1:{port}/streams/demo?n=1&interval=0"
    req = urllib.request.Request(url, headers={"Accept": NDJSON})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            first = json.loads(r.readline())
        raw = base64.b64decode(first["data"]["img"]["$blob"]["data"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return raw if raw.startswith(b"\x89PNG") else None


def baselines(ctx: Ctx, srv: Servers) -> tuple[Server, Server, Server]:
    """Start the original service, a fastapi.sse app and an sse-starlette app."""
    return (
        srv.start(uvicorn("original", "bench.apps.original:app", ctx.work)),
        srv.start(uvicorn("fastapi.sse", "bench.apps.fastapi_sse:app", ctx.work)),
        srv.start(uvicorn("sse-starlette", "bench.apps.starlette_sse:app", ctx.work)),
    )


def interleaved(
    ctx: Ctx, targets: list[Target], mode: str, extra: dict[str, Any], timeout: float
) -> dict[str, list[dict[str, Any]]]:
    """Run the load `mode` against every target, rounds interleaved (A B C A B C ...) so that
    drift in the machine's other load hits every server alike; results by target name."""
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for _ in range(ctx.sizes.rounds):
        for t in targets:
            cpu0 = t.server.cpu()
            cfg = {"port": t.server.port, "path": t.path, "accept": t.accept, "framing": t.framing}
            res = run_load(mode, {**cfg, **extra}, timeout=timeout)
            res["server_cpu"] = t.server.cpu() - cpu0
            runs[t.name].append(res)
    return runs


def w1(ctx: Ctx) -> dict[str, Any]:
    n = ctx.sizes.w1_events
    notes: list[str] = []
    with Servers(ctx, "w1") as srv:
        targets: list[Target] = []
        png = None
        if ctx.tidewire is None:
            tw = srv.start(tidewire("tidewire", None, ctx.work))
            png = demo_png(tw.port)
            path = f"/streams/demo?n={n}&interval=0"
            targets += [
                Target("tidewire NDJSON", tw, path, NDJSON, "ndjson"),
                Target("tidewire SSE", tw, path, SSE, "sse"),
            ]
        if png is None:
            notes.append("image: bench's generated PNG (tidewire's demo image was not available)")
            png = ensure_png()
        else:
            PNG.write_bytes(png)
            notes.append("image: tidewire's demo PNG, copied so every server sends the same bytes")
        notes[-1] += f", {len(png)} B"
        orig, fsse, star = baselines(ctx, srv)
        targets = [
            Target("original", orig, f"/stream?n={n}&interval=0", "*/*", "ndjson"),
            Target("fastapi.sse", fsse, f"/stream?n={n}", SSE, "sse"),
            Target("sse-starlette", star, f"/stream?n={n}", SSE, "sse"),
            *targets,
        ]
        deadline = max(120.0, n / 300)
        runs = interleaved(ctx, targets, "stream", {"deadline_s": deadline}, deadline + 30)
    rows = [w1_row(t.name, runs[t.name], n) for t in targets]
    report.ratios(rows, "events_per_s", ["original", "fastapi.sse", "sse-starlette"])
    goal = next((r for r in rows if r["server"] == "sse-starlette"), None)
    checks = []
    for r in rows:
        if r["server"].startswith("tidewire") and goal and goal["events_per_s"]:
            x = r["events_per_s"] / goal["events_per_s"]
            checks.append(
                f"{r['server']}: {x:.2f}x sse-starlette (target >= 2x): "
                + ("PASS" if x >= 2 else "FAIL")
            )
    if ctx.tidewire is not None:
        checks.append(f"tidewire not run: {ctx.tidewire}")
    return {
        "params": {"events": n, "rounds": ctx.sizes.rounds, "interval": 0},
        "rows": rows,
        "checks": checks,
        "notes": notes,
        "runs": runs,
    }


def w1_row(name: str, runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    problems = sorted({p for r in runs if (p := w1_problem(r, n))})
    good = [r for r in runs if not r.get("error")]
    rates = [n / r["wall"] for r in good]
    return {
        "server": name,
        "events_per_s": median(rates) if rates else 0.0,
        "rounds": [round(x) for x in rates],
        "mb_per_s": median([r["bytes"] / r["wall"] / 1e6 for r in good]),
        "bytes_per_event": median([r["bytes"] / max(1, r["events"]) for r in good]),
        "server_cpu_pct": median([100 * r["server_cpu"] / r["wall"] for r in good]),
        "client_cpu_pct": median([100 * r["client_cpu"] / r["wall"] for r in good]),
        "first_event": good[0]["first"] if good else None,
        "last_event": good[0]["last_event"] if good else None,
        "content_type": good[0].get("content_type") if good else None,
        "problems": problems,
    }


def w1_problem(r: dict[str, Any], n: int) -> str | None:
    if r.get("error"):
        return str(r["error"])
    if r["events"] not in (n, n + 1):  # n messages, plus an `end` event where there is one
        return f"counted {r['events']} events, expected {n} (+1 end)"
    if "ok" not in r["first"]:
        return f"first event: {r['first']}"
    return None


# --- W2 -------------------------------------------------------------------------------------


def w2(ctx: Ctx) -> dict[str, Any]:
    s = ctx.sizes
    q = f"n={s.w2_events}&interval={s.w2_interval}"
    with Servers(ctx, "w2") as srv:
        if not PNG.exists():
            ensure_png()
        orig, fsse, star = baselines(ctx, srv)
        targets = [
            Target("original (sync)", orig, f"/stream?{q}", "*/*", "ndjson"),
            Target("fastapi.sse (async)", fsse, f"/paced?{q}", SSE, "sse"),
            Target("fastapi.sse (sync)", fsse, f"/paced_sync?{q}", SSE, "sse"),
            Target("sse-starlette (async)", star, f"/paced?{q}", SSE, "sse"),
        ]
        if ctx.tidewire is None:
            tw = srv.start(tidewire("tidewire", "bench.apps.paced:tw", ctx.work))
            targets += [
                Target("tidewire NDJSON (sync)", tw, f"/streams/paced?{q}", NDJSON, "ndjson"),
                Target("tidewire SSE (sync)", tw, f"/streams/paced?{q}", SSE, "sse"),
            ]
        runs = interleaved(ctx, targets, "paced", {"conns": s.w2_clients, "deadline_s": 60}, 90)
    ideal = s.w2_events * s.w2_interval
    rows = [w2_row(t.name, runs[t.name], s.w2_events, ideal) for t in targets]
    report.ratios(rows, "wall_s", ["original (sync)", "fastapi.sse (async)"], lower_is_better=True)
    checks = [
        f"{r['server']}: {r['wall_s']:.2f} s (target <= 1.25 s): "
        + ("PASS" if r["wall_s"] <= 1.25 and not r["problems"] else "FAIL")
        for r in rows
        if r["server"].startswith("tidewire")
    ]
    if ctx.tidewire is not None:
        checks.append(f"tidewire not run: {ctx.tidewire}")
    params = {
        "clients": s.w2_clients,
        "events": s.w2_events,
        "interval_s": s.w2_interval,
        "ideal_s": ideal,
        "rounds": s.rounds,
    }
    return {"params": params, "rows": rows, "checks": checks, "notes": [], "runs": runs}


def w2_row(name: str, runs: list[dict[str, Any]], n: int, ideal: float) -> dict[str, Any]:
    problems: set[str] = set()
    for r in runs:
        if r.get("error") or r.get("error_count") or r.get("timed_out"):
            problems.add(str(r.get("error") or r.get("errors") or f"{r['timed_out']} timed out"))
        elif not (n <= r["events_min"] <= r["events_max"] <= n + 1):
            problems.add(f"events per client {r['events_min']}..{r['events_max']}, expected {n}")
    good = [r for r in runs if "wall" in r]
    walls = [r["wall"] for r in good]
    return {
        "server": name,
        "wall_s": median(walls),
        "rounds": [round(w, 2) for w in walls],
        "x_ideal": median(walls) / ideal,
        "p50_client_s": median([r["p50_client"] for r in good if r.get("p50_client")]),
        "server_cpu_pct": median([100 * r["server_cpu"] / r["wall"] for r in good]),
        "client_cpu_pct": median([100 * r["client_cpu"] / r["wall"] for r in good]),
        "first_event": good[0].get("first") if good else None,
        "problems": sorted(problems),
    }


# --- W3 -------------------------------------------------------------------------------------


def nchan_server(ctx: Ctx) -> Callable[[], Server]:
    return lambda: nchan(ctx.work, ctx.nofile)


PUBLISHERS = (1, 32)  # publisher connections: one, or as many as keep the schedule (<= 32)


def w3(ctx: Ctx) -> dict[str, Any]:
    s = ctx.sizes
    rows, checks, notes = [], [], []
    # (name, server factory, subscribe path, publish path), paths with {ch} for the channel
    setups: list[tuple[str, Callable[[], Server], str, str]] = []
    if ctx.tidewire is None:
        ch = "/channels/{ch}/events"
        setups.append(("tidewire SSE", lambda: tidewire("tidewire", None, ctx.work), ch, ch))
    else:
        checks.append(f"tidewire not run: {ctx.tidewire}")
    if ctx.nchan is None:
        setups.append(("nchan", nchan_server(ctx), "/sub?id={ch}", "/pub?id={ch}"))
    else:
        notes.append(f"nchan not run: {ctx.nchan}")
    for name, make, sub, pub in setups:
        with Servers(ctx, "w3") as srv:
            server = srv.start(make())
            for conns in PUBLISHERS:
                ch = f"fanout{conns}"  # a fresh channel per run
                row = fanout(ctx, name, server, sub.format(ch=ch), pub.format(ch=ch), conns)
                rows.append(row)
    for r in rows:  # vs nchan with the same publisher
        base = next((b for b in rows if b["server"] == "nchan" and b["conns"] == r["conns"]), None)
        ok = base is not None and base is not r and r["p99_ms"] > 0
        r["vs"] = {"nchan": base["p99_ms"] / r["p99_ms"]} if ok and base else {}
        if r["server"].startswith("tidewire"):
            good = r["lost"] == 0 and not r["problems"]  # None: the publisher failed
            checks.append(
                f"{r['server']}, {r['publisher']}: lost {r['lost']} (expected 0): "
                + ("PASS" if good else "FAIL")
            )
            if "nchan" in r["vs"]:
                ratio = r["vs"]["nchan"]
                checks.append(
                    f"{r['server']}, {r['publisher']}: p99 {r['p99_ms']:.1f} ms, "
                    f"{ratio:.2f}x nchan's (target: no worse, >= 1x): "
                    + ("PASS" if ratio >= 1 else "MISS")
                )
    params = {
        "subscribers": s.w3_subscribers,
        "rate_per_s": s.w3_rate,
        "seconds": s.w3_seconds,
        "subscriber_processes": s.w3_procs,
    }
    return {"params": params, "rows": rows, "checks": checks, "notes": notes}


def fanout(ctx: Ctx, name: str, server: Server, sub: str, pub: str, conns: int) -> dict[str, Any]:
    s = ctx.sizes
    messages = int(s.w3_rate * s.w3_seconds)
    w = Watchers(
        server.port,
        sub,
        s.w3_subscribers,
        s.w3_procs,
        deadline_s=s.w3_seconds + 180,
        messages=messages,
        latency_dir=ctx.work,
    )
    ready = w.ready(timeout=120)
    time.sleep(1.0)  # headers can precede the server's subscription bookkeeping
    cpu0 = server.cpu()
    cfg = {
        "port": server.port,
        "path": pub,
        "rate": s.w3_rate,
        "messages": messages,
        "conns": conns,
    }
    pub_res = run_load("publish", cfg, timeout=s.w3_seconds + 90)
    subs = w.stop(drain_s=60.0, timeout=120)
    server_cpu = server.cpu() - cpu0
    lat: array.array[float] = array.array("d")
    for f in w.latency_files:
        if f.exists():
            lat.frombytes(f.read_bytes())
    ordered = sorted(lat)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")

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
    window = max([x["window_s"] for x in good] + [1e-9])
    client_cpu = sum(x["client_cpu"] for x in good) + pub_res.get("client_cpu", 0.0)
    other: dict[str, int] = {}
    for x in good:
        for k, v in x["other_events"].items():
            other[k] = other.get(k, 0) + v
    return {
        "server": name,
        "conns": conns,
        "publisher": "1 connection" if conns == 1 else f"<= {conns} connections",
        "published": sent,
        "publish_rate": sent / pub_res["wall"] if pub_res.get("wall") else 0.0,
        "deliveries": received,
        "deliveries_per_s": received / span if span > 0 else 0.0,
        "expected_per_s": s.w3_subscribers * s.w3_rate,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": ordered[-1] if ordered else float("nan"),
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
        "server_cpu_pct": 100 * server_cpu / window,
        "client_cpu_pct": 100 * client_cpu / window,
        "client_cpu_max_proc_pct": max(
            (100 * x["client_cpu"] / x["window_s"] for x in good), default=0.0
        ),
        "problems": problems,
    }


# --- W4 -------------------------------------------------------------------------------------


def w4(ctx: Ctx) -> dict[str, Any]:
    rows, checks, notes = [], [], []
    setups: list[tuple[str, Callable[[], Server], str]] = []
    if ctx.tidewire is None:
        setups.append(
            ("tidewire SSE", lambda: tidewire("tidewire", None, ctx.work), "/channels/idle/events")
        )
    else:
        checks.append(f"tidewire not run: {ctx.tidewire}")

    def asgi(name: str, app: str) -> Callable[[], Server]:
        return lambda: uvicorn(name, app, ctx.work)

    setups += [
        ("fastapi.sse", asgi("fastapi.sse", "bench.apps.fastapi_sse:app"), "/idle"),
        ("sse-starlette", asgi("sse-starlette", "bench.apps.starlette_sse:app"), "/idle"),
    ]
    if ctx.nchan is None:
        setups.append(("nchan", nchan_server(ctx), "/sub?id=idle"))
    else:
        notes.append(f"nchan not run: {ctx.nchan}")
    setups += [
        ("floor: uvicorn, raw ASGI", asgi("floor-asgi", "bench.apps.floor:raw"), "/idle"),
        ("floor: FastAPI route", asgi("floor-fastapi", "bench.apps.floor:fastapi_app"), "/idle"),
    ]
    for name, make, path in setups:
        with Servers(ctx, "w4") as srv:
            rows.append(idle(ctx, name, srv.start(make()), path))
    report.ratios(rows, "kb_per_conn", ["fastapi.sse", "nchan"], lower_is_better=True)
    for r in rows:
        if r["server"].startswith("tidewire"):
            ok = r["kb_per_conn"] <= 25 and not r["problems"]
            checks.append(
                f"{r['server']}: {r['kb_per_conn']:.1f} KB/conn (target <= 25): "
                + ("PASS" if ok else "FAIL")
            )
    return {
        "params": {"connections": ctx.sizes.w4_conns},
        "rows": rows,
        "checks": checks,
        "notes": notes,
    }


def idle(ctx: Ctx, name: str, server: Server, path: str) -> dict[str, Any]:
    n = ctx.sizes.w4_conns
    # Warm up first, so lazy imports and first-request caches aren't billed to connections.
    warm = Watchers(server.port, path, 20, 1, deadline_s=60)
    warm.ready(timeout=60)
    warm.stop(0, timeout=30)
    time.sleep(1.0)
    before = server.rss()
    w = Watchers(server.port, path, n, 1, deadline_s=600)
    ready = w.ready(timeout=300)
    time.sleep(2.0)  # let per-connection tasks and buffers settle before reading RSS
    after = server.rss()
    cpu_idle0 = server.cpu()
    time.sleep(2.0)
    idle_cpu = (server.cpu() - cpu_idle0) / 2.0
    subs = w.stop(0, timeout=120)
    connected = sum(x.get("connected", 0) for x in ready)
    problems = [
        str(x.get("error") or x.get("failures"))
        for x in ready + subs
        if x.get("error") or x.get("failures")
    ]
    closed = sum(x.get("closed_by_server", 0) for x in subs)
    if closed:
        problems.append(f"{closed} connections closed by the server while idle")
    return {
        "server": name,
        "connected": connected,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "kb_per_conn": (after - before) / max(1, connected) / 1024,
        "connect_s": max((x.get("connect_s", 0.0) for x in ready), default=0.0),
        "idle_server_cpu_pct": 100 * idle_cpu,
        "client_connect_cpu_s": sum(x.get("connect_cpu", 0.0) for x in subs),
        "content_type": ready[0].get("content_type") if ready else None,
        "problems": problems,
    }


def busy_cpu() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def our_cpu() -> float:
    """CPU seconds of the harness and every process it started and reaped (servers, nginx's
    worker, load generators): what is left of busy_cpu() is other load on the machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# --- main -----------------------------------------------------------------------------------

WORKLOADS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "w1": w1,
    "w2": w2,
    "w3": w3,
    "w4": w4,
    "w5": files.w5,
    "w5b": files.w5b,
    "w6": files.w6,
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--only", default=",".join(WORKLOADS), help="workloads, e.g. w1,w3")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of ~1.5 min")
    ap.add_argument("--rounds", type=int, help="rounds of W1, W2, W5, W5b, W6 (median is reported)")
    ap.add_argument("--no-tidewire", action="store_true", help="baselines only")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent, help="results folder")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the other workloads' results from OUT/results.json (each says its date)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the tidewire servers; profiles go to OUT/profiles/",
    )
    args = ap.parse_args(argv)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    if unknown := set(only) - set(WORKLOADS):
        ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    sizes = QUICK if args.quick else Sizes()
    if args.rounds:
        sizes.rounds = sizes.w6_rounds = args.rounds
    why_not_tw = "--no-tidewire" if args.no_tidewire else tidewire_available()
    with tempfile.TemporaryDirectory(prefix="tidewire-bench-") as tmp:
        ctx = Ctx(sizes, Path(tmp), raise_nofile(), why_not_tw, nchan_available())
        if args.profile:
            ctx.profile = args.out / "profiles"
            ctx.profile.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": report.machine(),
            "quick": args.quick,
            "tidewire_src": os.environ.get("BENCH_TIDEWIRE_SRC"),
            "sizes": asdict(sizes),
            "workloads": {},
        }
        for name in only:
            print(f"== {name} ...", flush=True)
            t0, busy0, ours0 = time.monotonic(), busy_cpu(), our_cpu()
            try:
                results["workloads"][name] = WORKLOADS[name](ctx)
            except RuntimeError as e:  # a server that would not start: report it, go on
                results["workloads"][name] = {"error": str(e), "rows": []}
            wall = time.monotonic() - t0
            other = (busy_cpu() - busy0 - (our_cpu() - ours0)) / wall
            results["workloads"][name]["date"] = results["date"]
            results["workloads"][name]["seconds"] = round(wall, 1)
            results["workloads"][name]["other_load_pct"] = round(max(0.0, 100 * other))
            print(report.workload_md(name, results["workloads"][name]), flush=True)
    results["profiles"] = ctx.profiles
    if args.merge:
        merge(results, args.out / "results.json")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (args.out / "results.md").write_text(report.markdown(results))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")


def merge(results: dict[str, Any], old_json: Path) -> None:
    """Add the workloads of an earlier run of the same kind (quick or not) that this one did
    not run, in the usual order."""
    try:
        old = json.loads(old_json.read_text())
    except (OSError, ValueError):
        return
    if old.get("quick") != results["quick"]:
        print(f"--merge: {old_json} is of another kind (--quick or not): not merged")
        return
    ours = results["workloads"]
    for name, w in old.get("workloads", {}).items():
        if name in WORKLOADS:
            w.setdefault("date", old.get("date"))
            ours.setdefault(name, w)
    results["workloads"] = {k: ours[k] for k in sorted(ours, key=list(WORKLOADS).index)}
