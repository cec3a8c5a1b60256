"""W7: what the Python client costs, next to the simplest thing that does the same job.

Events: `Client.stream` (NDJSON, SSE, WebSocket) against raw httpx reading the same NDJSON
stream line by line and parsing each line with orjson (and, for reference, with the standard
library's json). Files: `Client.upload` and `Client.download` against `curl` moving the same
file to and from the same server, both writing to disk; and the `tidewire download` command
against `curl -o`, each a whole process (start-up included), with `curl -o` then `sha256sum`
beside them: the check the client makes, done by hand.

Each measurement is its own process (`python -m bench.client MODE '<json>'`, one JSON line
out), so no run inherits another's warm caches or garbage; the clock starts after imports,
at the request. Rounds are interleaved (A B C A B C ...), the median is reported, and each
row is compared with the baseline of its group (the raw httpx + orjson reader; curl).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import report
from .clients import run_json
from .files import CURL, WRITE_OUT, Transfer, child_cpu, curl, make_file, parse
from .harness import Ctx, Servers, median
from .servers import BASE_SRC, PY, ROOT, Server, env, skipped, tidewire

__all__ = ["w7"]

MB = 1e6
RAW = "raw httpx iter_lines + orjson"  # the events baseline
CURL_PUT, CURL_GET = "curl -T (PUT /files/NAME)", "curl -o FILE (GET /files/ID)"
CURL_CHECKED = "curl -o FILE, then sha256sum FILE"
CLI_GET = "tidewire download ID -o FILE (CLI)"


# --- the measuring processes ----------------------------------------------------------------


def measure(
    mode: str, cfg: dict[str, Any], timeout: float, src: Path | None = None
) -> dict[str, Any]:
    """Run one measurement in its own process; a crash or a hang becomes an `error`.
    `src`: the tidewire source to import, if not the one under test (BASE_SRC)."""
    return run_json("bench.client", mode, cfg, timeout, src)


def read_raw(cfg: dict[str, Any]) -> dict[str, Any]:
    """The baseline: httpx's `iter_lines()`, each line parsed (orjson or json)."""
    import httpx
    import orjson

    loads: Callable[[str], Any] = orjson.loads if cfg["parser"] == "orjson" else json.loads
    url = f"{cfg['url']}/streams/demo"
    params = {"n": cfg["n"], "interval": 0}
    first = last = None
    count = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    with (
        httpx.Client(timeout=60) as http,
        http.stream("GET", url, params=params) as response,
    ):
        for line in response.iter_lines():
            if not line:
                continue  # a heartbeat
            event = loads(line)
            count += 1
            if first is None:
                first = event
            last = event
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ok = bool(first and isinstance(first["data"]["img"].get("$blob"), dict))
    return summary(count, wall, cpu, ok, first, last)


def read_client(cfg: dict[str, Any]) -> dict[str, Any]:
    """`Client.stream` on one transport: every event decoded, blobs as `Blob`s."""
    from tidewire import Blob
    from tidewire.client import Client

    if cfg["transport"] == "ws":
        # The client imports websockets when it opens one: here, before the clock, as
        # the rows' other imports are.
        import websockets.sync.client  # noqa: F401

    first = last = None
    count = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    with (
        Client(cfg["url"]) as client,
        client.stream("demo", transport=cfg["transport"], n=cfg["n"], interval=0) as stream,
    ):
        for event in stream:
            count += 1
            if first is None:
                first = event
            last = event
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ok = bool(first and isinstance(first.data["img"], Blob) and first.data["img"][:4] == b"\x89PNG")
    shown = [None if e is None else {"id": e.id, "event": e.event} for e in (first, last)]
    return summary(count, wall, cpu, ok, *shown)


def summary(count: int, wall: float, cpu: float, ok: bool, first: Any, last: Any) -> dict[str, Any]:
    def short(e: Any) -> str | None:
        return None if e is None else json.dumps({k: e[k] for k in ("id", "event")})

    return {
        "events": count,
        "wall": wall,
        "client_cpu": cpu,
        "blob_ok": ok,
        "first": short(first),
        "last": short(last),
    }


