"""`python -m bench`: the workloads side by side in one run; writes results.md and results.json.

The machine is small and shared, so absolute numbers drift between runs: every server of a
workload runs in the same invocation, rounds are interleaved (A B C A B C ...), and the
report leads with ratios. Servers and load generators are separate processes; their CPU is
measured with psutil and reported next to each result.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import charts, files, report, servers
from .adversary import w8
from .apps.image import PNG, ensure_png
from .client import w7
from .clients import Watchers, run_load
from .fanout import w3
from .harness import LIMITS_OFF, QUICK, Ctx, Servers, Sizes, busy_cpu, limits_checks, median
from .memory import w9
from .servers import (
    BASE,
    BASE_SRC,
    Server,
    from_base,
    mint_token,
    nchan,
    nchan_available,
    raise_nofile,
    redis_available,
    skipped,
    tidewire,
    tidewire_auth,
    tidewire_available,
    tidewire_granian,
    tidewire_on,
    unlimited,
    uvicorn,
)

SSE, NDJSON = "text/event-stream", "application/x-ndjson"
AUTH_ON = " (auth on)"  # suffix of a row whose server has access control on


@dataclass
class Target:
    """One row of a table: a server plus the request that exercises it."""

    name: str
    server: Server
    path: str
    accept: str
    framing: str  # "ndjson" or "sse": how the load generator counts events
    headers: dict[str, str] = field(default_factory=dict)  # e.g. the token, auth on


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
    """Run the load `mode` against every target, rounds interleaved (A B C C B A ...) so that
    drift in the machine's other load hits every server alike; results by target name."""
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for i in range(ctx.sizes.rounds):
        # A B C, then C B A: a server's place in the round (after which neighbour, how long
        # into the round) is not the same every time, so a pair of rows compares fairly.
        for t in targets if i % 2 == 0 else targets[::-1]:
            cpu0 = t.server.cpu()
            cfg = {
                "port": t.server.port,
                "path": t.path,
                "accept": t.accept,
                "framing": t.framing,
                "headers": t.headers,
            }
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
            # The same server with access control on, side by side: the token is verified
            # once per request (a stream's connection), so the cost should be ~nothing.
            secret = secrets.token_hex(32)
            twa = srv.start(tidewire_auth("tidewire" + AUTH_ON, None, ctx.work, secret))
            bearer = {"Authorization": f"Bearer {mint_token(secret, 'streams=*')}"}
            path = f"/streams/demo?n={n}&interval=0"
            notes.append(auth_note(twa, "/streams/demo?n=1&interval=0", bearer, NDJSON))
            # And with every limit out of reach: what the limits at their defaults cost.
            twu = srv.start(unlimited(tidewire("tidewire" + LIMITS_OFF, None, ctx.work)))
            targets += [
                Target("tidewire NDJSON", tw, path, NDJSON, "ndjson"),
                Target("tidewire NDJSON" + AUTH_ON, twa, path, NDJSON, "ndjson", bearer),
                Target("tidewire NDJSON" + LIMITS_OFF, twu, path, NDJSON, "ndjson"),
                Target("tidewire SSE", tw, path, SSE, "sse"),
                Target("tidewire SSE" + AUTH_ON, twa, path, SSE, "sse", bearer),
                Target("tidewire SSE" + LIMITS_OFF, twu, path, SSE, "sse"),
            ]
            if BASE_SRC is not None:
                # The code before a change, in the same rounds: before and after in one run.
                twb = srv.start(from_base(tidewire("tidewire" + BASE, None, ctx.work)))
                targets += [
                    Target("tidewire NDJSON" + BASE, twb, path, NDJSON, "ndjson"),
                    Target("tidewire SSE" + BASE, twb, path, SSE, "sse"),
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
        targets = [t for t in targets if not skipped(t.name)]
        deadline = max(120.0, n / 300)
        runs = interleaved(ctx, targets, "stream", {"deadline_s": deadline}, deadline + 30)
    rows = [w1_row(t.name, runs[t.name], n) for t in targets]
    report.ratios(rows, "events_per_s", ["original", "fastapi.sse", "sse-starlette"])
    goal = next((r for r in rows if r["server"] == "sse-starlette"), None)
    checks = auth_checks(rows, "events_per_s", runs)
    checks += limits_checks(rows, "events_per_s", higher=True)
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
        # CPU per event: less moved than events/s by what else the machine runs meanwhile.
        "server_us_per_event": median([1e6 * r["server_cpu"] / n for r in good]),
        "client_cpu_pct": median([100 * r["client_cpu"] / r["wall"] for r in good]),
        "first_event": good[0]["first"] if good else None,
        "last_event": good[0]["last_event"] if good else None,
        "content_type": good[0].get("content_type") if good else None,
        "problems": problems,
    }


