"""Machine facts, ratios, and the markdown report."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Callable
from importlib import metadata
from typing import Any

Row = dict[str, Any]
PACKAGES = [
    "uvicorn",
    "granian",
    "hypercorn",
    "fastapi",
    "starlette",
    "sse-starlette",
    "uvloop",
    "httptools",
    "orjson",
    "tidewire",
]


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cmd(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip()
    except OSError:
        return "not installed"


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in PACKAGES},
        "nginx": _cmd(["nginx", "-v"]).removeprefix("nginx version: nginx/"),
        "nchan": _cmd(["dpkg-query", "-W", "-f", "${Version}", "libnginx-mod-nchan"]),
        "curl": _cmd(["curl", "--version"]).split("\n")[0].removeprefix("curl ").split(" ")[0],
    }


def ratios(rows: list[Row], key: str, bases: list[str], lower_is_better: bool = False) -> None:
    """row["vs"][base]: how many times better than `base` (> 1 is better, either direction)."""
    by_name = {r["server"]: r for r in rows}
    for r in rows:
        r["vs"] = {}
        for b in bases:
            if b in by_name and b != r["server"]:
                x, y = r[key], by_name[b][key]
                ok = x and y and not (math.isnan(x) or math.isnan(y))
                r["vs"][b] = (y / x if lower_is_better else x / y) if ok else None


def _n(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def _vs(base: str) -> tuple[str, Callable[[Row], str]]:
    return f"vs {base}", lambda r: "" if r["vs"].get(base) is None else f"{r['vs'][base]:.2f}x"


def _ok(r: Row) -> str:
    return "ok" if not r["problems"] else "see notes"


COLUMNS: dict[str, list[tuple[str, Callable[[Row], str]]]] = {
    "w1": [
        ("server", lambda r: r["server"]),
        ("events/s", lambda r: _n(r["events_per_s"])),
        _vs("original"),
        _vs("fastapi.sse"),
        _vs("sse-starlette"),
        (
            "vs auth off",
            lambda r: "" if r.get("vs_auth_off") is None else f"{r['vs_auth_off']:.3f}x",
        ),
        ("MB/s", lambda r: _n(r["mb_per_s"], 1)),
        ("B/event", lambda r: _n(r["bytes_per_event"])),
        ("server CPU", lambda r: _n(r["server_cpu_pct"]) + "%"),
        ("server us/event", lambda r: _n(r.get("server_us_per_event"), 2)),
        ("client CPU", lambda r: _n(r["client_cpu_pct"]) + "%"),
        ("rounds (events/s)", lambda r: ", ".join(f"{x:,}" for x in r["rounds"])),
        ("format", _ok),
    ],
    "w2": [
        ("server", lambda r: r["server"]),
        ("wall s", lambda r: _n(r["wall_s"], 2)),
        ("x ideal", lambda r: _n(r["x_ideal"], 2)),
        _vs("original (sync)"),
        _vs("fastapi.sse (async)"),
        ("p50 client s", lambda r: _n(r["p50_client_s"], 2)),
        ("server CPU", lambda r: _n(r["server_cpu_pct"]) + "%"),
        ("client CPU", lambda r: _n(r["client_cpu_pct"]) + "%"),
        ("rounds (s)", lambda r: ", ".join(f"{x:.2f}" for x in r["rounds"])),
        ("check", _ok),
    ],
    "w3": [
        ("server", lambda r: r["server"]),
        ("subscribers", lambda r: _n(r["subscribers"])),
        ("deliveries/s", lambda r: _n(r["deliveries_per_s"])),
        ("expected/s", lambda r: _n(r["expected_per_s"])),
        ("p50 ms", lambda r: _n(r["p50_ms"], 1)),
        ("p99 ms", lambda r: _n(r["p99_ms"], 1)),
        ("max ms", lambda r: _n(r["max_ms"], 1)),
        ("lost", lambda r: _n(r["lost"])),
        _vs("nchan"),
        ("published/s", lambda r: _n(r["publish_rate"], 1)),
        (
            "publish RTT p50/p99 ms",
            lambda r: f"{_n(r['publish_rtt_p50_ms'], 1)} / {_n(r['publish_rtt_p99_ms'], 1)}",
        ),
        ("server CPU", lambda r: _n(r["server_cpu_pct"]) + "%"),
        (
            "redis CPU",
            lambda r: "" if r.get("broker_cpu_pct") is None else _n(r["broker_cpu_pct"]) + "%",
        ),
        (
            "load gen CPU (all / busiest of N)",
            lambda r: (
                f"{_n(r['client_cpu_pct'])}% / {_n(r['client_cpu_max_proc_pct'])}% "
                f"of {r.get('load_processes', '?')}"
            ),
        ),
        (
            "machine CPU of 200% (others)",
            lambda r: f"{_n(r.get('machine_cpu_pct'))}% ({_n(r.get('other_cpu_pct'))}%)",
        ),
        ("check", _ok),
    ],
    "w4": [
        ("server", lambda r: r["server"]),
        ("connected", lambda r: _n(r["connected"])),
        ("RSS before MB", lambda r: _n(r["rss_before_mb"], 1)),
        ("RSS after MB", lambda r: _n(r["rss_after_mb"], 1)),
        ("KB/conn", lambda r: _n(r["kb_per_conn"], 1)),
        _vs("fastapi.sse"),
        _vs("nchan"),
        (
            "vs auth off",
            lambda r: "" if r.get("vs_auth_off") is None else f"{r['vs_auth_off']:+.2f} KB",
        ),
        (
            "rounds (KB/conn)",
            lambda r: (
                ", ".join(f"{x:.1f}" for x in r["rounds_kb"])
                if len(r.get("rounds_kb", [])) > 1
                else ""
            ),
        ),
        ("connect s", lambda r: _n(r["connect_s"], 2)),
        ("idle server CPU", lambda r: _n(r["idle_server_cpu_pct"], 1) + "%"),
        ("check", _ok),
    ],
}


def _mbs(r: Row) -> str:
    return _n(r["mb_per_s"])


FILE_COLUMNS: list[tuple[str, Callable[[Row], str]]] = [
    ("server", lambda r: r["server"]),
    ("MB/s", _mbs),
    _vs("nginx"),
    _vs("original (uvicorn)"),
    ("peak RSS growth MiB", lambda r: _n(r["rss_growth_mb"], 1)),
    ("server CPU", lambda r: _n(r["server_cpu_pct"]) + "%"),
    ("server CPU-s/GiB", lambda r: _n(r.get("server_cpu_s_per_gib"), 2)),
    ("of it user", lambda r: _n(r.get("server_user_s_per_gib"), 2)),
    ("client CPU", lambda r: _n(r["client_cpu_pct"]) + "%"),
    ("rounds (MB/s)", lambda r: ", ".join(f"{x:,}" for x in r["rounds"])),
    ("check", _ok),
]
COLUMNS["w5"] = COLUMNS["w5b"] = FILE_COLUMNS
COLUMNS["w6"] = [
    ("server", lambda r: r["server"]),
    ("MB/s", _mbs),
    _vs("nginx PUT"),
    _vs("original multipart (uvicorn)"),
    _vs("own PUT"),
    ("peak RSS growth MiB", lambda r: _n(r["rss_growth_mb"], 1)),
    ("server CPU", lambda r: _n(r["server_cpu_pct"]) + "%"),
    ("server CPU-s/GiB", lambda r: _n(r.get("server_cpu_s_per_gib"), 2)),
    ("of it user", lambda r: _n(r.get("server_user_s_per_gib"), 2)),
    ("client CPU", lambda r: _n(r["client_cpu_pct"]) + "%"),
    ("rounds (MB/s)", lambda r: ", ".join(f"{x:,}" for x in r["rounds"])),
    ("check", _ok),
]

TITLES = {
    "w1": "W1 throughput: one client reads demo events (text + base64 PNG), interval 0",
    "w2": "W2 paced concurrency: clients each start a run of events from a generator",
    "w3": "W3 fan-out: SSE subscribers of one channel, one publisher, 1 or 2 workers",
    "w4": "W4 idle connections: SSE watchers of one channel, server RSS per connection",
    "w5": "W5 download: one client (curl) downloads one big file",
    "w5b": "W5b concurrent downloads: clients (curl) download one file at the same time",
    "w6": "W6 upload: one client (curl) uploads one big file",
}
EXPLAIN = {
    "w1": "`vs X` = events/s ÷ X's events/s (higher is better). Median of the rounds, "
    "interleaved. CPU is % of one core over the client's wall time. `(auth on)`: the same "
    "server with access control on (a second process, `TIDEWIRE_AUTH_SECRET`), the client "
    "sending `Authorization: Bearer <jwt>`; `vs auth off` = its events/s ÷ the auth-off "
    "row's of the same framing (goal >= 0.95x).",
    "w2": "Wall time until the last client has its last event. `vs X` = X's wall ÷ this wall "
    "(higher is better).",
    "w3": "Latency = receive time.time() - the send time.time() the message carries, in "
    "0.1 ms bins. The publisher is open loop: each message leaves on schedule, answered or "
    "not, pipelined on one keep-alive connection. lost = messages a subscriber never got, "
    "summed, once deliveries have stopped for 3 s. `vs nchan` = nchan's p99 ÷ this p99, same "
    "subscribers (higher is better). CPU as % of one core from the first publish to the "
    "last delivery; machine CPU is every process on the machine (2 cores = 200%), and "
    "(others) the part of it that was not this row's server, Redis or load generator; load "
    "gen = the subscriber processes and the publisher.",
    "w4": "KB/conn = (RSS after all connected - RSS before) ÷ connections, server process tree. "
    "`vs X` = X's KB/conn ÷ this (higher is better). The two `floor` rows are references, "
    "not contenders: an app that only holds the connection open, bare on uvicorn and behind "
    "a FastAPI route; the first is uvicorn's own cost per connection. The tidewire rows "
    "(auth off, and on: `TIDEWIRE_AUTH_SECRET`, every watcher sending `Authorization: Bearer "
    "<jwt>`) are run `tidewire_rounds` times, alternating, each in a fresh server; the median "
    "round is shown. `vs auth off` = this KB/conn - the auth-off row's (goal <= +1 KB).",
    "w5": "MB/s = bytes ÷ curl's time_total (`curl -o /dev/null`), median of the rounds, "
    "interleaved, after one warm-up each. `vs X` = MB/s ÷ X's (higher is better). "
    "FileResponse = a bare Starlette `FileResponse` app (reference); the server is in "
    "brackets. X-Accel-Redirect: nginx in front of tidewire, which answers with the header "
    "and nginx sends the file. CPU is % of one core over the transfer.",
    "w5b": "All clients start at once; MB/s = all bytes ÷ the wall time until the last one "
    "ends. Otherwise as W5.",
    "w6": "MB/s = bytes ÷ curl's time_total, until the server's answer (so including what it "
    "does after the last byte: hashing, renaming, metadata). nginx PUT: `dav_methods PUT`, "
    "its body temp files on the same disk. tus: creation POST + one PATCH of the whole file, "
    "timed together; `vs own PUT` = ÷ the same server's raw PUT. Peak RSS growth = the "
    "server's peak RSS during the upload (sampled every 10 ms) - its RSS before, the worst "
    "round. `os.sync()` before each upload, so each starts with no dirty pages, then 1 GiB of "
    "memory touched and freed, so each gets pages the VM's host backs (files.warm_pages says "
    "why). Server CPU-s/GiB = the server's CPU seconds ÷ GiB moved: per core, what counts; `of it "
    "user` leaves out the kernel's part, which the VM's page handling makes noisy.",
}


def workload_md(name: str, w: dict[str, Any], machine: dict[str, Any] | None = None) -> str:
    out = [f"## {TITLES[name]}", ""]
    if w.get("error"):
        return "\n".join([*out, f"**Did not run:** {w['error']}", ""])
    params = ", ".join(f"{k}={v}" for k, v in w["params"].items())
    out += [f"Parameters: {params}. {EXPLAIN[name]}", ""]
    cols = COLUMNS[name]
    out.append("| " + " | ".join(h for h, _ in cols) + " |")
    out.append("|" + "---|" * len(cols))
    out += ["| " + " | ".join(f(r) for _, f in cols) + " |" for r in w["rows"]]
    out.append("")
    out += [f"- **{c}**" for c in w.get("checks", [])]
    out += [f"- {n}" for n in w.get("notes", [])]
    for r in w["rows"]:
        for p in r["problems"]:
            out.append(f"- {r['server']}: {p}")
        if name in ("w1", "w2") and r.get("first_event"):
            last = f", last event `{r['last_event']}`" if r.get("last_event") else ""
            out.append(f"- {r['server']}: first event `{r['first_event']}`{last}")
        if (
            name == "w3"
            and r["publish_response"]
            and r["subscribers"] == w["rows"][0]["subscribers"]
        ):
            resp = " ".join(r["publish_response"].split())[:100]  # one line, whatever its line ends
            out.append(f"- {r['server']}, {r['publisher']}: publish answer `{resp}`")
        if name == "w3" and r.get("by_worker"):
            spread = " / ".join(f"{c:,}" for c in r["by_worker"])
            out.append(f"- {r['server']}, {r['subscribers']:,} subscribers: per worker {spread}")
        if name == "w3" and r.get("bound"):
            out.append(f"- {r['server']}, {r['subscribers']:,} subscribers: {r['bound']}")
        if name == "w3" and (r["other_events"] or r["duplicates"] or r["unparsed"]):
            out.append(
                f"- {r['server']}: other events {r['other_events']}, duplicates "
                f"{r['duplicates']}, unparsed {r['unparsed']}"
            )
    other = w.get("other_load_pct")
    busy = f"; other load on the machine meanwhile: {other}% of one core" if other else ""
    when = f", run {w['date']}" if w.get("date") else ""
    if w.get("loadavg_at_start"):
        when += f", load average at its start {w['loadavg_at_start']}"
    out.append(f"\n_{w.get('seconds', '?')} s for this workload{when}{busy}._\n")
    if w.get("merged"):
        out.append(f"_{merged_note(w, machine)}_\n")
    return "\n".join(out)


def merged_note(w: dict[str, Any], now: dict[str, Any] | None) -> str:
    """What an earlier run's workload (kept by --merge) ran on, where it differs from the
    header (this run's machine and versions)."""
    m = w.get("machine")
    if not m:
        return "From an earlier run (--merge), whose machine and versions were not recorded."
    said = ["From an earlier run (--merge)"]
    if w.get("command"):
        said[0] += f": `{w['command']}`"
    said.append(f"load average at start {m.get('loadavg_at_start')}")
    if now is not None:
        vers = m.get("versions", {})
        differ = [f"{k} {v}" for k, v in vers.items() if now.get("versions", {}).get(k) != v]
        differ += [
            f"{k} {m.get(k)}"
            for k in ("nproc", "cpu", "python", "kernel", "nginx")
            if m.get(k) != now.get(k)
        ]
        said.append("machine and versions then: " + ", ".join(differ) if differ else "same")
    if w.get("tidewire_src"):
        said.append(f"tidewire from `{w['tidewire_src']}`")
    return "; ".join(said) + "."


def pinned_note(pinned: dict[str, list[int]] | None) -> str:
    if not pinned:
        return "Processes not pinned to cores."
    return (
        f"Servers pinned to core {','.join(map(str, pinned['server']))}, the harness and "
        f"load generators to {','.join(map(str, pinned['load']))} (`taskset`)."
    )


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    head = [
        "# tidewire benchmarks" + (" (--quick smoke run: small sizes)" if results["quick"] else ""),
        "",
        f"Run {results['date']} with `{results.get('command') or 'python -m bench'}`. "
        f"Machine: {m['nproc']} cores "
        f"({m['cpu']}), load average at start {m['loadavg_at_start']}, Linux {m['kernel']}, "
        f"Python {m['python']}; {vers}; nginx {m['nginx']}, nchan {m['nchan']}, "
        f"curl {m.get('curl', '?')}. {pinned_note(results.get('pinned'))}",
        "",
        "W1-W4: every Python server under uvicorn `--loop uvloop --http httptools`, 1 worker, "
        "each its own process "
        "on a loopback port (nginx+Nchan: 1 worker); W3 also runs tidewire with 2 workers on "
        "a redis-server of its own (`--workers 2 --broker redis://...`). The load generator "
        "is separate processes "
        "(asyncio + uvloop + httptools); its CPU is shown beside each result: near 100% of one "
        "core would mean it, not the server, was the limit. The machine is shared and noisy: "
        "compare rows of one run, not runs.",
        "",
        "W5-W6 (files): the ASGI server is named in brackets (uvicorn and hypercorn with uvloop, "
        "granian `--interface asgi`), 1 worker each; nginx with one worker; the client is "
        "`curl`.",
        "",
    ]
    merged = [k for k, w in results["workloads"].items() if w.get("merged")]
    if merged:
        fresh = [k for k in results["workloads"] if k not in merged]
        head += [
            f"**Merged (`--merge`)**: the date, machine and versions above are those of the run "
            f"of {', '.join(fresh) or 'nothing'}; {', '.join(merged)} come from earlier runs, "
            "each table saying when, and what its run differed in where that was recorded.",
            "",
        ]
    if results.get("tidewire_src"):
        head += [f"**tidewire was run from `{results['tidewire_src']}`, not src/.**", ""]
    if results.get("base_src"):
        base = results["base_src"]
        head += [f"Rows marked (base): tidewire run from `{base}` (BENCH_BASE_SRC).", ""]
    if results.get("profiles"):
        head += [
            "Profiled with `py-spy record --nonblocking` (tidewire servers only): "
            + ", ".join(f"`{p}`" for p in results["profiles"]),
            "",
        ]
    body = [workload_md(k, w, m) for k, w in results["workloads"].items()]
    return "\n".join(head + body)
