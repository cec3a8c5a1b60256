"""W5, W5b, W6: files down and up, tidewire beside nginx and the original; curl is the client.

Every transfer is one `curl` process (`-o /dev/null` for downloads, `-T` or `-F` for uploads):
a C client that is not the bottleneck below ~1 GB/s, the same for every server. MB/s is
bytes ÷ curl's own `time_total` (the request's first byte to the response's last), so
process start-up is not billed to the server. W5b starts its curls at once and counts the
wall time until the last one ends.

Servers of a workload run side by side and rounds are interleaved (A B C A B C ...); the
median round is reported, with ratios to nginx doing the same thing in the same run.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from . import report
from .harness import Ctx, Servers, median
from .servers import ASGI_SERVERS, BASE_SRC, TIDEWIRE_ON, Server, nginx

__all__ = ["w5", "w5b", "w6"]

CURL = shutil.which("curl") or "curl"
ACCEL = "/_accel/"  # tidewire's Settings.accel_redirect in the X-Accel-Redirect rows
MB = 1e6
RSS_LIMIT = 64 << 20  # W6: a tidewire server's peak RSS during an upload minus its RSS before


def why_not() -> str | None:
    """None when the file workloads can run, else why not."""
    if shutil.which("curl") is None:
        return "curl is not installed"
    if shutil.which("nginx") is None:
        return "nginx is not installed (run bench/install)"
    return None


def make_file(path: Path, size: int) -> Path:
    """`size` bytes that no layer could compress: a 4 MiB random block, repeated."""
    block = os.urandom(4 << 20)
    with path.open("wb") as f:
        left = size
        while left:
            left -= f.write(block[: min(left, len(block))])
    return path


# --- curl -------------------------------------------------------------------------------------

# curl prints this after the body: status, bytes down, bytes up, seconds.
WRITE_OUT = "\n%{http_code} %{size_download} %{size_upload} %{time_total}"


@dataclass
class Transfer:
    status: int = 0
    down: int = 0
    up: int = 0
    seconds: float = 0.0
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None


def child_cpu() -> float:
    """CPU seconds of the harness's reaped children: around a curl, that curl's CPU."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def curl_argv(keep_body: bool, work: Path, tag: str) -> list[str]:
    # `Expect:` off: curl would otherwise wait up to 1 s for a `100 Continue` that not every
    # server sends, and the point is the servers' throughput, not that handshake.
    out = str(work / f"body-{tag}") if keep_body else "/dev/null"
    return [CURL, "-sS", "-H", "Expect:", "-o", out, "-D", str(work / f"headers-{tag}")]


def parse(work: Path, tag: str, keep_body: bool, stdout: str, stderr: str, rc: int) -> Transfer:
    t = Transfer()
    try:
        status, down, up, secs = stdout.strip().splitlines()[-1].split()
        t.status, t.down, t.up, t.seconds = int(status), int(down), int(up), float(secs)
    except (ValueError, IndexError):
        t.error = f"curl exited {rc}: {stderr.strip()[-300:]}"
        return t
    if rc != 0:
        t.error = f"curl exited {rc}: {stderr.strip()[-300:]}"
    head = work / f"headers-{tag}"
    if head.exists():
        for line in head.read_text(errors="replace").splitlines():
            k, sep, v = line.partition(":")
            if sep:
                t.headers[k.strip().lower()] = v.strip()
        head.unlink()
    body = work / f"body-{tag}"
    if keep_body and body.exists():
        t.body = body.read_text(errors="replace")[:2000]
        body.unlink()
    return t


def curl(url: str, args: list[str], work: Path, keep_body: bool = False) -> Transfer:
    """One request by curl, to completion (or a 10-minute timeout)."""
    argv = [*curl_argv(keep_body, work, "1"), "-w", WRITE_OUT, *args, url]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return Transfer(error="curl still running after 600 s: killed")
    return parse(work, "1", keep_body, r.stdout, r.stderr, r.returncode)