def w1_problem(r: dict[str, Any], n: int) -> str | None:
    if r.get("error"):
        return str(r["error"])
    # n messages, plus an `end` event where there is one, plus, in tidewire's SSE, the
    # leading `event: position` block (an id and an empty `data:`, counted as a `data:` line).
    if not n <= r["events"] <= n + 2:
        return f"counted {r['events']} events, expected {n} (+1 end, +1 SSE position block)"
    if "ok" not in r["first"]:
        return f"first event: {r['first']}"
    return None


# --- access control on vs off (W1, W4) ---------------------------------------------------

#: The issue's goal for verifying the token once per connection, against auth off, same run.
AUTH_MAX_SLOWDOWN = 0.05  # of events/s
AUTH_MAX_KB = 1.0  # per idle connection


def auth_note(server: Server, path: str, headers: dict[str, str], accept: str) -> str:
    """Proof that the auth-on server really checks: without the token it refuses, with it not."""

    def status(h: dict[str, str]) -> int | str:
        req = urllib.request.Request(
            f"http://127.0.0.1:{server.port}{path}", headers={"Accept": accept, **h}
        )
        try:
            # The status only: a channel's events never end, so the body is not read.
            with urllib.request.urlopen(req, timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return e.code
        except OSError as e:
            return f"{type(e).__name__}: {e}"

    return (
        f"{server.name}: `tidewire serve` with TIDEWIRE_AUTH_SECRET (HS256), token from "
        f"`tidewire token`, sent as `Authorization: Bearer`; {path} without it: "
        f"HTTP {status({})}, with it: HTTP {status(headers)}"
    )


def auth_checks(
    rows: list[dict[str, Any]], key: str, runs: dict[str, list[dict[str, Any]]] | None = None
) -> list[str]:
    """Each auth-on row against its auth-off twin of the same run: `vs_auth_off` is the
    ratio (W1, events/s) or the difference (W4, KB/conn), and the issue's goal is checked.
    W1 also gives the median of the per-round ratios (a round's two rows ran back to back)
    and server CPU per event, steadier on a shared machine than events/s."""
    by_name = {r["server"]: r for r in rows}
    checks = []
    for r in rows:
        off = by_name.get(r["server"].removesuffix(AUTH_ON))
        if not r["server"].endswith(AUTH_ON) or off is None or not off[key]:
            continue
        bad = r["problems"] or off["problems"]
        if key == "events_per_s":
            x = r["vs_auth_off"] = r[key] / off[key]
            ok = x >= 1 - AUTH_MAX_SLOWDOWN and not bad
            what = f"{x:.3f}x auth off ({r[key]:,.0f} vs {off[key]:,.0f} events/s; goal >= "
            what += f"{1 - AUTH_MAX_SLOWDOWN:.2f}x)"
            if runs is not None:
                pairs = zip(runs[r["server"]], runs[off["server"]], strict=True)
                each = [b["wall"] / a["wall"] for a, b in pairs if not (a["error"] or b["error"])]
                r["vs_auth_off_paired"] = median(each)
                what += f"; per round {', '.join(f'{y:.2f}' for y in each)}, median "
                what += f"{median(each):.3f}x; server CPU {r['server_us_per_event']:.2f} vs "
                what += f"{off['server_us_per_event']:.2f} us/event"
        else:
            d = r["vs_auth_off"] = r[key] - off[key]
            ok = d <= AUTH_MAX_KB and not bad
            what = f"{d:+.2f} KB/conn vs auth off ({r[key]:.2f} vs {off[key]:.2f}; goal <= "
            what += f"+{AUTH_MAX_KB:.0f} KB)"
        checks.append(f"{r['server']}: {what}: " + ("PASS" if ok else "FAIL"))
    return checks


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
        targets = [t for t in targets if not skipped(t.name)]
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
        elif not (n <= r["events_min"] <= r["events_max"] <= n + 2):  # as w1_problem
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


# --- W3 (fanout.py) and W4 ----------------------------------------------------------------


def nchan_server(ctx: Ctx) -> Callable[[], Server]:
    return lambda: nchan(ctx.work, ctx.nofile)


def w4(ctx: Ctx) -> dict[str, Any]:
    rows, checks, notes = [], [], []
    # (row, server, path, headers); the tidewire pair (auth off, on) is run `rounds` times,
    # alternating, each time in a fresh server: a KB or two per connection is 5-10 MB of RSS
    # at 5,000 connections, near what RSS moves by between two runs of the same server.
    Setup = tuple[str, Callable[[], Server], str, dict[str, str]]
    pair: list[Setup] = []
    setups: list[Setup] = []
    if ctx.tidewire is None:
        secret = secrets.token_hex(32)
        bearer = {"Authorization": f"Bearer {mint_token(secret, 'subscribe=*')}"}
        path = "/channels/idle/events"
        if tidewire_on("uvicorn"):
            pair = [
                ("tidewire channel", lambda: tidewire("tidewire", None, ctx.work), path, {}),
                (
                    "tidewire channel" + AUTH_ON,
                    lambda: tidewire_auth("tidewire" + AUTH_ON, None, ctx.work, secret),
                    path,
                    bearer,
                ),
            ]
            if BASE_SRC is not None:
                name = "tidewire channel" + BASE
                pair.append((name, lambda: from_base(tidewire(name, None, ctx.work)), path, {}))
        if tidewire_on("granian", default=False):
            # The same app under granian (BENCH_TIDEWIRE_ON=...,granian), in the same
            # rounds. RSS is the process tree's, as for every row: granian's supervisor
            # and the worker that holds the connections.
            name = "tidewire channel (granian)"
            pair.append((name, lambda: tidewire_granian(name, ctx.work, ctx.nofile), path, {}))
        pair = [setup for setup in pair if not skipped(setup[0])]
    else:
        checks.append(f"tidewire not run: {ctx.tidewire}")

    def asgi(name: str, app: str) -> Callable[[], Server]:
        return lambda: uvicorn(name, app, ctx.work)

    setups += [
        ("fastapi.sse", asgi("fastapi.sse", "bench.apps.fastapi_sse:app"), "/idle", {}),
        ("sse-starlette", asgi("sse-starlette", "bench.apps.starlette_sse:app"), "/idle", {}),
    ]
    if ctx.nchan is None:
        setups.append(("nchan", nchan_server(ctx), "/sub?id=idle", {}))
    else:
        notes.append(f"nchan not run: {ctx.nchan}")
    floors: list[Setup] = [
        ("floor: uvicorn, raw ASGI", asgi("floor-asgi", "bench.apps.floor:raw"), "/idle", {}),
        (
            "floor: FastAPI route",
            asgi("floor-fastapi", "bench.apps.floor:fastapi_app"),
            "/idle",
            {},
        ),
    ]
    rounds: dict[str, list[dict[str, Any]]] = {}
    others = [setup for setup in setups + floors if not skipped(setup[0])]
    if not PNG.exists():
        # fastapi.sse and sse-starlette's apps load it on import (W1 writes it; not run).
        ensure_png()
    for name, make, path, headers in pair * ctx.sizes.rounds + others:
        with Servers(ctx, "w4") as srv:
            server = srv.start(make())
            if headers and name not in rounds:
                notes.append(auth_note(server, path, headers, SSE))
            rounds.setdefault(name, []).append(idle(ctx, name, server, path, headers))
    for runs in rounds.values():
        # The median round as the row (its fields belong together; the lower middle of an
        # even count), every round listed in run order.
        row = sorted(runs, key=lambda r: r["kb_per_conn"])[(len(runs) - 1) // 2]
        row["rounds_kb"] = [round(r["kb_per_conn"], 2) for r in runs]
        row["problems"] = sorted({p for r in runs for p in r["problems"]})
        rows.append(row)
    report.ratios(rows, "kb_per_conn", ["fastapi.sse", "nchan"], lower_is_better=True)
    checks += auth_checks(rows, "kb_per_conn")
    for r in rows:
        if r["server"].startswith("tidewire"):
            ok = r["kb_per_conn"] <= 25 and not r["problems"]
            checks.append(
                f"{r['server']}: {r['kb_per_conn']:.1f} KB/conn (target <= 25): "
                + ("PASS" if ok else "FAIL")
            )
    return {
        "params": {"connections": ctx.sizes.w4_conns, "tidewire_rounds": ctx.sizes.rounds},
        "rows": rows,
        "checks": checks,
        "notes": notes,
    }


def idle(
    ctx: Ctx, name: str, server: Server, path: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    n = ctx.sizes.w4_conns
    # Warm up first, so lazy imports and first-request caches aren't billed to connections.
    warm = Watchers(server.port, path, 20, 1, deadline_s=60, headers=headers)
    warm.ready(timeout=60)
    warm.stop(0, timeout=30)
    time.sleep(1.0)
    before = server.rss()
    w = Watchers(server.port, path, n, 1, deadline_s=600, headers=headers)
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
    "w7": w7,
    "w8": w8,
    "w9": w9,
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--only", default=",".join(WORKLOADS), help="workloads, e.g. w1,w3")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of ~1.5 min")
    ap.add_argument(
        "--rounds", type=int, help="rounds of W1, W2, W5, W5b, W6, W7 (median is reported)"
    )
    ap.add_argument("--no-tidewire", action="store_true", help="baselines only")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent, help="results folder")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the other workloads' results from OUT/results.json (each says its date)",
    )
    ap.add_argument(
        "--no-pin",
        action="store_true",
        help="leave processes unpinned (default: servers on the first core, load on the others;"
        " BENCH_PIN=SERVER:LOAD sets the cores)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the tidewire servers; profiles go to OUT/profiles/",
    )
    ap.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set one of the sizes (bench/harness.py Sizes), e.g. w3_subscribers=1000/10000,"
        " w3_seconds=5, w4_conns=2000; may be repeated",
    )
    args = ap.parse_args(argv)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    if unknown := set(only) - set(WORKLOADS):
        ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    servers.PIN = servers.pinning("off" if args.no_pin else None)
    if servers.PIN is not None:
        # This process and every load generator it starts run on the load cores.
        os.sched_setaffinity(0, servers.PIN.load)
    sizes = QUICK if args.quick else Sizes()
    if args.rounds:
        sizes.rounds = sizes.w6_rounds = args.rounds
    for setting in args.size:
        name, _, value = setting.partition("=")
        current = getattr(sizes, name, None)
        if current is None or not value:
            ap.error(f"--size {setting!r}: NAME=VALUE, NAME one of {', '.join(asdict(sizes))}")
        if isinstance(current, tuple):
            setattr(sizes, name, tuple(int(v) for v in value.split("/")))
        else:
            setattr(sizes, name, type(current)(value))
    why_not_tw = "--no-tidewire" if args.no_tidewire else tidewire_available()
    with tempfile.TemporaryDirectory(prefix="tidewire-bench-") as tmp:
        ctx = Ctx(sizes, Path(tmp), raise_nofile(), why_not_tw, nchan_available())
        ctx.redis = redis_available()
        if args.profile:
            ctx.profile = args.out / "profiles"
            ctx.profile.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
            "machine": report.machine(),
            "pinned": None
            if servers.PIN is None
            else {"server": list(servers.PIN.server), "load": list(servers.PIN.load)},
            "quick": args.quick,
            "tidewire_src": os.environ.get("BENCH_TIDEWIRE_SRC"),
            "base_src": BASE_SRC,
            "sizes": asdict(sizes),
            "workloads": {},
        }
        for name in only:
            print(f"== {name} ...", flush=True)
            load = [round(x, 2) for x in os.getloadavg()]
            t0, busy0, ours0 = time.monotonic(), busy_cpu(), our_cpu()
            try:
                results["workloads"][name] = WORKLOADS[name](ctx)
            except Exception as e:  # a server that would not start, a bug: report it, go on
                # (the other workloads' results are still written)
                error = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
                results["workloads"][name] = {"error": error, "rows": []}
            wall = time.monotonic() - t0
            other = (busy_cpu() - busy0 - (our_cpu() - ours0)) / wall
            results["workloads"][name]["date"] = results["date"]
            results["workloads"][name]["loadavg_at_start"] = load
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
    try:
        drawn = charts.draw(results, args.out / "charts")
    except ImportError:  # matplotlib: bench/requirements.txt
        print("no charts: matplotlib is not installed (bench/install)")
    else:
        print(f"drew {len(drawn)} charts into {args.out / 'charts'}")


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
        if name in WORKLOADS and name not in ours:
            w.setdefault("date", old.get("date"))
            # The header describes this run; an earlier workload keeps the description of
            # the run it came from, when it is known (that run's date), not ours.
            if "machine" not in w and w["date"] == old.get("date"):
                w["machine"] = old.get("machine")
                w.setdefault("command", old.get("command"))
                w.setdefault("tidewire_src", old.get("tidewire_src"))
            w["merged"] = True
            ours[name] = w
    results["workloads"] = {k: ours[k] for k in sorted(ours, key=list(WORKLOADS).index)}