def client_upload(cfg: dict[str, Any]) -> dict[str, Any]:
    """`Client.upload` (tus above its 8 MiB threshold), or forced to one multipart POST."""
    from tidewire.client import Client, _transfers

    # Where the client remembers unfinished tus uploads: the run's temp dir, not ~/.cache.
    os.environ["XDG_CACHE_HOME"] = cfg["cache"]
    src = Path(cfg["src"])
    cpu0, t0 = time.process_time(), time.perf_counter()
    with Client(cfg["url"]) as client:
        if cfg["multipart"]:
            # The same code path, with the threshold above this file's size.
            big = src.stat().st_size + 1
            meta = _transfers.upload(client.http, src, tus_threshold=big)
        else:
            meta = client.upload(src)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"wall": wall, "client_cpu": cpu, "meta": meta}


def client_download(cfg: dict[str, Any]) -> dict[str, Any]:
    from tidewire.client import Client

    if cfg.get("ready"):  # bench.perf: say so once imported, start when told
        print("ready", flush=True)
        sys.stdin.readline()
    cpu0, t0 = time.process_time(), time.perf_counter()
    with Client(cfg["url"]) as client:
        path = client.download(cfg["id"], Path(cfg["dest"]), resume=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"wall": wall, "client_cpu": cpu, "size": Path(path).stat().st_size}


MODES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "raw": read_raw,
    "stream": read_client,
    "upload": client_upload,
    "download": client_download,
}


# --- W7a: events ----------------------------------------------------------------------------

#: (row name, measuring mode, its config beyond url and n)
READERS: list[tuple[str, str, dict[str, Any]]] = [
    (RAW, "raw", {"parser": "orjson"}),
    ("raw httpx iter_lines + json.loads", "raw", {"parser": "json"}),
    ("Client.stream ndjson", "stream", {"transport": "ndjson"}),
    ("Client.stream sse", "stream", {"transport": "sse"}),
    ("Client.stream ws", "stream", {"transport": "ws"}),
]


def events(ctx: Ctx, tw: Server) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    n = ctx.sizes.w1_events
    url = f"http://127.0.0.1:{tw.port}"
    readers = [r for r in READERS if not skipped(r[0])]
    for _, mode, extra in readers:  # warm up the server and the page cache of the imports
        measure(mode, {"url": url, "n": 200, **extra}, 120)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in readers}
    timeout = max(120.0, n / 200)
    for _ in range(ctx.sizes.rounds):
        for name, mode, extra in readers:
            cpu0 = tw.cpu()
            res = measure(mode, {"url": url, "n": n, **extra}, timeout)
            res["server_cpu"] = tw.cpu() - cpu0
            runs[name].append(res)
    return [event_row(name, runs[name], n) for name, _, _ in readers], runs