def curls(urls: list[tuple[str, list[str]]], work: Path) -> tuple[list[Transfer], float]:
    """Several curls at once; their results and the wall time until the last one ended."""
    t0 = time.monotonic()
    procs = []
    for i, (url, args) in enumerate(urls):
        argv = [*curl_argv(False, work, str(i)), "-w", WRITE_OUT, *args, url]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()  # our own child, by its pid
            out, err = p.communicate()
        outs.append((out.decode(), err.decode(), p.returncode))
    wall = time.monotonic() - t0
    return [parse(work, str(i), False, *o) for i, o in enumerate(outs)], wall


class PeakRSS:
    """Samples a server's RSS (its process tree) every 10 ms while in the `with` block."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.before = server.rss()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            # A worker that just exited: sample again next time.
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.server.rss())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.server.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.before


# --- servers ----------------------------------------------------------------------------------


@dataclass
class Setup:
    """The files and folders of one workload, and the servers that serve them."""

    ctx: Ctx
    srv: Servers
    root: Path = field(init=False)  # files to download; nginx's PUTs; the original's cwd
    data: Path = field(init=False)  # tidewire's storage, shared by every tidewire server

    def __post_init__(self) -> None:
        self.root = self.ctx.work / f"files-{self.srv.label}"
        self.data = self.root / "tidewire-data"
        for d in (self.root / "static", self.root / "put", self.root / "original", self.data):
            d.mkdir(parents=True, exist_ok=True)

    def nginx(self, tidewire: Server | None = None) -> Server:
        """nginx sending files with sendfile and storing PUTs (dav), or, given a tidewire
        server, in front of it: /files/ proxied, `X-Accel-Redirect`s sent from its storage."""
        if tidewire is None:
            name = "nginx"
            routes = f"""
    location /static/ {{ alias {self.root}/static/; }}
    location /put/ {{ alias {self.root}/put/; dav_methods PUT; create_full_put_path on; }}"""
        else:
            name = "nginx-accel"
            routes = f"""
    location / {{
      proxy_pass http://127.0.0.1:{tidewire.port};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_request_buffering off;
    }}
    location {ACCEL} {{ internal; alias {self.data}/files/; }}"""
        # sendfile and tcp_nopush as Debian's own nginx.conf has them; client_body_temp_path
        # (set by servers.nginx) is in our temp dir, the same disk as the files.
        http = f"""
  sendfile on;
  tcp_nopush on;
  client_max_body_size 0;
  server {{
    listen 127.0.0.1:{{port}};{routes}
  }}"""
        return self.srv.start(nginx(name, self.ctx.work, self.ctx.nofile, http))

    def original(self) -> Server:
        s = ASGI_SERVERS["uvicorn"]("original", "bench.apps.original_files:app", self.ctx.work)
        s.cwd = self.root / "original"  # it saves into ./uploads
        return self.srv.start(s)

    def file_response(self, kind: str, chunk: int | None = None) -> Server:
        name = f"FileResponse ({kind}{f', {chunk >> 20} MiB chunks' if chunk else ''})"
        s = ASGI_SERVERS[kind](name, "bench.apps.file_response:app", self.ctx.work)
        s.extra_env = {"BENCH_FILES": str(self.root / "static"), "BENCH_CHUNK": str(chunk or "")}
        return self.srv.start(s)

    def tidewire(self, kind: str, accel: bool = False, base: bool = False) -> Server:
        """tidewire on the ASGI server `kind`; `base`: from BENCH_TIDEWIRE_BASE_SRC."""
        name = f"tidewire ({kind}{', accel' if accel else ''}{', base' if base else ''})"
        s = ASGI_SERVERS[kind](name, "bench.apps.files:app", self.ctx.work)
        s.extra_env = {"TIDEWIRE_DATA_DIR": str(self.data), "BENCH_ACCEL": ACCEL if accel else ""}
        if base:
            assert BASE_SRC is not None
            s.src = BASE_SRC
        return self.srv.start(s)


def tidewire_kinds() -> list[tuple[str, bool]]:
    """(ASGI server, base) for each tidewire row: every server (or BENCH_TIDEWIRE_ON's),
    each followed by its base row when BENCH_TIDEWIRE_BASE_SRC is set."""
    kinds = [k for k in ASGI_SERVERS if not TIDEWIRE_ON or k in TIDEWIRE_ON]
    return [(k, base) for k in kinds for base in ((False, True) if BASE_SRC else (False,))]


def warm_pages(size: int) -> None:
    """Touch, then free, `size` bytes of memory, so that the upload that follows gets pages
    the VM's host backs now.

    This VM returns free memory to its host (virtio-balloon free page reporting, 8 MiB
    blocks, about 2 s after they are freed): writing 1 GiB into the page cache cost 0.2 CPU-s
    in pages freed a moment before, 1.2 in pages freed 5 s before, 3 in pages never used
    (bench W6, Dec 2026). Which of them an upload got decided its CPU per GiB, by 2x from
    one run to the next whatever the server. Given warm pages every server is measured for
    its own work, as on a machine without that reporting.
    """
    buf = bytearray(size)
    buf[::4096] = b"\1" * len(range(0, size, 4096))
    del buf


# --- W5 and W5b: downloads ------------------------------------------------------------------


@dataclass
class Download:
    """A row: a server and the curl arguments that fetch the file from it."""

    name: str
    server: Server
    path: str
    args: list[str] = field(default_factory=list)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}{self.path}"


def tidewire_put(server: Server, src: Path, work: Path) -> str:
    """Store `src` in tidewire (PUT /files/{name}); its id."""
    t = curl(f"http://127.0.0.1:{server.port}/files/{src.name}", ["-T", str(src)], work, True)
    if t.error or t.status != 201:
        raise RuntimeError(f"PUT to {server.name} answered {t.status} {t.error or t.body[:300]}")
    return str(json.loads(t.body)["id"])


def downloads(ctx: Ctx, setup: Setup, size: int) -> tuple[list[Download], list[str]]:
    """Start every download server; the file they serve is `size` bytes."""
    src = make_file(setup.root / "static" / "big.bin", size)
    notes: list[str] = []
    ng = setup.nginx()
    rows = [
        Download("nginx", ng, "/static/big.bin"),
        Download(
            "original (uvicorn)",
            setup.original(),
            "/downloadfile/",
            ["-H", "content-type: application/json", "--data", json.dumps({"filename": str(src)})],
        ),
    ]
    rows += [
        Download(f"FileResponse ({k})", setup.file_response(k), "/big.bin") for k in ASGI_SERVERS
    ]
    # Where the server has no pathsend, Starlette reads and sends chunk_size bytes at a time
    # (64 KiB): this row shows what a larger chunk alone is worth on uvicorn.
    big = setup.file_response("uvicorn", chunk=1 << 20)
    rows.append(Download(big.name, big, "/big.bin"))
    if ctx.tidewire is not None:
        notes.append(f"tidewire not run: {ctx.tidewire}")
        return rows, notes
    tw = [setup.tidewire(k, base=base) for k, base in tidewire_kinds()]
    try:
        id = tidewire_put(tw[0], src, ctx.work)  # one storage folder: all servers have it
    except RuntimeError as e:
        notes.append(f"tidewire not run: {e}")
        return rows, notes
    rows += [Download(s.name, s, f"/files/{id}") for s in tw]
    front = setup.nginx(setup.tidewire("uvicorn", accel=True))
    rows.append(Download("tidewire X-Accel-Redirect (nginx + uvicorn)", front, f"/files/{id}"))
    return rows, notes


def summary_row(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if not r["problems"]]
    return {
        "server": name,
        "mb_per_s": median([r["mb_per_s"] for r in good]),
        "rounds": [round(r["mb_per_s"]) for r in runs],
        "server_cpu_pct": median([r["server_cpu_pct"] for r in good]),
        # What decides how many transfers a core serves, whatever the disk did meanwhile.
        "server_cpu_s_per_gib": median([r["server_cpu_s_per_gib"] for r in good]),
        "server_user_s_per_gib": median([r["server_user_s_per_gib"] for r in good]),
        "client_cpu_pct": median([r["client_cpu_pct"] for r in good]),
        # The worst round: the peak RSS while sending (or storing) minus the RSS before.
        "rss_growth_mb": max((r["rss_growth"] for r in runs), default=0) / 2**20,
        "problems": sorted({p for r in runs for p in r["problems"]}),
    }


def w5(ctx: Ctx) -> dict[str, Any]:
    """W5: one client downloads one big file."""
    size = ctx.sizes.w5_bytes

    def once(d: Download) -> dict[str, Any]:
        cpu0, client0 = (d.server.cpu(), d.server.cpu_user()), child_cpu()
        with PeakRSS(d.server) as rss:
            t = curl(d.url(), d.args, ctx.work)
        return measured(d.server, t.seconds, [t], size, cpu0, client0, rss)

    return download_workload(ctx, "w5", size, once, {"bytes": size})


def w5b(ctx: Ctx) -> dict[str, Any]:
    """W5b: clients download one file at the same time; aggregate MB/s."""
    size, n = ctx.sizes.w5b_bytes, ctx.sizes.w5b_clients

    def once(d: Download) -> dict[str, Any]:
        cpu0, client0 = (d.server.cpu(), d.server.cpu_user()), child_cpu()
        with PeakRSS(d.server) as rss:
            ts, wall = curls([(d.url(), d.args)] * n, ctx.work)
        return measured(d.server, wall, ts, size, cpu0, client0, rss)

    return download_workload(ctx, "w5b", size, once, {"bytes": size, "clients": n})


def measured(
    server: Server,
    wall: float,
    ts: list[Transfer],
    size: int,
    cpu0: tuple[float, float],
    client0: float,
    rss: PeakRSS,
) -> dict[str, Any]:
    server_cpu, client_cpu = server.cpu() - cpu0[0], child_cpu() - client0
    server_user = server.cpu_user() - cpu0[1]
    problems = [t.error or f"HTTP {t.status}, {t.down} bytes" for t in ts if bad(t, size)]
    wall = max(wall, 1e-9)
    moved = sum(t.down for t in ts)
    return {
        "mb_per_s": moved / wall / MB,
        "server_cpu_pct": 100 * server_cpu / wall,
        "server_cpu_s_per_gib": server_cpu / max(moved, 1) * 2**30,
        "server_user_s_per_gib": server_user / max(moved, 1) * 2**30,
        "client_cpu_pct": 100 * client_cpu / wall,
        "rss_growth": rss.growth,
        "problems": problems,
    }


def bad(t: Transfer, size: int) -> bool:
    return bool(t.error) or t.status != 200 or t.down != size


def download_workload(
    ctx: Ctx,
    label: str,
    size: int,
    once: Callable[[Download], dict[str, Any]],
    params: dict[str, Any],
) -> dict[str, Any]:
    if why := why_not():
        return {"error": why, "rows": []}
    with Servers(ctx, label) as srv:
        setup = Setup(ctx, srv)
        targets, notes = downloads(ctx, setup, size)
        for d in targets:  # warm up: imports, first-request caches, the page cache
            once(d)
        runs: dict[str, list[dict[str, Any]]] = {d.name: [] for d in targets}
        for _ in range(ctx.sizes.rounds):
            for d in targets:
                runs[d.name].append(once(d))
        shutil.rmtree(setup.root, ignore_errors=True)
    rows = [summary_row(d.name, runs[d.name]) for d in targets]
    report.ratios(rows, "mb_per_s", ["nginx", "original (uvicorn)"])
    checks = [target_check(r, "nginx", 0.8) for r in rows if r["server"].startswith("tidewire")]
    return {
        "params": {**params, "rounds": ctx.sizes.rounds},
        "rows": rows,
        "checks": checks,
        "notes": notes,
    }


def target_check(r: dict[str, Any], base: str, target: float) -> str:
    x = r["vs"].get(base)
    if x is None:
        return f"{r['server']}: no ratio to {base}: FAIL"
    ok = x >= target and not r["problems"]
    return f"{r['server']}: {x:.2f}x {base} (target >= {target}x): " + ("PASS" if ok else "FAIL")


# --- W6: uploads ----------------------------------------------------------------------------


@dataclass
class Upload:
    """A row: how to send the file to one server, and how to check and remove what it stored."""

    name: str
    server: Server
    send: Callable[[], tuple[float, Transfer]]  # -> (seconds, the last response)
    stored: Callable[[Transfer], str | None]  # -> what is wrong with what was stored, if any
    remove: Callable[[Transfer], None]


def w6(ctx: Ctx) -> dict[str, Any]:
    """W6: one client uploads one big file: raw PUT, multipart, tus."""
    size = ctx.sizes.w6_bytes
    notes: list[str] = []
    if why := why_not():
        return {"error": why, "rows": []}
    with Servers(ctx, "w6") as srv:
        setup = Setup(ctx, srv)
        # Warm up with a 1 MiB file (imports, first-request caches), then the real one.
        src = make_file(ctx.work / "upload.bin", 1 << 20)
        targets = uploads(ctx, setup, src, notes)
        for u in targets:
            _, t = u.send()
            u.remove(t)
        make_file(src, size)
        runs: dict[str, list[dict[str, Any]]] = {u.name: [] for u in targets}
        for _ in range(ctx.sizes.w6_rounds):
            for u in targets:
                runs[u.name].append(upload_once(u, size))
        src.unlink(missing_ok=True)
        shutil.rmtree(setup.root, ignore_errors=True)
    rows = [summary_row(u.name, runs[u.name]) for u in targets]
    report.ratios(rows, "mb_per_s", ["nginx PUT", "original multipart (uvicorn)"])
    checks = []
    for r in rows:
        if not r["server"].startswith("tidewire"):
            continue
        mode = r["server"].split()[1]
        if mode == "PUT":
            checks.append(target_check(r, "nginx PUT", 0.8))
        elif mode == "multipart":
            checks.append(target_check(r, "nginx PUT", 0.7))
        elif mode == "tus":
            put = r["server"].replace(" tus ", " PUT ")
            base = next((b for b in rows if b["server"] == put), None)
            if base and base["mb_per_s"]:
                r["vs"]["own PUT"] = r["mb_per_s"] / base["mb_per_s"]
            checks.append(target_check(r, "own PUT", 0.8))
        growth = r["rss_growth_mb"]
        ok = growth * 2**20 < RSS_LIMIT
        checks.append(
            f"{r['server']}: peak RSS +{growth:.1f} MiB (target < {RSS_LIMIT >> 20}): "
            + ("PASS" if ok else "FAIL")
        )
    params = {"bytes": size, "rounds": ctx.sizes.w6_rounds}
    return {"params": params, "rows": rows, "checks": checks, "notes": notes}


def upload_once(u: Upload, size: int) -> dict[str, Any]:
    # Dirty pages of the previous upload are written back now, not during this one.
    os.sync()
    warm_pages(size + (64 << 20))
    cpu0, user0, client0 = u.server.cpu(), u.server.cpu_user(), child_cpu()
    with PeakRSS(u.server) as rss:
        seconds, t = u.send()
    server_cpu, client_cpu = u.server.cpu() - cpu0, child_cpu() - client0
    server_user = u.server.cpu_user() - user0
    problems = [t.error] if t.error else []
    if not problems and (wrong := u.stored(t)):
        problems.append(wrong)
    if t.up < size and not problems:  # multipart sends a little more: its framing
        problems.append(f"curl sent {t.up} bytes, fewer than {size}")
    u.remove(t)
    seconds = max(seconds, 1e-9)
    return {
        "mb_per_s": size / seconds / MB,
        "server_cpu_pct": 100 * server_cpu / seconds,
        "server_cpu_s_per_gib": server_cpu / size * 2**30,
        "server_user_s_per_gib": server_user / size * 2**30,
        "client_cpu_pct": 100 * client_cpu / seconds,
        "rss_growth": rss.growth,
        "problems": problems,
    }


def uploads(ctx: Ctx, setup: Setup, src: Path, notes: list[str]) -> list[Upload]:
    work = ctx.work

    def file_size(path: Path) -> Callable[[Transfer], str | None]:
        def check(t: Transfer) -> str | None:
            if t.status not in (200, 201, 204):
                return f"HTTP {t.status}: {t.body[:200]}"
            have = path.stat().st_size if path.exists() else None
            return None if have == src.stat().st_size else f"stored {have} bytes"

        return check

    ng = setup.nginx()
    put_to = setup.root / "put" / src.name
    rows = [
        Upload(
            "nginx PUT",
            ng,
            timed(
                lambda: curl(f"http://127.0.0.1:{ng.port}/put/{src.name}", ["-T", str(src)], work)
            ),
            file_size(put_to),
            lambda t: put_to.unlink(missing_ok=True),
        )
    ]
    orig = setup.original()
    saved = setup.root / "original" / "uploads" / src.name
    rows.append(
        Upload(
            "original multipart (uvicorn)",
            orig,
            timed(
                lambda: curl(
                    f"http://127.0.0.1:{orig.port}/uploadfile/", ["-F", f"file=@{src}"], work, True
                )
            ),
            file_size(saved),
            lambda t: saved.unlink(missing_ok=True),
        )
    )
    if ctx.tidewire is not None:
        notes.append(f"tidewire not run: {ctx.tidewire}")
        return rows
    for kind, base in tidewire_kinds():
        tw = setup.tidewire(kind, base=base)
        rows += tidewire_uploads(tw, f"{kind}, base" if base else kind, src, work)
    return rows


def timed(send: Callable[[], Transfer]) -> Callable[[], tuple[float, Transfer]]:
    def run() -> tuple[float, Transfer]:
        t = send()
        return t.seconds, t

    return run


def tidewire_uploads(tw: Server, kind: str, src: Path, work: Path) -> list[Upload]:
    base = f"http://127.0.0.1:{tw.port}"

    def stored(t: Transfer) -> str | None:
        if t.status != 201:
            return f"HTTP {t.status}: {t.body[:200]}"
        try:
            meta = json.loads(t.body)
            meta = meta[0] if isinstance(meta, list) else meta
        except ValueError:
            return f"not JSON: {t.body[:200]}"
        return (
            None if meta.get("size") == src.stat().st_size else f"stored {meta.get('size')} bytes"
        )

    def remove(t: Transfer) -> None:
        try:
            meta = json.loads(t.body)
            id = (meta[0] if isinstance(meta, list) else meta)["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            id = t.headers.get("tidewire-file")
        if id:
            req = urllib.request.Request(f"{base}/files/{id}", method="DELETE")
            with contextlib.suppress(OSError):  # the folder goes at the end anyway
                urllib.request.urlopen(req, timeout=30).close()

    def tus() -> tuple[float, Transfer]:
        """tus creation (POST) then one PATCH with the whole file, as a resuming client would
        send it when nothing goes wrong; the time is both requests'."""
        head = {"Tus-Resumable": "1.0.0", "Upload-Length": str(src.stat().st_size)}
        t0 = time.monotonic()
        req = urllib.request.Request(f"{base}/uploads/", method="POST", headers=head)
        with urllib.request.urlopen(req, timeout=30) as r:
            location = r.headers["Location"]
        created = time.monotonic() - t0
        args = [
            "-X", "PATCH", "-T", str(src),
            "-H", "Tus-Resumable: 1.0.0",
            "-H", "Upload-Offset: 0",
            "-H", "Content-Type: application/offset+octet-stream",
        ]  # fmt: skip
        t = curl(urllib.parse.urljoin(base + "/uploads/", location), args, work, True)
        return created + t.seconds, t

    def tus_stored(t: Transfer) -> str | None:
        if t.status != 204:
            return f"PATCH: HTTP {t.status}: {t.body[:200]}"
        if not t.headers.get("tidewire-file"):
            return "no Tidewire-File header on the last PATCH"
        return None

    put = timed(lambda: curl(f"{base}/files/{src.name}", ["-T", str(src)], work, True))
    form = timed(lambda: curl(f"{base}/files", ["-F", f"file=@{src}"], work, True))
    return [
        Upload(f"tidewire PUT ({kind})", tw, put, stored, remove),
        Upload(f"tidewire multipart ({kind})", tw, form, stored, remove),
        Upload(f"tidewire tus ({kind})", tw, tus, tus_stored, remove),
    ]