def event_row(name: str, runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    problems: set[str] = set()
    for r in runs:
        if r.get("error"):
            problems.add(str(r["error"]))
        elif r["events"] != n + 1:  # n messages and the `end`
            problems.add(f"counted {r['events']} events, expected {n} + end")
        elif not r["blob_ok"]:
            problems.add(f"the first event's image is not a blob: {r['first']}")
    good = [r for r in runs if not r.get("error") and r["events"] == n + 1]
    rates = [r["events"] / r["wall"] for r in good]
    return {
        "test": "events",
        "server": name,
        "baseline": RAW,
        "rate": median(rates),
        "unit": "events/s",
        "rounds": [round(x) for x in rates],
        "client_cpu_pct": median([100 * r["client_cpu"] / r["wall"] for r in good]),
        "server_cpu_pct": median([100 * r["server_cpu"] / r["wall"] for r in good]),
        "problems": sorted(problems),
    }


# --- W7b: files -----------------------------------------------------------------------------


def curl_download(url: str, dest: Path, work: Path) -> Transfer:
    """curl writing the body to a real file, as the client does."""
    argv = [CURL, "-sS", "-o", str(dest), "-w", WRITE_OUT, url]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return Transfer(error="curl still running after 600 s: killed")
    return parse(work, "w7", False, r.stdout, r.stderr, r.returncode)


def timed(argv: list[str], where: dict[str, str] | None = None) -> tuple[float, str | None]:
    """A whole process, from its start to its exit: (seconds, what went wrong or None)."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, cwd=ROOT, env=where, capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        return 600.0, f"{argv[0]} still running after 600 s: killed"
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        return seconds, f"exited {r.returncode}: {r.stderr.decode(errors='replace')[-300:]}"
    return seconds, None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def transfers(ctx: Ctx, tw: Server) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    size = ctx.sizes.w6_bytes
    base = f"http://127.0.0.1:{tw.port}"
    work = ctx.work / "w7-files"
    work.mkdir(exist_ok=True)
    src = make_file(work / "upload.bin", size)
    digest = sha256(src)
    dest = work / "download.bin"

    def delete(file_id: str) -> None:
        import httpx

        httpx.delete(f"{base}/files/{file_id}", timeout=30)

    def put() -> tuple[float, float, str | None]:
        client0 = child_cpu()
        t = curl(f"{base}/files/{src.name}", ["-T", str(src)], ctx.work, keep_body=True)
        if t.error or t.status != 201:
            return t.seconds, 0.0, t.error or f"HTTP {t.status}: {t.body[:200]}"
        meta = json.loads(t.body)
        delete(meta["id"])
        return t.seconds, child_cpu() - client0, stored(meta)

    def upload(multipart: bool) -> Callable[[], tuple[float, float, str | None]]:
        cfg = {"url": base, "src": str(src), "multipart": multipart, "cache": str(work)}

        def run() -> tuple[float, float, str | None]:
            res = measure("upload", cfg, 900)
            if res.get("error"):
                return 0.0, 0.0, str(res["error"])
            delete(res["meta"]["id"])
            return res["wall"], res["client_cpu"], stored(res["meta"])

        return run

    def stored(meta: dict[str, Any]) -> str | None:
        ok = meta.get("size") == size and meta.get("sha256") == digest
        return None if ok else f"stored {meta.get('size')} bytes, sha256 {meta.get('sha256')}"

    # The file to download, stored once.
    t = curl(f"{base}/files/{src.name}", ["-T", str(src)], ctx.work, keep_body=True)
    if t.error or t.status != 201:
        raise RuntimeError(f"PUT to tidewire answered {t.status} {t.error or t.body[:300]}")
    file_id = json.loads(t.body)["id"]

    def get() -> tuple[float, float, str | None]:
        client0 = child_cpu()
        t = curl_download(f"{base}/files/{file_id}", dest, ctx.work)
        cpu = child_cpu() - client0
        wrong = t.error or (None if t.down == size else f"HTTP {t.status}, {t.down} bytes")
        dest.unlink(missing_ok=True)
        return t.seconds, cpu, wrong

    def get_checked() -> tuple[float, float, str | None]:
        """curl, then `sha256sum` of what it wrote against the digest: one shell, timed whole."""
        url = f"{base}/files/{file_id}"
        script = f'{CURL} -sS -o "$1" "$2" && sha256sum "$1" | grep -q "^$3 "'
        client0 = child_cpu()
        seconds, wrong = timed(["sh", "-c", script, "sh", str(dest), url, digest])
        cpu = child_cpu() - client0
        dest.unlink(missing_ok=True)
        return seconds, cpu, wrong and f"curl or the sha256 check: {wrong}"

    def cli_from(src: Path | None) -> Callable[[], tuple[float, float, str | None]]:
        def cli() -> tuple[float, float, str | None]:
            argv = [PY, "-m", "tidewire", "download", file_id, "-o", str(dest), "--url", base]
            client0 = child_cpu()
            seconds, wrong = timed(argv, env(src) if src is not None else env())
            cpu = child_cpu() - client0
            if wrong is None and (not dest.exists() or dest.stat().st_size != size):
                wrong = "wrong size"
            dest.unlink(missing_ok=True)
            return seconds, cpu, wrong

        return cli

    def download_from(src: Path | None) -> Callable[[], tuple[float, float, str | None]]:
        def download() -> tuple[float, float, str | None]:
            cfg = {"url": base, "id": file_id, "dest": str(dest)}
            res = measure("download", cfg, 900, src)
            dest.unlink(missing_ok=True)
            if res.get("error"):
                return 0.0, 0.0, str(res["error"])
            return res["wall"], res["client_cpu"], None if res["size"] == size else "wrong size"

        return download

    from tidewire.client._transfers import PATCH_SIZE

    tus = f"Client.upload (tus, {PATCH_SIZE >> 20} MiB PATCHes)"
    # (test, row name, baseline, how, is it an upload)
    plan: list[tuple[str, str, str, Callable[[], tuple[float, float, str | None]], bool]] = [
        ("upload", CURL_PUT, CURL_PUT, put, True),
        ("upload", tus, CURL_PUT, upload(False), True),
        ("upload", "Client.upload multipart (threshold raised)", CURL_PUT, upload(True), True),
        ("download", CURL_GET, CURL_GET, get, False),
        ("download", CURL_CHECKED, CURL_GET, get_checked, False),
        ("download", "Client.download", CURL_GET, download_from(None), False),
        ("download", CLI_GET, CURL_GET, cli_from(None), False),
    ]
    if BASE_SRC is not None:  # the client as it was, side by side
        plan += [
            ("download", "Client.download (base)", CURL_GET, download_from(BASE_SRC), False),
            ("download", f"{CLI_GET} (base)", CURL_GET, cli_from(BASE_SRC), False),
        ]
    plan = [step for step in plan if not skipped(step[1])]
    for source in (None, BASE_SRC):  # the CLI's imports compiled and in the page cache
        if source is not None or not skipped(CLI_GET):
            timed([PY, "-m", "tidewire", "download", "--help"], env(source) if source else env())
    runs: dict[str, list[dict[str, Any]]] = {name: [] for _, name, *_ in plan}
    for _ in range(ctx.sizes.rounds):
        for _test, name, _base, how, up in plan:
            if up:
                os.sync()  # the last upload's dirty pages are written back now, not during this
            cpu0 = tw.cpu()
            seconds, client_cpu, wrong = how()
            seconds = max(seconds, 1e-9)
            runs[name].append(
                {
                    "mb_per_s": size / seconds / MB,
                    "client_cpu_pct": 100 * client_cpu / seconds,
                    "server_cpu_pct": 100 * (tw.cpu() - cpu0) / seconds,
                    "problems": [wrong] if wrong else [],
                }
            )
    delete(file_id)
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for test, name, baseline, _how, _up in plan:
        rs = runs[name]
        good = [r for r in rs if not r["problems"]]
        rows.append(
            {
                "test": f"{test} {size / 2**20:,.0f} MiB",
                "server": name,
                "baseline": baseline,
                "rate": median([r["mb_per_s"] for r in good]),
                "unit": "MB/s",
                "rounds": [round(r["mb_per_s"]) for r in rs],
                "client_cpu_pct": median([r["client_cpu_pct"] for r in good]),
                "server_cpu_pct": median([r["server_cpu_pct"] for r in good]),
                "problems": sorted({p for r in rs for p in r["problems"]}),
            }
        )
    return rows, runs


# --- the workload ---------------------------------------------------------------------------


def check(r: dict[str, Any], target: float) -> str:
    x = r["vs"].get("baseline")
    if x is None:
        return f"{r['server']}: no ratio to {r['baseline']}: FAIL"
    ok = x >= target and not r["problems"]
    return f"{r['server']} ({r['test']}): {x:.2f}x {r['baseline']} (target >= {target}x): " + (
        "PASS" if ok else "FAIL"
    )


def versus_baseline(rows: list[dict[str, Any]]) -> None:
    """row["vs"]["baseline"]: the row's rate ÷ its group's baseline rate (higher is better)."""
    rates = {(r["test"], r["server"]): r["rate"] for r in rows}
    for r in rows:
        base = rates.get((r["test"], r["baseline"]))
        ok = base and r["rate"] and base == base and r["rate"] == r["rate"]  # not NaN
        r["vs"] = {"baseline": r["rate"] / base if ok else None}


def w7(ctx: Ctx) -> dict[str, Any]:
    """W7: events/s through `Client.stream`, MB/s through `Client.upload`/`download`."""
    if ctx.tidewire is not None:
        return {"error": f"tidewire not run: {ctx.tidewire}", "rows": []}
    if shutil.which("curl") is None:
        return {"error": "curl is not installed", "rows": []}
    data = ctx.work / "w7-data"
    with Servers(ctx, "w7") as srv:
        tw = srv.start(tidewire("tidewire", None, ctx.work, "--data-dir", str(data)))
        event_rows, event_runs = events(ctx, tw)
        file_rows, file_runs = transfers(ctx, tw)
    shutil.rmtree(data, ignore_errors=True)
    rows = event_rows + file_rows
    versus_baseline(rows)
    checks = [check(r, 0.8) for r in rows if r["server"] == "Client.stream ndjson"]
    checks += [
        check(r, 0.8)
        for r in file_rows
        if r["server"].startswith("Client.") or r["server"] == CLI_GET
    ]
    params = {
        "events": ctx.sizes.w1_events,
        "file_bytes": ctx.sizes.w6_bytes,
        "rounds": ctx.sizes.rounds,
    }
    notes = [
        f"events baseline: {RAW} (httpx {version('httpx')}, orjson {version('orjson')}); "
        "the client also decodes each image's base64 into a `Blob`",
        "every measurement is its own process; the clock starts at the request, after imports",
        f"sha256 on this machine: {sha256_rate():,.0f} MB/s (hashlib, one core, in memory); "
        "Client.download and Client.upload hash every byte to check it, curl does not: "
        f"`{CURL_CHECKED}` is curl with that check made by hand (one `sh -c`, timed whole)",
        f"`{CLI_GET}`: the command's whole process, start-up (imports) included, timed by the "
        "harness; the other rows are timed from the request (curl's time_total, the client's "
        "call)",
    ]
    return {
        "params": params,
        "rows": rows,
        "checks": checks,
        "notes": notes,
        "runs": {**event_runs, **file_runs},
    }


def sha256_rate() -> float:
    block = os.urandom(64 << 20)
    t0 = time.perf_counter()
    hashlib.sha256(block).digest()
    return len(block) / (time.perf_counter() - t0) / MB


def version(pkg: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "?"


# --- the report's table (report.py keys its tables by workload) -----------------------------


def _rate(r: dict[str, Any]) -> str:
    return f"{report._n(r['rate'])} {r['unit']}"


report.TITLES["w7"] = "W7 client overhead: the Python client against raw httpx and curl"
report.EXPLAIN["w7"] = (
    "Events: the demo stream (text + base64 PNG per event), interval 0; events/s = events "
    "÷ the reader's wall time from the request to the last event. Files: MB/s = bytes ÷ the "
    "transfer's time (curl's time_total; the client's call, timed in its process); the "
    "download writes to a file on disk in both cases, and the client also checks the sha256. "
    "`vs baseline` = rate ÷ the baseline's rate in the same run (higher is better). CPU is "
    "% of one core over the transfer; client CPU is the reading process's own."
)
report.COLUMNS["w7"] = [
    ("test", lambda r: r["test"]),
    ("client", lambda r: r["server"]),
    ("rate", _rate),
    (
        "vs baseline",
        lambda r: "" if r["vs"].get("baseline") is None else f"{r['vs']['baseline']:.2f}x",
    ),
    ("baseline", lambda r: r["baseline"]),
    ("client CPU", lambda r: report._n(r["client_cpu_pct"]) + "%"),
    ("server CPU", lambda r: report._n(r["server_cpu_pct"]) + "%"),
    ("rounds", lambda r: ", ".join(f"{x:,}" for x in r["rounds"])),
    ("check", report._ok),
]


def main() -> None:
    mode, cfg = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(MODES[mode](cfg), default=str), flush=True)


if __name__ == "__main__":
    main()
